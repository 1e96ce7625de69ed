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
    between MR scanners and protocols and not in CT: a smooth bias field (coil sensitivity), slices darkened or
    brightened as a whole (a coil's fall-off along the head) and blur (thicker or
    coarser acquisitions than the 1 mm training heads) and a random smooth mapping of the grey levels (another
    scanner's or sequence's contrast between tissues: the model is to learn the head's shapes, not one scanner's
    intensities)."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandHistogramShiftd, RandScaleIntensityd, RandShiftIntensityd)

    common = [
        RandAffined(keys=("image", "masks"), prob=0.9, rotate_range=(0.17,), scale_range=(0.35, 0.35),
                    translate_range=(0.1, 0.1), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=10.0, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.3, std=6.0),
    ]
    # the field's coefficients are drawn on both sides of zero (with MONAI's range (0, c) the log-field's mean, its
    # constant coefficient, is never below zero: it brightens on average), and a slice as a whole is darkened down to
    # half: far from a head coil's centre (the cerebellum, the vertex) a slice's brain is that much darker than the
    # volume's grey levels say
    mr = [RandBiasFieldd(keys="image", prob=0.5, coeff_range=(-0.4, 0.4)),
          RandScaleIntensityd(keys="image", factors=(-0.5, 0.2), prob=0.4),
          RandGaussianSmoothd(keys="image", prob=0.3, sigma_x=(0.25, 1.5), sigma_y=(0.25, 1.5)),
          RandHistogramShiftd(keys="image", num_control_points=(4, 8), prob=0.4)]
    return Compose(common + (mr if modality == "mr" else []))


def augment_slice(grey: torch.Tensor, masks: torch.Tensor, seed: int, modality: str = "ct",
                  whole: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fitted grey slice [1, S, S] of ``modality`` and its masks [S_str, S, S], augmented reproducibly from
    ``seed``; ``whole``: the index of the structure a lesion may be painted in (an MR's whole brain), or None."""
    transform = augmentation(modality)
    transform.set_random_state(seed=seed)
    size = grey.shape[-1]
    # translations are fractions of the slice: MONAI wants pixels
    transform.transforms[0].rand_affine.rand_affine_grid.translate_range = ((-0.1 * size, 0.1 * size),) * 2
    out = transform({"image": grey, "masks": masks})
    image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp(0, 255)
    masks = (torch.as_tensor(out["masks"]).as_subclass(torch.Tensor) > 0.5).float()
    if modality == "mr" and whole is not None:
        image = lesion(image, masks[whole], torch.Generator().manual_seed(seed))
    return image, masks


def lesion(image: torch.Tensor, brain: torch.Tensor, generator: torch.Generator, chance: float = 0.3) -> torch.Tensor:
    """With probability ``chance``, a lesion inside the brain (``brain`` [S, S], the whole brain's mask): an ellipse
    of 3-25 pixels' radius, centred on a brain pixel, at a random grey level with a soft edge; the labels do not
    change, since a tumour, an infarct or an enhancing ring is still inside the brain that is to be masked."""
    inside = brain.nonzero()
    if torch.rand(1, generator=generator) >= chance or len(inside) == 0:
        return image
    centre = inside[int(torch.randint(len(inside), (1,), generator=generator))].float()
    radii = 3 + 22 * torch.rand(2, generator=generator)
    angle = float(torch.rand(1, generator=generator)) * torch.pi
    rows, columns = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in brain.shape), indexing="ij")
    dr, dc = rows - centre[0], columns - centre[1]
    cos, sin = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
    distance = ((dr * cos + dc * sin) / radii[0]) ** 2 + ((dc * cos - dr * sin) / radii[1]) ** 2
    weight = torch.clamp((1.2 - distance) / 0.4, 0, 1) * brain  # soft edge, never outside the brain
    level = 255 * torch.rand(1, generator=generator)
    return image * (1 - weight) + level * weight

