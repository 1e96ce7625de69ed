"""The intensity normalisation a checkpoint expects of its 0..255 RGB input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import DeLightSAMConfig


@dataclass(frozen=True)
class PixelNormalization:
    """``(x - mean) / std`` per channel, for [3, H, W] or [B, 3, H, W] tensors or arrays in 0..255.

    Returns a new float32 tensor; the input is left untouched (MONAI's NormalizeIntensity with
    ``channel_wise=True`` writes into its input, which is why it is not used here)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        x = x.as_subclass(torch.Tensor).float()
        if x.dim() not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(f"expected [3, H, W] or [B, 3, H, W] RGB images, got {list(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        return (x - mean) / std


def get_normalization(model_or_config) -> PixelNormalization:
    """The normalisation that a model (or its configuration) expects. For the released weights it is the
    released code's ``x / mean - 1`` (its pixel_std was set from pixel_mean)."""
    config: DeLightSAMConfig = getattr(model_or_config, "config", model_or_config)
    return PixelNormalization(tuple(config.pixel_mean), tuple(config.pixel_std))
