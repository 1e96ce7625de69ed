"""De-LightSAM: a prompt-free lightweight SAM for medical image segmentation.

Public API::

    model = delightsam.load_model(path, device="cpu")       # released or project checkpoint
    normalise = delightsam.get_normalization(model)           # MONAI transform for [3, H, W] in 0..255
    out = model(images, modality="fundus")                    # images [B, 3, S, S], normalised
    out.mask_logits, out.patch_logits, out.image_embeddings

The names below are imported on first use (PEP 562), so that a module that needs no model, such as
``delightsam.reading``, loads without the network's modules.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "CheckpointError": "checkpoint", "load_model": "checkpoint", "load_released": "checkpoint", "save_model": "checkpoint",
    "RELEASED_MODALITIES": "config", "DeLightSAMConfig": "config", "Modality": "config", "Structure": "config",
    "released_config": "config",
    "DeLightSAM": "model", "DeLightSAMOutput": "model",
    "PixelNormalization": "normalization", "get_normalization": "normalization",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'delightsam' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
