#!/usr/bin/env python
"""One prepared check of the code's GPU paths (CI has no GPU): the same model on CPU and CUDA, whole-volume
inference on both, a short training run on the GPU, and GPU time per slice. Prints JSON.

  python scripts/gpu_check.py --checkpoint models/delightsam_ct_mr/models/model.safetensors \
      --volume data/studies/ts_ct_small.nii.gz --label data/samples/labels/ts_ct_small.nii.gz [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

import delightsam
from delightsam.training import TrainConfig, train
from delightsam.training_data import TrainItem
from delightsam.pipeline import segment_volume
from delightsam.reading import read_volume


def per_slice_ms(model, size: int, batch: int, device: str) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.inference_mode():
        for _ in range(3):
            model(x, "ct")
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(10):
            model(x, "ct")
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / (10 * batch) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--volume", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--out")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    cpu, gpu = delightsam.load_model(args.checkpoint), delightsam.load_model(args.checkpoint, device="cuda")
    x = torch.randn(2, 3, cpu.config.img_size, cpu.config.img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = cpu(x, "ct").mask_logits, gpu(x.cuda(), "ct").mask_logits.cpu()
    result["logits_max_abs_diff_cpu_vs_cuda"] = float((a - b).abs().max())
    image = read_volume(args.volume)
    labels = {}
    for name, model in (("cpu", cpu), ("cuda", gpu)):
        began = time.perf_counter()
        labels[name] = segment_volume(model, image, "ct", batch_size=16).labels
        result[f"segment_volume_{name}_s"] = time.perf_counter() - began
    result["label_agreement_cpu_vs_cuda"] = float((labels["cpu"] == labels["cuda"]).mean())
    for size in (256, 512, 1024):
        model = delightsam.load_model(args.checkpoint, device="cuda", img_size=size)
        result[f"ms_per_slice_{size}_batch16"] = per_slice_ms(model, size, 16, "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        item = TrainItem("v", args.volume, args.label, "ct")
        config = TrainConfig(epochs=2, steps_per_epoch=10, batch_size=8, trainable="all", teacher=None, tracking="none")
        began = time.perf_counter()
        stats = train(gpu, [item], [item], config, tmp, log=lambda m: None)
        result["train_2x10_steps_s"] = time.perf_counter() - began
        result["train_loss"] = stats["loss"]["total"]
        result["train_val_dice_before_after"] = [stats["before"]["mean_dice"], stats["val"]["mean_dice"]]
        result["params_on_cuda"] = all(p.is_cuda for p in gpu.parameters())
    result["finite"] = bool(np.isfinite(result["train_loss"]))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        open(args.out, "w").write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
