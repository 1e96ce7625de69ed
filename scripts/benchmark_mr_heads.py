#!/usr/bin/env python
"""MR heads through a real server: the whole brain's Dice on the heads with skull never trained on (ROBEX's reference
T1 and ITK's example T1, development: settings were chosen looking at them; held out, the TRIO_Y_NDC template and
BrainBrowser's T1 of one person with face and neck, against ROBEX's mask: fetched here with --real-heads) as
stored and in another storage order, and as 5 mm axial slices made from them (``delightsam.thick_slices``: a box slab
profile; a second condition of the same head, not another head) in two storage orders; and the seconds of each,
warm, with a 1 mm head with skull (Colin 27, a training head) for the cost of a 1 mm series. With ``--before``
another checkout (a git worktree of the last commit) runs the same requests first, in the same run. Run it on an
otherwise idle machine.

    python scripts/benchmark_mr_heads.py [--before /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmark_anatomy import rows_of
from train_mr_heads import DEVELOPMENT, HELD_OUT  # ROBEX's and ITK's heads; the TRIO_Y_NDC template, BrainBrowser's

ROOT = Path(__file__).resolve().parents[1]


def studies(data: Path, out: Path, labels: Path) -> list[str]:
    """The heads never trained on in four conditions each, and Colin 27, as a studies folder; their labels beside
    it."""
    from delightsam.thick_slices import held_out_conditions

    out.mkdir(parents=True)
    labels.mkdir(parents=True)
    names = []
    for head in DEVELOPMENT + HELD_OUT:
        image, label = (nib.load(data / "samples" / p / f"{head}.nii.gz") for p in ("", "labels"))
        for condition, (img, lab) in held_out_conditions(image, label).items():
            name = f"{head}_{condition}"
            nib.save(img, out / f"{name}.nii.gz")
            nib.save(lab, labels / f"{name}.nii.gz")
            names.append(name)
    colin = data / "samples" / "colin27_t1.nii.gz"
    if colin.exists():  # scripts/fetch_samples.py --heads
        nib.save(nib.load(colin), out / "colin27_t1_1mm.nii.gz")
        names.append("colin27_t1_1mm")
    return names


def scorer(labels: Path):
    def score(name: str, label_path: Path, result: dict) -> dict:
        reference = labels / f"{name}.nii.gz"
        row = {"notes": result.get("notes"), "scope": result.get("scope")}
        if reference.exists():
            truth, predicted = (np.asarray(nib.load(p).dataobj) > 0 for p in (reference, label_path))
            overlap = 2 * float((truth & predicted).sum())
            row["brain_dice_held_out"] = round(overlap / float(truth.sum() + predicted.sum()), 4)
        return row
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--before", type=Path, help="another checkout (its apps/ and lib/), run first")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "mr_heads.json")
    args = parser.parse_args()
    began = time.time()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_samples.py"), "--data", str(args.data),
                    "--real-heads"], check=True)
    trees = ([args.before.resolve()] if args.before else []) + [ROOT]
    with tempfile.TemporaryDirectory(prefix="mr-heads-") as tmp:
        tmp = Path(tmp)
        names = studies(args.data, tmp / "studies", tmp / "labels")
        rows = []
        for tree in trees:
            rows += rows_of(tree, names, tmp / "studies", args.data, tmp, model="delightsam_mr",
                            score=scorer(tmp / "labels"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "wall_seconds": round(time.time() - began)}, indent=1))
    print("| volume | " + " | ".join(f"{t.name}: s | Dice" for t in trees) + " |")
    print("|---|" + "---|---|" * len(trees))
    for name in names:
        cells = []
        for tree in trees:
            row = next(r for r in rows if r["volume"] == name and r["tree"] == str(tree))
            cells += [str(row["seconds"]), str(row.get("brain_dice_held_out", "-"))]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
