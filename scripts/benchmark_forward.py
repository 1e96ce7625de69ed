#!/usr/bin/env python
"""CPU time of one De-LightSAM forward pass at several input sizes, beside SAM ViT-B in the same run.

Prints a table and writes JSON (default benchmarks/results/forward.json). Random weights: speed does not
depend on them. SAM ViT-B is timed as image encoder plus mask decoder with one box prompt, at 1024.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import delightsam


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def delightsam_row(size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = delightsam.DeLightSAM(delightsam.released_config(img_size=size)).eval()
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        times = _time(lambda: model(x, "dermoscopy"), repeats)
    return {"model": "De-LightSAM", "input": size, "parameters": sum(p.numel() for p in model.parameters()),
            "median_s": statistics.median(times), "times_s": times}


def sam_vit_b_row(repeats: int) -> dict:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()
    x = torch.randn(1, 3, 1024, 1024)
    box = torch.tensor([[256.0, 256.0, 768.0, 768.0]])

    def run():
        embedding = sam.image_encoder(x)
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)

    with torch.inference_mode():
        times = _time(run, repeats)
    return {"model": "SAM ViT-B (box prompt)", "input": 1024, "parameters": sum(p.numel() for p in sam.parameters()),
            "median_s": statistics.median(times), "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 512, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip SAM ViT-B")
    parser.add_argument("--output", default="benchmarks/results/forward.json")
    args = parser.parse_args()
    rows = [delightsam_row(s, args.repeats) for s in args.sizes]
    if not args.no_peer:
        rows.append(sam_vit_b_row(max(1, args.repeats - 1)))
    base = next((r["median_s"] for r in rows if r["model"] == "De-LightSAM" and r["input"] == 1024), None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'model':<24}{'input':>7}{'parameters':>14}{'median s':>10}{'vs DLS@1024':>13}")
    for r in rows:
        ratio = f"{r['median_s'] / base:.2f}x" if base else "-"
        print(f"{r['model']:<24}{r['input']:>7}{r['parameters']:>14,}{r['median_s']:>10.3f}{ratio:>13}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
