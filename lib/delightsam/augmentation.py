"""Augmentation of training slices: what varies between scanners and patients (MONAI's random transforms, seeded per
slice so that a run is reproducible)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=4)
def augmentation(modality: str = "ct"):
    """MONAI dictionary transforms for a fitted slice (image [1, S, S] in 0..255, masks [S_str, S, S]): scale and
    field of view (zoom 0.65-1.35, shifts of 10%), rotations of up to 10 degrees, contrast, brightness and noise;
    what varies between scanners and patients, where one or two labelled volumes say nothing. MR adds what varies
    between MR scanners and protocols and not in CT: a smooth bias field (coil sensitivity) and blur (thicker or
    coarser acquisitions than the 1 mm training heads)."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd)

    common = [
        RandAffined(keys=("image", "masks"), prob=0.9, rotate_range=(0.17,), scale_range=(0.35, 0.35),
                    translate_range=(0.1, 0.1), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=10.0, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.3, std=6.0),
    ]
    mr = [RandBiasFieldd(keys="image", prob=0.5, coeff_range=(0.0, 0.3)),
          RandGaussianSmoothd(keys="image", prob=0.3, sigma_x=(0.25, 1.5), sigma_y=(0.25, 1.5))]
    return Compose(common + (mr if modality == "mr" else []))


def augment_slice(grey: torch.Tensor, masks: torch.Tensor, seed: int, modality: str = "ct") -> tuple[torch.Tensor, torch.Tensor]:
    """One fitted grey slice [1, S, S] of ``modality`` and its masks [S_str, S, S], augmented reproducibly from
    ``seed``."""
    transform = augmentation(modality)
    transform.set_random_state(seed=seed)
    size = grey.shape[-1]
    # translations are fractions of the slice: MONAI wants pixels
    transform.transforms[0].rand_affine.rand_affine_grid.translate_range = ((-0.1 * size, 0.1 * size),) * 2
    out = transform({"image": grey, "masks": masks})
    image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp(0, 255)
    return image, (torch.as_tensor(out["masks"]).as_subclass(torch.Tensor) > 0.5).float()

