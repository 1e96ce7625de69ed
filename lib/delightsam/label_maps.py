"""Label maps: per-structure probabilities combined into one map, a structure's mask (a whole with its parts),
a map's values brought to label ids, and the 3-D clean-up (largest component, holes filled)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import FillHoles, MapLabelValue
from scipy import ndimage

from .box_atlas import mask_extent
from .config import Structure


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


def labelled_voxels(labels: torch.Tensor, slices: int = 16):
    """The labelled voxels of a label map [rows, columns, slices], ``slices`` slices at a time: per slab, their
    (rows, columns, slices) indices in the whole map and their values. A rule that looks up where each labelled
    voxel lies then costs what the structures take rather than the volume (a label map is mostly background), in
    the memory of one slab; ``labels[index] = 0`` with a subset of the indices removes voxels."""
    for z0 in range(0, labels.shape[2], slices):
        rows, columns, zs = torch.nonzero(labels[..., z0: z0 + slices]).unbind(1)
        index = (rows, columns, zs + z0)
        yield index, labels[index]


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


def close_wholes(labels: torch.Tensor, structures: list[Structure], voxel_ml: float) -> list[str]:
    """In place, on a label map [rows, columns, slices]: each whole structure (one with parts: the brain with grey
    and white matter) is one closed object. Its largest connected component is kept, with the parts in it; its
    holes, in 3-D and on each slice, become the whole (a lesion or ventricle the network left out); what is outside
    it is removed (a speck of scalp). Structures without parts are untouched. Returns notes of what changed
    (``voxel_ml``: millilitres a voxel)."""
    notes = []
    volume = labels.numpy()  # shares the tensor's memory: written in place
    for s in structures:
        mask = structure_mask(volume, s) if s.parts else None
        region = largest_region(mask) if mask is not None else None
        if region is None:
            continue
        # within the kept part's extent, one voxel wider in-plane so that each slice's edge is background
        box = tuple(slice(max(e.start - 1, 0), e.stop + 1) if i < 2 else e for i, e in enumerate(region.extent))
        kept = np.zeros(mask[box].shape, dtype=bool)
        kept[tuple(slice(e.start - b.start, e.stop - b.start) for e, b in zip(region.extent, box))] = region.mask
        # not another structure's voxels; a speck of the whole floating in a hole is part of the hole
        holes = slice_holes_filled(kept) & ~kept & ((volume[box] == 0) | mask[box])
        outside = int(np.count_nonzero(mask)) - region.sum()
        mask[box] &= ~kept
        volume[mask] = 0  # the whole's labels outside its kept part
        volume[box][holes] = s.label
        holes &= ~mask[box]  # (the notes count what was not the whole before)
        if outside or holes.any():
            notes.append(f"{s.name} closed as one object: {outside * voxel_ml:.1f} mL outside its largest part "
                         f"removed, {np.count_nonzero(holes) * voxel_ml:.1f} mL of holes filled")
    return notes


def slice_holes_filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` [rows, columns, slices] with the holes of each slice filled: the background that does not reach the
    slice's edge (4-connected within the slice). A hole enclosed in 3-D is enclosed on each of its slices, so this
    fills those too; one labelling of the whole volume, not a fill per slice."""
    within_slice = np.zeros((3, 3, 3), dtype=bool)
    within_slice[:, :, 1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    parts, _ = ndimage.label(~mask, within_slice)
    edge = np.unique(np.concatenate([parts[[0, -1]].ravel(), parts[:, [0, -1]].ravel()]))
    return mask | ((parts > 0) & ~np.isin(parts, edge))


@dataclass(frozen=True)
class Region:
    """A structure's largest connected component, kept within its own bounding box: a mask of the whole scan per
    structure would cost a byte a voxel each (5 bytes a voxel for the CT organs)."""

    mask: np.ndarray  # bool, the component within ``extent``
    extent: tuple[slice, slice, slice]  # where it lies in the label map
    shape: tuple[int, ...]  # the label map's

    def full(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=bool)
        out[self.extent] = self.mask
        return out

    def sum(self) -> int:
        return int(np.count_nonzero(self.mask))

    def profiles(self) -> tuple[np.ndarray, np.ndarray]:
        """([slices, rows], [slices, columns]): whether the region has a voxel in each row, and each column, of each
        slice of a [rows, columns, slices] map."""
        rows = np.zeros((self.shape[2], self.shape[0]), dtype=bool)
        columns = np.zeros((self.shape[2], self.shape[1]), dtype=bool)
        r, c, z = self.extent
        rows[z, r], columns[z, c] = self.mask.any(1).T, self.mask.any(0).T
        return rows, columns


def structure_regions(labels: torch.Tensor, structures: list[Structure], min_voxels: int = 20) -> list[Region | None]:
    """Per structure, the ``Region`` of its largest 3-D connected component in a label map; None where the structure
    is absent (or only specks of fewer than ``min_voxels``)."""
    volume = np.asarray(labels)
    regions = []
    for s in structures:
        mask = structure_mask(volume, s)
        region = largest_region(mask) if np.count_nonzero(mask) >= min_voxels else None
        del mask
        regions.append(region if region is not None and region.sum() >= min_voxels else None)
    return regions


FULL_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26 neighbours, as MONAI's KeepLargestConnectedComponent


def largest_region(mask: np.ndarray) -> Region | None:
    """A mask's largest 26-connected component (None: an empty mask). Labelled within the mask's extent only:
    labelling a whole 512x512x100 volume per structure took seconds of the second stage."""
    extent = mask_extent(mask)
    if extent is None:
        return None
    components, _ = ndimage.label(mask[extent], structure=FULL_CONNECTIVITY)
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = components == int(sizes.argmax())
    del components
    tight = mask_extent(largest)
    # a copy, not a view, which would keep the array of the mask's whole extent alive
    return Region(largest[tight].copy(), tuple(slice(e.start + t.start, e.start + t.stop) for e, t in zip(extent, tight)),
                  tuple(mask.shape))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """A mask's largest 26-connected component, as a mask of the same shape."""
    region = largest_region(mask)
    return region.full() if region is not None else np.zeros(mask.shape, dtype=bool)


def relabel(label: torch.Tensor, values: dict[int, int]) -> torch.Tensor:
    """A label map's values as label ids (int64): ``values`` maps each to its id; any other value is 0 (MONAI's
    MapLabelValue over the values present, so that no value, however large, sizes a table)."""
    present = torch.unique(label).tolist()
    mapping = MapLabelValue(orig_labels=present, target_labels=[values.get(int(v), 0) for v in present],
                            dtype=torch.int64)
    return mapping(label.as_subclass(torch.Tensor))

