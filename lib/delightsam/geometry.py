"""One geometry path for every volume: orientation, acquisition axis, grey levels, fitting, and the way back.

Inference, training, evaluation and the overlays all see a volume through ``orient``. Its voxels are flipped
and permuted (never resampled) from the file's storage order into one layout per acquisition plane, the
radiological display of that plane, with the slices along the last axis:

  axial (slices along S):     rows run anterior -> posterior, columns the patient's right -> left
  coronal (slices along A):   rows run superior -> inferior, columns right -> left
  sagittal (slices along R):  rows run superior -> inferior, columns anterior -> posterior

So the same anatomy gives the same slices whether a file stores it RAS, LPS, LAS or any other way, and a label
map goes back to the input's own grid by the inverse flip and permutation, voxel for voxel. Orientation comes
from the RAS affine that MONAI's readers give (ITK's LPS is converted by MONAI); a plain array without one is
taken as stored RAS. The acquisition axis is the one whose voxel spacing stands out (``THICK_SLICE``); a
near-isotropic volume is cut axially.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations

# The layout of each plane as nibabel axis codes (the direction each array axis runs toward).
LAYOUTS = {"axial": ("P", "L", "S"), "coronal": ("I", "L", "A"), "sagittal": ("I", "P", "R")}
PLANE_OF_WORLD_AXIS = {2: "axial", 1: "coronal", 0: "sagittal"}  # RAS world axis the slices run along
WORLD_AXIS_OF_PLANE = {plane: axis for axis, plane in PLANE_OF_WORLD_AXIS.items()}
# Used when a checkpoint's modality does not say (soft-tissue CT window; MedSAM-style MR percentiles).
DEFAULT_INTENSITY = {"ct": {"window": [-160.0, 240.0]}, "mr": {"percentiles": [0.5, 99.5]}}


def affine_of(volume, spacing=None) -> np.ndarray:
    """The RAS affine of a MetaTensor; for a plain array, the spacing's diagonal (or the identity)."""
    affine = getattr(volume, "affine", None)
    if affine is not None:
        return np.asarray(affine, dtype=np.float64)
    return np.diag([*(float(s) for s in (spacing or (1.0, 1.0, 1.0))), 1.0])


def spacing_of(affine_or_volume) -> tuple[float, float, float]:
    affine = affine_or_volume if isinstance(affine_or_volume, np.ndarray) else affine_of(affine_or_volume)
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


# a stored axis is the one the slices were cut along where its spacing is at least this many times the next widest
# (a 3-5 mm CT, a 2-D MR series); below it, a volume was cut (or resampled) thin along every axis
THICK_SLICE = 1.5


def thick_axis(affine: np.ndarray, ratio: float = THICK_SLICE) -> int | None:
    """The stored axis whose spacing is ``ratio`` times the next widest or more: the one a thick-sliced series was
    cut along. None for a volume without one (near-isotropic: a thin-slice CT of 0.7 x 0.7 x 0.5 mm, a 3-D MR, or
    two axes equally wide)."""
    spacing = np.asarray(spacing_of(affine))
    second, widest = np.argsort(spacing, kind="stable")[1:]
    return int(widest) if spacing[widest] >= ratio * spacing[second] else None


def acquisition_plane(affine: np.ndarray) -> tuple[str, int]:
    """(plane, stored axis) of the slices: the thick axis (``thick_axis``); a volume without one is cut axially, as
    the models learned, along its stored axis that runs along the body."""
    axis = thick_axis(affine)
    return plane_axis(affine, "axial") if axis is None else (PLANE_OF_WORLD_AXIS[int(_world(affine)[axis])], axis)


def plane_axis(affine: np.ndarray, plane: str) -> tuple[str, int]:
    """(``plane``, the stored axis that runs across it): how a volume is cut in a plane of one's choosing."""
    return plane, int(np.flatnonzero(_world(affine) == WORLD_AXIS_OF_PLANE[plane])[0])


def _world(affine: np.ndarray) -> np.ndarray:
    """Stored axis -> the RAS world axis it runs along most."""
    return orientations.io_orientation(affine)[:, 0].astype(int)


def _apply(x: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """nibabel's ``apply_orientation`` for tensors: flip, then permute."""
    flips = [i for i, f in enumerate(ornt[:, 1]) if f == -1]
    if flips:
        x = x.flip(flips)
    return x.permute(*np.argsort(ornt[:, 0]).tolist())


@dataclass
class Oriented:
    """A volume in its plane's layout ([rows, columns, slices]) and the way back to the grid it came on."""

    data: torch.Tensor
    plane: str
    slice_axis: int  # the stored axis that the slices run along
    spacing: tuple[float, float, float]  # mm along rows, columns and slices
    input_shape: tuple[int, int, int]
    forward: np.ndarray  # nibabel orientation transform: stored -> layout
    backward: np.ndarray  # layout -> stored

    def to_layout(self, array) -> torch.Tensor:
        """Another array on the input's grid (a label map, or [channels, X, Y, Z]) in this layout."""
        return apply_orientation(_tensor(array), self.forward)

    def to_input(self, array):
        """An array in this layout ([rows, columns, slices], or with leading channels) back on the input's
        grid; numpy in, numpy out."""
        out = apply_orientation(_tensor(array), self.backward).contiguous()
        return out.numpy() if isinstance(array, np.ndarray) else out


def apply_orientation(x: torch.Tensor, ornt: np.ndarray) -> torch.Tensor:
    """nibabel's orientation transform ``ornt`` applied to the last three axes of ``x`` (a flip copies); leading
    (channel) axes stay as they are."""
    lead = x.dim() - 3
    if lead:
        ornt = np.concatenate([np.stack([np.arange(lead), np.ones(lead)], 1), ornt + [lead, 0]])
    return _apply(x, ornt)


def layout_transform(source: str, target: str) -> np.ndarray:
    """The orientation transform from ``source`` plane's layout of a volume to ``target``'s layout of it."""
    return orientations.ornt_transform(orientations.axcodes2ornt(LAYOUTS[source]),
                                       orientations.axcodes2ornt(LAYOUTS[target]))


def orient(volume, affine=None, spacing=None, plane: str | None = None) -> Oriented:
    """``volume`` ([X, Y, Z] tensor, array or MetaTensor; [1, X, Y, Z] too) in its acquisition plane's layout, or in
    ``plane``'s."""
    x = as_volume(volume)
    affine = np.asarray(affine, dtype=np.float64) if affine is not None else affine_of(volume, spacing)
    plane, axis = acquisition_plane(affine) if plane is None else plane_axis(affine, plane)
    stored = orientations.io_orientation(affine)
    layout = orientations.axcodes2ornt(LAYOUTS[plane])
    forward = orientations.ornt_transform(stored, layout)
    backward = orientations.ornt_transform(layout, stored)
    spacing = spacing_of(affine)
    order = np.argsort(forward[:, 0])  # layout axis j holds stored axis order[j]
    return Oriented(_apply(x, forward), plane, axis, tuple(spacing[i] for i in order), tuple(x.shape), forward,
                    backward)


class VolumeError(ValueError):
    """A volume that cannot be segmented as it is (not 3-D, no finite voxel): the input's fault, said by name."""


def as_volume(volume) -> torch.Tensor:
    """A single-channel 3-D volume as a plain tensor: [X, Y, Z], or a singleton channel in front ([1, X, Y, Z])
    or behind ([X, Y, Z, 1], as some 4-D NIfTI files store a 3-D volume); anything else is refused by name."""
    x = _tensor(volume)
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    elif x.dim() == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.dim() != 3:
        kind = {2: "a 2-D image"}.get(x.dim(), f"a {x.dim()}-D array")
        raise VolumeError(f"expected a 3-D volume, got {kind} of shape {list(volume.shape)}")
    return x


def _tensor(array) -> torch.Tensor:
    x = array if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))
    return x.as_subclass(torch.Tensor)


# ---- grey levels ----------------------------------------------------------------------------------
def intensity_of(spec) -> dict | None:
    """How a modality's intensities become grey levels: its own setting, else the defaults by name."""
    return spec.intensity or DEFAULT_INTENSITY.get(spec.name)


@dataclass(frozen=True)
class GreyLevels:
    """How one volume's intensities become grey levels 0..255, found once for the whole volume and applied to
    any part of it (slice batch by slice batch: no whole-volume float copy). The NaN policy: non-finite voxels
    (NaN, inf) take the volume's smallest finite value, and are counted (``bad``)."""

    low: float
    scale: float
    fill: float | None  # the smallest finite value, where the volume has non-finite voxels
    bad: int

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        x = values.float()
        if self.fill is not None:
            x = torch.where(torch.isfinite(x), x, torch.tensor(self.fill, dtype=x.dtype))
        return (x - self.low).mul_(self.scale).clamp_(0, 255)  # a new tensor: the volume is never changed


def grey_levels(volume: torch.Tensor, intensity: dict | None) -> GreyLevels:
    """The grey-level mapping of a volume (any dtype, any strides); a volume with no finite voxel is refused.
    Window: fixed; percentiles: of a seeded sample of a million voxels (fast, free of stride aliasing); else the
    finite minimum and maximum. Everything is read slab by slab (isfinite and min make volume-sized temporaries)."""
    slabs = volume.split(16, dim=-1)
    bad = sum(slab.numel() - int(torch.count_nonzero(torch.isfinite(slab))) for slab in slabs)
    if bad == volume.numel():
        raise VolumeError("the volume has no finite voxel (all NaN or infinite)")
    fill = min(float(slab[torch.isfinite(slab)].min()) for slab in slabs if torch.isfinite(slab).any()) \
        if bad else None
    if intensity and "window" in intensity:
        low, high = intensity["window"]
    elif intensity and "percentiles" in intensity:
        values = volume
        if volume.numel() > 2_000_000:  # the same voxels as flatten()[pick], gathered without the copy
            pick = torch.randint(volume.numel(), (1_000_000,), generator=torch.Generator().manual_seed(0))
            values = volume[tuple(torch.as_tensor(i) for i in np.unravel_index(pick.numpy(), tuple(volume.shape)))]
        values = values.flatten().float()
        if fill is not None:
            values = torch.where(torch.isfinite(values), values, torch.tensor(fill))
        low, high = torch.quantile(values, torch.tensor(intensity["percentiles"]) / 100).tolist()
    else:
        finite_slabs = [slab[torch.isfinite(slab)] for slab in slabs]
        low = min(float(f.min()) for f in finite_slabs if f.numel())
        high = max(float(f.max()) for f in finite_slabs if f.numel())
    return GreyLevels(float(low), 255.0 / max(high - low, 1e-6), fill, bad)


@dataclass(frozen=True)
class GreyVolume:
    """An oriented volume's grey levels, made part by part as they are read: the second stage crops the slices
    and reads them a batch at a time, so no float copy of the whole volume (4 bytes a voxel) is ever made."""

    data: torch.Tensor  # [rows, columns, slices], any dtype, any strides
    levels: GreyLevels

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def crop(self, rows: slice, columns: slice) -> "GreyVolume":
        return GreyVolume(self.data[rows, columns], self.levels)

    def slices(self, zs) -> torch.Tensor:
        """Grey levels (float, 0..255) of the slices ``zs``: [rows, columns, len(zs)]."""
        return self.levels(self.data[..., zs])


def to_grey_levels(volume: torch.Tensor, intensity: dict | None) -> torch.Tensor:
    """Volume intensities -> float 0..255 as the model expects of each channel."""
    return grey_levels(volume, intensity)(volume)


def grey_volume(oriented: Oriented, spec) -> tuple[torch.Tensor, int]:
    """(grey levels 0..255 of the oriented volume for this modality, number of non-finite voxels replaced)."""
    levels = grey_levels(oriented.data, intensity_of(spec))
    return levels(oriented.data), levels.bad


# ---- fitting slices to the network's input --------------------------------------------------------
def fitted_size(shape: tuple[int, int], size: int, spacing=None, pixel_mm: float | None = None) -> tuple[int, int]:
    """(height, width) that a slice of ``shape`` takes inside the square input of side ``size``: its longer side
    at ``size``; or, with ``pixel_mm`` and the slice's ``spacing`` (mm per row, per column), each side at
    ``pixel_mm`` millimetres per pixel (so non-square pixels come out square), shrunk to fit only where the
    field of view is wider than ``size * pixel_mm``."""
    h, w = shape
    if pixel_mm is None or spacing is None:
        scale = size / max(h, w)
        return max(1, round(h * scale)), max(1, round(w * scale))
    mh, mw = h * float(spacing[0]) / pixel_mm, w * float(spacing[1]) / pixel_mm
    shrink = min(1.0, size / max(mh, mw))
    return max(1, min(size, round(mh * shrink))), max(1, min(size, round(mw * shrink)))


def fit_to_square(images: torch.Tensor, size: int, mode: str = "bilinear",
                  fitted: tuple[int, int] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, C, H, W] -> [B, C, size, size]: resized to ``fitted`` (default ``fitted_size``'s longer side at
    ``size``), zero-padded bottom/right (SAM's convention, so nothing is distorted). Returns the resized
    (unpadded) height and width too. ``mode="nearest"`` for label masks."""
    h, w = images.shape[-2:]
    nh, nw = fitted or fitted_size((h, w), size)
    if mode == "nearest":
        x = F.interpolate(images, (nh, nw), mode="nearest-exact")
    else:
        x = F.interpolate(images, (nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    return F.pad(x, (0, size - nw, 0, size - nh)), (nh, nw)


def probabilities_on_slice(logits: torch.Tensor, size: int, fitted: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Square logits at any resolution -> probabilities on the slice (``fit_to_square`` undone): brought to the
    input size, cropped to the fitted slice and resized back (as SAM does)."""
    logits = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits[..., : fitted[0], : fitted[1]], shape, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits).cpu()


def model_input(grey: torch.Tensor, fitted: tuple[int, int], normalise) -> torch.Tensor:
    """Fitted grey slices [B, 1|3, S, S] -> the model's input [B, 3, S, S]: normalised, and the padding set
    to 0 after normalisation, as SAM and the released code pad (a neutral, not a black, border)."""
    x = normalise(grey.expand(-1, 3, -1, -1))
    nh, nw = fitted
    x[..., nh:, :] = 0
    x[..., :, nw:] = 0
    return x
