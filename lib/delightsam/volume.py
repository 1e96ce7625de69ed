"""Prompt-free segmentation of a whole 3-D volume, slice by slice.

One code path for everything that segments volumes (the MONAI Label app, evaluation, training's
validation): intensities become 0..255 grey levels per modality (a CT window, MR percentiles), slices
are taken along the acquisition axis and run through the 2-D network in batches by MONAI's
``SliceInferer``, and the per-structure probabilities become one label map on the input grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer
from monai.transforms import FillHoles, KeepLargestConnectedComponent, LoadImage
from torch import nn

from .config import Modality, Structure
from .model import DeLightSAM
from .normalization import get_normalization

# Used when a checkpoint's modality does not say (soft-tissue CT window; MedSAM-style MR percentiles).
DEFAULT_INTENSITY = {"ct": {"window": [-160.0, 240.0]}, "mr": {"percentiles": [0.5, 99.5]}}


@dataclass
class VolumeResult:
    labels: np.ndarray  # uint8, the input's shape, label ids of the modality's structures (0 = background)
    modality: str
    slice_axis: int
    label_names: dict[str, int]
    non_finite_voxels: int = 0  # voxels that were NaN/inf and were treated as the volume's minimum
    notes: list[str] = field(default_factory=list)


def image_reader(path) -> str:
    """nibabel for NIfTI (ITK's NIfTI reader turns NaN into 0, hiding corrupt volumes), ITK for the rest
    (NRRD, DICOM series folders)."""
    return "NibabelReader" if str(path).endswith((".nii", ".nii.gz")) else "ITKReader"


def read_volume(path):
    """A volume as MONAI reads it for the app: MetaTensor [X, Y, Z] with its affine."""
    return LoadImage(image_only=True, reader=image_reader(path))(str(path))


def read_label(path, image):
    """A label map read onto ``image``'s voxel grid: a label stored in another axis order or direction (a
    NIfTI label of a DICOM series, say) is flipped and permuted by the two affines; any other difference of
    grid is an error that names both."""
    import nibabel.orientations as orientations

    label = read_volume(path)
    if tuple(label.shape) == tuple(image.shape) and np.allclose(label.affine, image.affine, atol=1e-3):
        return label
    have = orientations.io_orientation(np.asarray(label.affine))
    want = orientations.io_orientation(np.asarray(image.affine))
    transform = orientations.ornt_transform(have, want)
    data = orientations.apply_orientation(np.asarray(label.as_subclass(torch.Tensor)), transform)
    affine = np.asarray(label.affine) @ orientations.inv_ornt_aff(transform, label.shape)
    spacing = max(spacing_of(image))
    if data.shape != tuple(image.shape) or not np.allclose(affine, np.asarray(image.affine), atol=1e-2 * spacing):
        raise ValueError(f"label {path} is not on the image's grid: shape {list(label.shape)} and affine "
                         f"{np.round(np.asarray(label.affine), 3).tolist()} vs the image's {list(image.shape)} and "
                         f"{np.round(np.asarray(image.affine), 3).tolist()}")
    return torch.from_numpy(np.ascontiguousarray(data))


def spacing_of(image) -> tuple[float, float, float]:
    return tuple(float(s) for s in np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0))


def slice_axis(spacing) -> int:
    """The acquisition axis: the one with the largest spacing; the last one when spacing is isotropic."""
    spacing = [float(s) for s in spacing]
    widest = max(spacing)
    return max(i for i, s in enumerate(spacing) if np.isclose(s, widest, rtol=1e-3))


def to_grey_levels(volume: torch.Tensor, intensity: dict | None) -> torch.Tensor:
    """Volume intensities -> float 0..255 as the model expects of each channel."""
    if intensity and "window" in intensity:
        low, high = intensity["window"]
    elif intensity and "percentiles" in intensity:
        values = volume.flatten()
        if values.numel() > 2_000_000:  # a seeded random subsample: fast, and free of stride aliasing
            pick = torch.randint(values.numel(), (1_000_000,), generator=torch.Generator().manual_seed(0))
            values = values[pick]
        low, high = torch.quantile(values.float(), torch.tensor(intensity["percentiles"]) / 100).tolist()
    else:
        low, high = volume.min().item(), volume.max().item()
    scale = 255.0 / max(high - low, 1e-6)
    return ((volume.float() - low) * scale).clamp_(0, 255)


def fit_to_square(images: torch.Tensor, size: int, mode: str = "bilinear") -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C, H, W] -> [B, C, size, size]: longer side resized to ``size``, zero-padded bottom/right (SAM's
    convention, so nothing is distorted). Returns the resized (unpadded) height and width too.
    ``mode="nearest"`` for label masks."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if mode == "nearest":
        x = F.interpolate(images, (nh, nw), mode="nearest-exact")
    else:
        x = F.interpolate(images, (nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    return F.pad(x, (0, size - nw, 0, size - nh)), (nh, nw)


def model_input(grey: torch.Tensor, fitted: tuple[int, int], normalise) -> torch.Tensor:
    """Fitted grey slices [B, 1|3, S, S] -> the model's input [B, 3, S, S]: normalised, and the padding set
    to 0 after normalisation, as SAM and the released code pad (a neutral, not a black, border)."""
    x = normalise(grey.expand(-1, 3, -1, -1))
    nh, nw = fitted
    x[..., nh:, :] = 0
    x[..., :, nw:] = 0
    return x


class FittedSliceNetwork(nn.Module):
    """The 2-D step for ``SliceInferer``: slices [b, C, H, W] -> probabilities [b, S, H, W].

    Channel 0 holds grey levels; further channels (a reference label map, for prompted baselines) are
    carried along. Each slice is resized so that its longer side is the input size and padded bottom/right
    (so no slice is distorted); ``logits`` gives square logits at any resolution, which are brought to the
    input size, cropped to the slice and resized back, as SAM does."""

    def __init__(self, size: int, device: torch.device) -> None:
        super().__init__()
        self.size, self.device = size, device

    def logits(self, grey: torch.Tensor, fitted: tuple[int, int], guide: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        b, c, h, w = slices.shape
        slices = slices.float().to(self.device)
        grey, (nh, nw) = fit_to_square(slices[:, :1], self.size)
        guide = fit_to_square(slices[:, 1:], self.size, mode="nearest")[0] if c > 1 else None
        logits = F.interpolate(self.logits(grey, (nh, nw), guide), (self.size, self.size), mode="bilinear",
                               align_corners=False)
        logits = F.interpolate(logits[..., :nh, :nw], (h, w), mode="bilinear", align_corners=False)
        return torch.sigmoid(logits).cpu()


class SliceNetwork(FittedSliceNetwork):
    """De-LightSAM on grey slices: replicated to three channels and normalised as the checkpoint expects."""

    def __init__(self, model: DeLightSAM, modality: str) -> None:
        super().__init__(model.config.img_size, next(model.parameters()).device)
        self.model, self.modality = model, modality
        self.normalise = get_normalization(model)

    def logits(self, grey: torch.Tensor, fitted: tuple[int, int], guide: torch.Tensor | None) -> torch.Tensor:
        return self.model(model_input(grey, fitted, self.normalise), self.modality).low_res_logits


def combine(probabilities: torch.Tensor, label_ids: list[int], threshold: float = 0.5,
            parts: dict[int, list[int]] | None = None) -> torch.Tensor:
    """[S, ...] probabilities -> label map: the most probable structure above the threshold.
    Deterministic where structures overlap: the higher probability wins, ties go to the first structure.
    ``parts`` (structure index -> indices of structures inside it) lets a part above the threshold be drawn
    over the structure that holds it (grey matter over the brain), whatever their probabilities."""
    if parts:
        probabilities = probabilities.clone()
        for whole, inside in parts.items():
            covered = (probabilities[inside] > threshold).any(dim=0)
            probabilities[whole][covered] = 0.0
    best, index = probabilities.max(dim=0)  # max returns the first index among equal values
    ids = torch.tensor(label_ids, dtype=torch.uint8)
    return torch.where(best > threshold, ids[index], torch.zeros((), dtype=torch.uint8))


def structure_mask(labels, structure: Structure):
    """A structure's mask in a label map (array or tensor): its own label and its parts' labels."""
    if isinstance(labels, torch.Tensor):
        return torch.isin(labels, torch.tensor(structure.target_labels, dtype=labels.dtype, device=labels.device))
    return np.isin(labels, structure.target_labels)


def part_indices(structures: list[Structure]) -> dict[int, list[int]]:
    index = {s.label: i for i, s in enumerate(structures)}
    return {i: [index[p] for p in s.parts] for i, s in enumerate(structures) if s.parts}


def clean_up(labels: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """Per structure: keep the largest connected component, fill holes (MONAI transforms, 3-D)."""
    x = labels.unsqueeze(0)
    x = KeepLargestConnectedComponent(applied_labels=label_ids, independent=True)(x)
    x = FillHoles(applied_labels=label_ids)(x)
    return torch.as_tensor(x).squeeze(0).to(torch.uint8)


@torch.inference_mode()
def segment_volume(model: DeLightSAM, volume, modality: str, spacing=(1.0, 1.0, 1.0), batch_size: int = 8,
                   threshold: float = 0.5, cleanup: bool = False, progress: bool = False) -> VolumeResult:
    """Label map of a 3-D volume ([X, Y, Z] array or tensor, or [1, X, Y, Z]) on its own grid."""
    spec = model.config.modality(modality)
    return segment_with(SliceNetwork(model, modality), volume, spec, spacing, batch_size, threshold, cleanup, progress)


@torch.inference_mode()
def segment_with(network: FittedSliceNetwork, volume, spec: Modality, spacing=(1.0, 1.0, 1.0), batch_size: int = 8,
                 threshold: float = 0.5, cleanup: bool = False, progress: bool = False, guide=None) -> VolumeResult:
    """``segment_volume`` with any 2-D network that predicts ``spec``'s structures (the evaluation's
    baselines); ``guide``, a label map on the volume's grid, reaches the network as a second channel."""
    x = _as_volume(volume)
    if len(spacing) != 3:
        raise ValueError(f"expected 3 spacings for a 3-D volume, got {list(spacing)}")
    finite = torch.isfinite(x)
    bad = int((~finite).sum())
    if bad == x.numel():
        raise ValueError("the volume has no finite voxel (all NaN or infinite)")
    notes = []
    if bad:
        x = torch.where(finite, x, x[finite].min())
        notes.append(f"{bad} NaN/infinite voxels were set to the volume's minimum")
    axis = slice_axis(spacing)
    grey = to_grey_levels(x, spec.intensity or DEFAULT_INTENSITY.get(spec.name))[None]
    if guide is not None:
        grey = torch.cat([grey, _as_volume(guide).float()[None]])
    in_plane = [n for i, n in enumerate(x.shape) if i != axis]
    inferer = SliceInferer(spatial_dim=axis, roi_size=in_plane, sw_batch_size=batch_size, overlap=0.0,
                           progress=progress, sw_device="cpu", device="cpu")  # the network moves slices to its device
    probabilities = inferer(grey[None], network)[0]  # [S, X, Y, Z]
    label_ids = [s.label for s in spec.structures]
    labels = combine(probabilities, label_ids, threshold, part_indices(spec.structures))
    if cleanup:
        labels = clean_up(labels, label_ids)
    return VolumeResult(labels.numpy(), spec.name, axis, {s.name: s.label for s in spec.structures}, bad, notes)


def _as_volume(volume) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume)
    x = x.as_subclass(torch.Tensor)
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        kind = {2: "a 2-D image"}.get(x.dim(), f"a {x.dim()}-D array")
        raise ValueError(f"expected a 3-D volume, got {kind} of shape {list(volume.shape)}")
    return x
