"""Prompt-free segmentation of a whole 3-D volume, slice by slice.

One code path for everything that segments volumes (the MONAI Label app, evaluation, training's
validation): the volume goes through ``geometry`` (its plane's canonical layout, grey levels per modality,
the NaN policy), the slices run through the 2-D network in batches, each batch's per-structure probabilities
become its slices of one uint8 label map (memory bounded by the batch, not the volume), and the label map is
brought back to the input's own grid.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data import ITKReader
from monai.transforms import FillHoles, LoadImage
from scipy import ndimage
from torch import nn

from .box_atlas import box_of, context_boxes, mask_extent
from .config import Modality, Structure
from .geometry import Oriented, VolumeError, as_volume, fit_to_square, fitted_size, grey_levels, intensity_of, model_input, orient, spacing_of
from .model import DeLightSAM
from .normalization import get_normalization
from .uncertainty import DoubtMeter


@dataclass
class VolumeResult:
    labels: np.ndarray  # uint8, the input's shape, label ids of the modality's structures (0 = background)
    modality: str
    slice_axis: int  # the stored axis the slices ran along
    label_names: dict[str, int]
    non_finite_voxels: int = 0  # voxels that were NaN/inf and were treated as the volume's minimum
    notes: list[str] = field(default_factory=list)
    plane: str = "axial"  # the acquisition plane the slices were cut in
    doubt: dict | None = None  # uncertainty.DoubtMeter.summary() of the first stage, when asked for


def image_reader(path) -> str:
    """nibabel for NIfTI (ITK's NIfTI reader turns NaN into 0, hiding corrupt volumes), ITK for the rest
    (NRRD, DICOM series folders)."""
    return "NibabelReader" if str(path).endswith((".nii", ".nii.gz")) else "ITKReader"


@dataclass
class DicomSeries:
    folder: str
    name: str  # the series identifier as MONAI's ITKReader names it (its ``series_name``)
    files: list[str]


def dicom_series(folder) -> DicomSeries:
    """The DICOM series in ``folder`` or below it (a zipped series unpacks into a folder of its own) with the
    most files. Several series of that size, or none, is an error that says so."""
    import itk

    found = []
    for root, _, files in sorted(os.walk(folder)):
        if not any(_looks_like_dicom(Path(root) / f) for f in files[:20]):
            continue  # a folder of something else: ITK would only warn
        names = itk.GDCMSeriesFileNames.New()
        names.SetUseSeriesDetails(True)  # exactly as MONAI's ITKReader, so that its series_name matches
        names.AddSeriesRestriction("0008|0021")
        names.SetDirectory(root)
        found += [DicomSeries(root, uid, [str(f) for f in names.GetFileNames(uid)]) for uid in names.GetSeriesUIDs()]
    found = sorted((s for s in found if s.files), key=lambda s: -len(s.files))
    if not found:
        raise ValueError(f"no DICOM series in {Path(folder).name!r} or the folders inside it")
    if len(found) > 1 and len(found[1].files) == len(found[0].files):
        tied = [f"{Path(s.folder).relative_to(folder)}: {s.name.split('.')[-1][:12]}" for s in found
                if len(s.files) == len(found[0].files)]
        raise ValueError(f"{Path(folder).name!r} holds {len(tied)} DICOM series of {len(found[0].files)} files each "
                         f"({'; '.join(tied)}): send one series at a time")
    return found[0]


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM" or path.suffix.lower() == ".dcm"
    except OSError:
        return False


# what reading an image or label can raise for a bad file (ITK: RuntimeError; a label off the image's grid:
# ValueError; nibabel's header reader: ImageFileError; a cut gzip stream: EOFError or zlib.error)
READ_ERRORS = (ValueError, RuntimeError, OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError)


def read_error(error: BaseException) -> str:
    """A reader's error as one line for a message: its first, at most 300 characters (MONAI appends every
    reader's traceback)."""
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def read_volume(path, dtype=np.float32):
    """A volume as MONAI reads it for the app: MetaTensor [X, Y, Z] with its (RAS) affine. A folder is read as
    the largest DICOM series in it or below it. ``dtype``: None keeps the file's own type."""
    if Path(path).is_dir():
        series = dicom_series(path)
        image = LoadImage(image_only=True, reader=ITKReader(series_name=series.name), dtype=dtype)(series.folder)
    else:
        image = LoadImage(image_only=True, reader=image_reader(path), dtype=dtype)(str(path))
    if image.dim() == 4 and 1 in (image.shape[0], image.shape[-1]):  # one 3-D volume in a 4-D file
        image = image[0] if image.shape[0] == 1 else image[..., 0]
    return image


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid: its shape [X, Y, Z] and RAS affine, as ``read_volume`` would give them."""

    shape: tuple[int, ...]
    affine: np.ndarray


def read_grid(path) -> Grid:
    """A volume file's grid from its header alone (nibabel for NIfTI, ITK for the rest, with MONAI's LPS-to-RAS
    affine), without reading its voxels; a DICOM series folder is read whole."""
    if Path(path).is_dir():
        image = read_volume(path, dtype=None)
        return Grid(tuple(image.shape), np.asarray(image.affine, dtype=np.float64))
    if image_reader(path) == "NibabelReader":  # its affine is the 3 spatial axes' whatever the file's dimensions
        header = nib.load(str(path))
        shape, affine = tuple(int(n) for n in header.shape), np.asarray(header.affine, dtype=np.float64)
        return Grid(shape[:3] if len(shape) == 4 and shape[-1] == 1 else shape, affine)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    shape, dims = tuple(int(n) for n in reader.GetSize()), reader.GetDimension()
    lps = np.eye(dims + 1)
    lps[:dims, :dims] = np.reshape(reader.GetDirection(), (dims, dims)) @ np.diag(reader.GetSpacing())
    lps[:dims, dims] = reader.GetOrigin()
    affine = np.diag([-1.0, -1.0] + [1.0] * (dims - 1)) @ lps
    if len(shape) == 4 and shape[-1] == 1:  # one 3-D volume in a 4-D file, as read_volume takes it
        shape, affine = shape[:3], np.delete(np.delete(affine, 3, axis=0), 3, axis=1)
    return Grid(shape, affine)


def read_label(path, image, dtype=np.float32):
    """A label map read onto ``image``'s voxel grid (a volume, or a ``Grid``): a label stored in another axis order
    or direction (a NIfTI label of a DICOM series, say) is flipped and permuted by the two affines; any other
    difference of grid is an error that names both. ``dtype``: None keeps the file's own type."""
    import nibabel.orientations as orientations

    label = read_volume(path, dtype=dtype)
    if tuple(label.shape) == tuple(image.shape) and np.allclose(label.affine, image.affine, atol=1e-3):
        return label
    have = orientations.io_orientation(np.asarray(label.affine))
    want = orientations.io_orientation(np.asarray(image.affine))
    transform = orientations.ornt_transform(have, want)
    data = orientations.apply_orientation(np.asarray(label.as_subclass(torch.Tensor)), transform)
    affine = np.asarray(label.affine) @ orientations.inv_ornt_aff(transform, label.shape)
    spacing = max(spacing_of(image))
    if data.shape != tuple(image.shape) or not np.allclose(affine, np.asarray(image.affine), atol=1e-2 * spacing):
        raise ValueError(f"label {Path(path).name} is not on the image's grid: shape {list(label.shape)} and affine "
                         f"{np.round(np.asarray(label.affine), 3).tolist()} vs the image's {list(image.shape)} and "
                         f"{np.round(np.asarray(image.affine), 3).tolist()}")
    return torch.from_numpy(np.ascontiguousarray(data))


class FittedSliceNetwork(nn.Module):
    """The 2-D step of whole-volume inference: slices [b, C, H, W] -> probabilities [b, S, H, W].

    Channel 0 holds grey levels; further channels (a reference label map, for prompted baselines) are
    carried along. Each slice is resized so that its longer side is the input size, or to ``pixel_mm``
    millimetres per pixel (``geometry.fitted_size``), and padded bottom/right (so no slice is distorted);
    ``logits`` gives square logits at any resolution, which are brought to the input size, cropped to the slice
    and resized back, as SAM does."""

    def __init__(self, size: int, device: torch.device, pixel_mm: float | None = None) -> None:
        super().__init__()
        self.size, self.device, self.pixel_mm = size, device, pixel_mm

    def logits(self, grey: torch.Tensor, fitted: tuple[int, int], guide: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, slices: torch.Tensor, spacing=None) -> torch.Tensor:
        """``spacing``: the slices' mm per row and per column (used with ``pixel_mm``)."""
        b, c, h, w = slices.shape
        slices = slices.float().to(self.device)
        fitted = fitted_size((h, w), self.size, spacing, self.pixel_mm)
        grey, fitted = fit_to_square(slices[:, :1], self.size, fitted=fitted)
        guide = fit_to_square(slices[:, 1:], self.size, mode="nearest", fitted=fitted)[0] if c > 1 else None
        return probabilities_on_slice(self.logits(grey, fitted, guide), self.size, fitted, (h, w))


def probabilities_on_slice(logits: torch.Tensor, size: int, fitted: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Square logits at any resolution -> probabilities on the slice: brought to the input size, cropped to the
    fitted slice and resized back (as SAM does)."""
    logits = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
    logits = F.interpolate(logits[..., : fitted[0], : fitted[1]], shape, mode="bilinear", align_corners=False)
    return torch.sigmoid(logits).cpu()


class SliceNetwork(FittedSliceNetwork):
    """De-LightSAM on grey slices: replicated to three channels and normalised as the checkpoint expects."""

    def __init__(self, model: DeLightSAM, modality: str) -> None:
        super().__init__(model.config.img_size, next(model.parameters()).device, model.config.modality(modality).pixel_mm)
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


def clean_up(labels: torch.Tensor, structures: list[Structure]) -> torch.Tensor:
    """Per structure mask (a whole with its parts, see ``structure_mask``): keep the largest connected
    component and fill its holes (3-D). Wholes are drawn first and their parts over them, so
    a part enclosed by its whole (white matter in the brain) is never filled over. A hole is filled only where
    nothing was labelled, by the smallest structure that encloses it (white matter's hole goes to the white
    matter, not to the grey matter around both)."""
    out = torch.zeros_like(labels)
    cleaned = {}
    for s in structures:
        mask = structure_mask(labels, s)
        if mask.any():
            largest = torch.from_numpy(largest_component(mask.numpy()))[None].to(torch.uint8)
            cleaned[s.label] = (mask, torch.as_tensor(FillHoles(applied_labels=[1])(largest))[0].bool())
    wholes = [s for s in structures if s.parts and s.label in cleaned]
    others = sorted((s for s in structures if not s.parts and s.label in cleaned), key=lambda s: int(cleaned[s.label][1].sum()))
    for s in wholes:
        mask, filled = cleaned[s.label]
        out[filled & (mask | (labels == 0))] = s.label
    taken = torch.zeros_like(labels, dtype=torch.bool)
    for s in others:
        mask, filled = cleaned[s.label]
        claim = filled & (mask | ((labels == 0) & ~taken))
        out[claim] = s.label
        taken |= claim
    return out


PROMPTS = ("3d", "slice")


@torch.inference_mode()
def segment_volume(model: DeLightSAM, volume, modality: str, spacing=None, batch_size: int = 8,
                   threshold: float = 0.5, cleanup: bool = False, progress: bool = False, affine=None,
                   refiner: DeLightSAM | None = None, prompts: str = "3d", doubt: bool = False,
                   refine_every_mm: float | None = None, every_mm: float | None = None) -> VolumeResult:
    """Label map of a 3-D volume on its own grid. ``volume``: a MetaTensor (its affine gives the orientation),
    or an [X, Y, Z] array or tensor with ``affine`` or ``spacing`` (else taken as stored RAS, 1 mm).

    With a ``refiner`` (a model with box prompts, such as ``foundation.foundation_model``), inference has two
    stages: ``model`` segments every slice prompt-free, then each structure's largest connected component
    becomes its automatic prompt, one 3-D box (``prompts="3d"``: the same box on every slice of its extent,
    and one slice beyond) or a box per slice (``"slice"``), and the refiner decodes the slices that have one
    (with ``refine_every_mm``, one slice in about that many millimetres, the others interpolated: ``_refine``).
    ``every_mm``: the same for the first stage (its probabilities interpolated between decoded slices), so that its
    cost follows the anatomy's extent rather than the number of slices.
    ``doubt``: also measure how unsure the (first-stage) model is, per structure (``uncertainty``)."""
    spec = model.config.modality(modality)
    if refiner is not None and prompts not in PROMPTS:
        raise ValueError(f"prompts must be one of {PROMPTS}, got {prompts!r}")
    refine = None if refiner is None else (
        lambda grey, coarse, oriented: _refine(refiner, spec, grey, coarse, prompts, batch_size, threshold,
                                               refine_stride(refine_every_mm, oriented.spacing[2]), oriented))
    return segment_with(SliceNetwork(model, modality), volume, spec, spacing, batch_size, threshold, cleanup, progress,
                        affine=affine, refine=refine, doubt=doubt, every_mm=every_mm)


@torch.inference_mode()
def segment_with(network: FittedSliceNetwork, volume, spec: Modality, spacing=None, batch_size: int = 8,
                 threshold: float = 0.5, cleanup: bool = False, progress: bool = False, guide=None,
                 affine=None, refine=None, doubt: bool = False, every_mm: float | None = None) -> VolumeResult:
    """``segment_volume`` with any 2-D network that predicts ``spec``'s structures (the evaluation's
    baselines); ``guide``, a label map on the volume's grid, reaches the network as a second channel;
    ``refine(grey, coarse labels, the oriented volume) -> (labels, notes)`` is a second stage; ``every_mm``: the
    network sees one slice in about that many millimetres (and the last), those between take interpolated
    probabilities (see ``segment_volume``)."""
    if spacing is not None and len(spacing) != 3:
        raise VolumeError(f"expected 3 spacings for a 3-D volume, got {list(spacing)}")
    oriented = orient(volume, affine, spacing)
    levels = grey_levels(oriented.data, intensity_of(spec))  # the volume's mapping; applied batch by batch
    notes = [f"{levels.bad} NaN/infinite voxels were set to the volume's minimum"] if levels.bad else []
    guide = oriented.to_layout(as_volume(guide)) if guide is not None else None
    label_ids, parts = [s.label for s in spec.structures], part_indices(spec.structures)
    labels = torch.zeros(oriented.data.shape, dtype=torch.uint8)
    meter = DoubtMeter([s.name for s in spec.structures], threshold) if doubt else None
    depth = labels.shape[2]
    keys = keyframes(list(range(depth)), refine_stride(every_mm, oriented.spacing[2]))

    def decoded():  # (keyframe, probabilities [S, rows, columns]), batch by batch: no whole-volume float copy
        for batch in _batches(len(keys), batch_size, progress):
            zs = keys[batch]
            stack = levels(oriented.data[..., zs])[None]
            if guide is not None:
                stack = torch.cat([stack, guide[..., zs].float()[None]])
            probabilities = network(stack.permute(3, 0, 1, 2), oriented.spacing[:2])  # [b, S, rows, columns]
            if meter is not None:
                meter.add(probabilities)
            yield from zip(zs, probabilities)

    for z, probabilities in interpolated(decoded(), set(range(depth))):
        labels[..., z] = combine(probabilities, label_ids, threshold, parts)
    if refine is not None:  # the second stage crops the volume's grey levels around its boxes
        labels, refined = refine(levels(oriented.data), labels, oriented)
        notes.append(refined)
    if cleanup:
        labels = clean_up(labels, spec.structures)
    return VolumeResult(oriented.to_input(labels.numpy()), spec.name, oriented.slice_axis,
                        {s.name: s.label for s in spec.structures}, levels.bad, notes, oriented.plane,
                        meter.summary() if meter is not None else None)


def interpolated(decoded, wanted: set[int]):
    """(keyframe, probabilities) in slice order -> (slice, probabilities) for each keyframe and each slice of
    ``wanted`` between two keyframes, which takes their probabilities interpolated linearly: organs change little over
    a few millimetres."""
    previous = None
    for z, probabilities in decoded:
        if previous is not None:
            for y in range(previous[0] + 1, z):
                if y in wanted:
                    yield y, torch.lerp(previous[1], probabilities, (y - previous[0]) / (z - previous[0]))
        yield z, probabilities
        previous = (z, probabilities)


def _batches(depth: int, batch_size: int, progress: bool = False):
    """Slice index ranges of at most ``batch_size`` slices."""
    starts = range(0, depth, max(int(batch_size), 1))
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="slices", unit="batch")
    for z0 in starts:
        yield slice(z0, min(z0 + batch_size, depth))


# ---- the second stage: box prompts from the first -------------------------------------------------------
def structure_regions(labels: torch.Tensor, structures: list[Structure], min_voxels: int = 20) -> list[np.ndarray | None]:
    """Per structure, the mask ([rows, columns, slices], numpy) of its largest 3-D connected component in a label
    map; None where the structure is absent (or only specks of fewer than ``min_voxels``)."""
    volume = np.asarray(labels)
    regions = []
    for s in structures:
        mask = structure_mask(volume, s)
        region = largest_component(mask) if np.count_nonzero(mask) >= min_voxels else None
        regions.append(region if region is not None and np.count_nonzero(region) >= min_voxels else None)
    return regions


FULL_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26 neighbours, as MONAI's KeepLargestConnectedComponent


def largest_component(mask: np.ndarray) -> np.ndarray:
    """A mask's largest 26-connected component. Labelled within the mask's extent only: labelling a whole
    512x512x100 volume per structure took seconds of the second stage."""
    out = np.zeros(mask.shape, dtype=bool)
    extent = mask_extent(mask)
    if extent is None:
        return out
    components, _ = ndimage.label(mask[extent], structure=FULL_CONNECTIVITY)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    out[extent] = components == int(sizes.argmax())
    return out


def slice_boxes(regions: list, prompts: str, depth: int) -> torch.Tensor:
    """[slices, S, 4] boxes (x0, y0, x1, y1 = column, row, column, row on the slice; NaN: none) from the
    structures' regions ([rows, columns, slices] masks): one 3-D box over each region's extent and one slice beyond
    it, or each slice's own box."""
    from .sp_generator import boxes_from_profiles

    boxes = torch.full((depth, len(regions), 4), float("nan"))
    for k, region in enumerate(regions):
        if region is None:
            continue
        region = np.asarray(region)  # numpy from structure_regions; a tensor from a caller of its own
        per_slice = boxes_from_profiles(torch.from_numpy(region.any(1).T), torch.from_numpy(region.any(0).T))
        if prompts == "slice":
            boxes[:, k] = per_slice
            continue
        present = torch.isfinite(per_slice).all(-1).nonzero()[:, 0]
        z0, z1 = max(int(present.min()) - 1, 0), min(int(present.max()) + 1, depth - 1)
        found = per_slice[present]
        box = torch.stack([found[:, 0].min(), found[:, 1].min(), found[:, 2].max(), found[:, 3].max()])
        boxes[z0: z1 + 1, k] = box
    return boxes


def context_prompts(boxes: torch.Tensor, regions: list, spec: Modality, oriented: Oriented) -> tuple[str, list[int]]:
    """Gives each structure whose found region the modality's box atlas contradicts the atlas's 3-D box instead
    (``box_atlas.context_boxes``; ``boxes`` [slices, S, 4] changed in place); returns a note naming them and the
    indices of those that got a box."""
    if not spec.box_atlas:
        return "", []
    spacing = np.asarray(oriented.spacing, dtype=np.float64)
    found = {s.name: box_of(r, spacing) for s, r in zip(spec.structures, regions) if r is not None}
    moved, trusted = context_boxes(found, spec.box_atlas, oriented.plane, np.asarray(oriented.data.shape) * spacing)
    for k, s in enumerate(spec.structures):
        if s.name not in moved:
            continue
        boxes[:, k] = float("nan")
        if moved[s.name] is not None:
            low, high = moved[s.name]
            i0 = np.floor(low / spacing).astype(int)
            i1 = np.ceil(high / spacing).astype(int) - 1  # inclusive, as boxes_from_masks
            boxes[i0[2]: i1[2] + 1, k] = torch.tensor([i0[1], i0[0], i1[1], i1[0]], dtype=torch.float32)
    if not moved:
        return "", []
    boxed = [k for k, s in enumerate(spec.structures) if moved.get(s.name) is not None]
    return (f"; boxed where the box atlas puts them relative to {', '.join(trusted)}: {', '.join(moved)}"
            + "".join(f" ({name}: the atlas puts it outside this volume, so it is left out)" for name, b in moved.items()
                      if b is None)), boxed


def refine_stride(every_mm: float | None, slice_mm: float) -> int:
    """Slices from one decoded slice to the next for a decoded slice about every ``every_mm`` millimetres
    (None: every slice)."""
    return 1 if not every_mm else max(1, round(float(every_mm) / float(slice_mm)))


def keyframes(slices: list[int], stride: int) -> list[int]:
    """Every ``stride``-th of ``slices`` (sorted) along each run of consecutive ones, and each run's last: the
    slices the refiner decodes; those between two keyframes take the interpolation of theirs."""
    keys, start = [], None
    for i, z in enumerate(slices):
        if i == 0 or slices[i - 1] != z - 1:
            start = z  # a new run
        if (z - start) % max(int(stride), 1) == 0 or i == len(slices) - 1 or slices[i + 1] != z + 1:
            keys.append(z)
    return keys


# A structure boxed by the atlas gets a loose box, and the foundation decodes a loose box well only with the whole
# slice's context at about this input size per slice (held-out stomach 0.778 in the part at 96, 0.849 so): it is
# decoded there instead, on at most CONTEXT_KEYFRAMES slices (its box spans the scan where the atlas maps it badly).
CONTEXT_SIZE, CONTEXT_KEYFRAMES = 160, 6


def _refine(refiner: DeLightSAM, spec: Modality, grey: torch.Tensor, coarse: torch.Tensor, prompts: str,
            batch_size: int, threshold: float, stride: int, oriented: Oriented) -> tuple[torch.Tensor, str]:
    """The label map [rows, columns, slices] that the refiner draws on the slices that have a box (0 elsewhere).

    The refiner sees only the part of the slices that the boxes (and a margin of 10% of their extent) cover, at
    the scale a whole slice would have at its input size: the same anatomy at the same size in pixels, and an
    input (and a cost) as much smaller as the part is. With ``stride`` k > 1 it decodes every k-th slice of each
    run (``keyframes``), and a slice between two takes their probabilities interpolated linearly: organs change
    little over a few millimetres, and the cost falls k-fold. A structure whose box the modality's box atlas
    contradicts, given the ``oriented`` volume's geometry, is prompted where the atlas puts it (``context_prompts``)
    and decoded on whole slices (``_context_pass``)."""
    from .foundation import resized

    rows, columns, depth = grey.shape
    regions = structure_regions(coarse, spec.structures)
    boxes = slice_boxes(regions, prompts, depth)
    context, boxed = context_prompts(boxes, regions, spec, oriented)
    labels = torch.zeros_like(coarse)
    boxes, atlas_boxes = _split(boxes, boxed)  # those the atlas boxed are decoded on whole slices (_context_pass)
    todo = _boxed_slices(boxes)  # the atlas boxes a structure only relative to one found, which keeps its boxes
    if not todo:
        return labels, "refined no slice: no structure was found to box"
    found = boxes[todo][torch.isfinite(boxes[todo]).all(-1)]
    margin = 0.1 * torch.stack([found[:, 2].max() - found[:, 0].min(), found[:, 3].max() - found[:, 1].min()])
    c0, r0 = (int(v) for v in (torch.stack([found[:, 0].min(), found[:, 1].min()]) - margin).floor().clamp(min=0))
    c1 = int(min(float(found[:, 2].max() + margin[0]), columns - 1))
    r1 = int(min(float(found[:, 3].max() + margin[1]), rows - 1))
    part = grey[r0: r1 + 1, c0: c1 + 1]
    scale = refiner.config.img_size / max(rows, columns)  # as if the whole slice were fitted
    size = min(refiner.config.img_size, max(64, 32 * int(np.ceil(max(part.shape[:2]) * scale / 32))))
    label_ids, parts = [s.label for s in spec.structures], part_indices(spec.structures)

    def draw(z: int, probabilities: torch.Tensor) -> None:  # [S, part rows, part columns]
        labels[r0: r1 + 1, c0: c1 + 1, z] = combine(probabilities, label_ids, threshold, parts)

    offset = torch.tensor([c0, r0, c0, r0], dtype=torch.float32)
    keys = _decode(resized(refiner, size), spec.name, part, boxes - offset, todo, stride, batch_size, draw)
    if boxed:
        context += _context_pass(resized(refiner, CONTEXT_SIZE), spec, grey, labels, atlas_boxes, boxed, stride,
                                 batch_size, threshold)
    kind = "3-D boxes" if prompts == "3d" else "boxes per slice"
    decoded = f"{len(keys)} decoded, the others interpolated; " if len(keys) < len(todo) else ""
    return labels, f"refined {len(todo)} of {depth} slices with {kind} ({decoded}a {part.shape[0]}x{part.shape[1]} part of each, at input {size}){context}"


def _split(boxes: torch.Tensor, columns: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``boxes`` [slices, S, 4] as two: without the structures ``columns`` (NaN there), and with only them."""
    without, only = boxes.clone(), torch.full_like(boxes, float("nan"))
    without[:, columns], only[:, columns] = float("nan"), boxes[:, columns]
    return without, only


def _boxed_slices(boxes: torch.Tensor) -> list[int]:
    return torch.isfinite(boxes).all(-1).any(-1).nonzero()[:, 0].tolist()


def _decode(model: DeLightSAM, modality: str, grey: torch.Tensor, boxes: torch.Tensor, todo: list[int], stride: int,
            batch_size: int, draw) -> list[int]:
    """Decodes the keyframes of ``todo`` (``keyframes``) of ``grey`` [rows, columns, slices], each fitted to the
    model's input, with ``boxes`` [slices, S, 4] in grey's pixels, and calls ``draw(z, probabilities [S, rows,
    columns])`` for every slice of ``todo``: a keyframe's own, or its two keyframes' interpolated. Returns the
    keyframes."""
    size = model.config.img_size
    scale = size / max(grey.shape[:2])
    normalise, device = get_normalization(model), next(model.parameters()).device
    keys = keyframes(todo, stride)

    def decoded():
        for start in range(0, len(keys), batch_size):
            zs = keys[start: start + batch_size]
            fitted_grey, fitted = fit_to_square(grey[..., zs].permute(2, 0, 1)[:, None].float(), size)
            inputs = model_input(fitted_grey, fitted, normalise).to(device)
            logits = model(inputs, modality, (boxes[zs] * scale).to(device)).low_res_logits
            logits = torch.nan_to_num(logits, neginf=-100.0)  # structures without a box: empty, not NaN after resizing
            yield from zip(zs, probabilities_on_slice(logits, size, fitted, grey.shape[:2]))

    for z, probabilities in interpolated(decoded(), set(todo)):  # between keyframes of a run only: runs end in one
        draw(z, probabilities)
    return keys


def _context_pass(model: DeLightSAM, spec: Modality, grey: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor,
                  boxed: list[int], stride: int, batch_size: int, threshold: float) -> str:
    """Decodes the structures ``boxed`` by the atlas (``boxes`` [slices, S, 4] has only theirs) on whole slices (see
    CONTEXT_SIZE) and draws them in ``labels`` where no other structure is; returns a note."""
    todo = _boxed_slices(boxes)
    stride = max(stride, int(np.ceil(len(todo) / (CONTEXT_KEYFRAMES - 1))))
    ids = torch.tensor([spec.structures[k].label for k in boxed], dtype=labels.dtype)

    def draw(z: int, probabilities: torch.Tensor) -> None:
        best, index = probabilities[boxed].max(dim=0)
        free = (best > threshold) & (labels[..., z] == 0)
        labels[..., z][free] = ids[index[free]]

    keys = _decode(model, spec.name, grey, boxes, todo, stride, batch_size, draw)
    return f"; those decoded on {len(keys)} whole slices at input {model.config.img_size}"
