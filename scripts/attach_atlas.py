#!/usr/bin/env python
"""Gives a checkpoint the CT registration atlas (``delightsam.registration_prior``): the training patient's whole
CT (TotalSegmentator's example, ``data/studies/ts_ct.nii.gz``, the scan the starter's training slices were cut from)
with its organs' labels, at 4 mm. The starter's recipe (train_starter.py) attaches it; this script attaches it to a
checkpoint that exists (by default the shipped model, rewritten in half precision as the recipe writes it).

  python scripts/attach_atlas.py [--checkpoint models/delightsam_ct_mr/models/model.safetensors]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from delightsam import load_model, save_model
from delightsam.geometry import orient
from delightsam.model import DeLightSAM
from delightsam.reading import read_label, read_volume
from delightsam.registration_prior import make_atlas

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"
ATLAS_IMAGE, ATLAS_LABELS = "studies/ts_ct.nii.gz", "samples/labels/ts_ct.nii.gz"


def attach_ct_atlas(model: DeLightSAM, data: Path) -> None:
    """``model.atlases["ct"]`` from the training patient's CT, its TotalSegmentator ids as the model's labels."""
    from train_starter import TS_IDS

    image = read_volume(data / ATLAS_IMAGE)
    reference = np.asarray(read_label(data / ATLAS_LABELS, image)).round().astype(np.int64)
    ours = np.zeros(max(int(reference.max()), max(TS_IDS)) + 1, dtype=np.uint8)
    for ts, label in TS_IDS.items():
        ours[ts] = label
    oriented = orient(image, None, None)
    labels = oriented.to_layout(torch.from_numpy(ours[reference]))
    model.atlases = {**model.atlases, "ct": make_atlas(oriented.data, labels, oriented.spacing, oriented.plane)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=SHIPPED)
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="where fetch_samples.py put the data")
    args = parser.parse_args()
    model = load_model(args.checkpoint)
    attach_ct_atlas(model, args.data)
    save_model(model, args.checkpoint, half=True)
    atlas = model.atlases["ct"]
    print(f"wrote {args.checkpoint} with a CT atlas of {list(atlas.image.shape)} voxels, "
          f"labels {sorted(set(atlas.labels.unique().tolist()) - {0})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
