#!/usr/bin/env python
"""Cost by physical extent: the same abdomen (TotalSegmentator's ts_ct, 336 mm along z) resampled to 512x512x100
(3.4 mm slices) and 512x512x600 (0.56 mm), each through /infer of a real server (the shipped model), in one run:

- two stages with the first stage on every slice (the pipeline before `first_every_mm`: --conf first_every_mm 0);
- two stages at the app's defaults (the first stage about every `first_every_mm` millimetres, interpolated between);
- one stage (refine false);
- LiteMedSAM with a box per structure and slice from the reference label (in a process of its own: no server).

Wall seconds seen by the client (the first request also loads the model; the second is warm) and the peak resident
memory of the process (VmHWM after the volume; the 100-slice volume goes first). Prints a table, writes JSON.

    python scripts/benchmark_extent.py [--slices 100 600]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from benchmark_app import make_large_ct, per_volume

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"
PIPELINES = [  # (row, server --conf, request params)
    ("two stages, first stage on every slice (before)", ["--conf", "first_every_mm", "0"], {"refine": True}),
    ("two stages, the app's defaults", [], {"refine": True}),
    ("one stage", [], {"refine": False}),
]


def reference_label(data: Path, image_path: Path, out: Path) -> Path:
    """ts_ct's label (TotalSegmentator ids, as the sample data holds it) on the resampled volume's grid."""
    from train_starter import CT_STRUCTURES  # the recipe's mapping from TotalSegmentator's ids to the model's

    label = sitk.ReadImage(str(data / "samples" / "labels" / "ts_ct.nii.gz"))
    ours = sitk.ChangeLabel(sitk.Cast(label, sitk.sitkUInt8), {ts: our for _, our, ts in CT_STRUCTURES})
    ours = sitk.Mask(ours, sitk.BinaryThreshold(ours, 1, len(CT_STRUCTURES)))
    grid = sitk.ReadImage(str(image_path))
    sitk.WriteImage(sitk.Resample(ours, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8), str(out))
    return out


def _lite_medsam(image_path: str, label_path: str, queue) -> None:
    from delightsam import load_model
    from delightsam.baselines import LiteMedSAMBoxNetwork
    from delightsam.first_stage import segment_with
    from delightsam.reading import read_label, read_volume

    spec = load_model(CHECKPOINT).config.modality("ct")
    network = LiteMedSAMBoxNetwork(spec.structures)
    began = time.perf_counter()
    image = read_volume(image_path)
    segment_with(network, image, spec, batch_size=4, guide=read_label(label_path, image))
    queue.put((time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def lite_medsam_row(image: Path, label: Path) -> dict:
    """LiteMedSAM with reference boxes over the whole volume, in a fresh process (its own peak memory)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_lite_medsam, args=(str(image), str(label), queue))
    process.start()
    seconds, peak = queue.get()
    process.join()
    return {"first_s": None, "warm_s": seconds, "server_peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 600])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "extent.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="delightsam-extent-"))
    rows = []
    for name, conf, params in PIPELINES:
        (tmp / _slug(name)).mkdir()
        for r in per_volume(args.data, CHECKPOINT, tmp / _slug(name), 4, args.slices, {"prompts": "slice", **params},
                            only_large=True, source="ts_ct", conf=conf):
            rows.append({"pipeline": name, **r})
            _print(rows[-1])
    for n in args.slices:
        image = make_large_ct(args.data, tmp, n, "ts_ct")
        label = reference_label(args.data, image, tmp / f"label_{n}.nrrd")
        rows.append({"pipeline": "LiteMedSAM, reference boxes (in process)", "volume": image.stem,
                     "size": [512, 512, n], **lite_medsam_row(image, label)})
        _print(rows[-1])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.output}")
    shutil.rmtree(tmp, ignore_errors=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:40]


def _print(r: dict) -> None:
    first = f"{r['first_s']:.1f}" if r["first_s"] is not None else "-"
    print(f"| {r['pipeline']} | {'x'.join(map(str, r['size']))} | {first} | {r['warm_s']:.1f} | "
          f"{r['server_peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
