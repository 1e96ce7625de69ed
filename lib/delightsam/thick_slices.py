"""Thick slices made from a thin volume, as a clinical series arrives: a 5 mm axial T1 from a 1 mm head.

Each thick slice is the exact mean of the thin volume over its slab (a box slice profile: what a slice of that
thickness integrates; a slab may cut thin voxels, which count by the part inside it), placed at the slab's centre; a
label map's slice is the label covering most of the slab. The model card's "5 mm axial" conditions of a held-out head
(``held_out_conditions``) and the thick-slice training volumes of ``scripts/train_mr_heads.py`` are made by this. The result is stored in RAS order (``as_closest_canonical``);
any other storage order is a separate reorientation."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from .geometry import WORLD_AXIS_OF_PLANE as WORLD_AXES  # the RAS axis a plane's slices are stacked along


def thick_slices(image: nib.Nifti1Image, plane: str, thickness: float, label: bool = False) -> nib.Nifti1Image:
    """``image`` (a 3-D NIfTI) as slices of ``plane`` ``thickness`` mm thick, in RAS order; ``label``: a label map
    (each slice takes the id that covers most of its slab), else grey levels (the slab's mean)."""
    if plane not in WORLD_AXES:
        raise ValueError(f"plane must be one of {sorted(WORLD_AXES)}, got {plane!r}")
    canonical = nib.as_closest_canonical(image)
    axis = WORLD_AXES[plane]
    step = float(canonical.header.get_zooms()[axis])
    if thickness <= step:
        raise ValueError(f"{thickness} mm slices are not thicker than the volume's {step:g} mm")
    data = np.asanyarray(canonical.dataobj)
    ratio = thickness / step
    count = int(data.shape[axis] // ratio)
    edges = np.arange(count + 1) * ratio  # the slabs' edges, in thin voxels from the volume's first edge
    centres = edges[:-1] + ratio / 2 - 0.5  # the slabs' centres, in thin-voxel coordinates
    if label:
        ids = np.unique(data)
        # the id that covers most of the slab
        shares = np.stack([_slab_means((data == i).astype(np.float32), edges, axis) for i in ids])
        out = ids[shares.argmax(0)].astype(data.dtype)
    else:
        out = _slab_means(data, edges, axis).astype(np.float32)
    affine = canonical.affine.copy()
    affine[:3, 3] += affine[:3, axis] * centres[0]
    affine[:3, axis] *= ratio
    result = nib.Nifti1Image(out, affine)
    result.set_qform(affine, code=1)
    result.set_sform(affine, code=1)
    return result


def reordered(image: nib.Nifti1Image, codes: tuple[str, str, str]) -> nib.Nifti1Image:
    """The same voxels stored in another axis order (``codes``, nibabel's axis codes such as ("S", "L", "P")): what a
    test of storage orders, or a benchmark's second condition, needs."""
    ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine),
                                           nib.orientations.axcodes2ornt(codes))
    return image.as_reoriented(ornt)


def held_out_conditions(image: nib.Nifti1Image, label: nib.Nifti1Image) -> dict[str, tuple]:
    """The conditions a held-out head is measured in (the model card's MR table, its test and its benchmark): as
    stored, in another storage order (P-I-R), and as 5 mm axial slices in RAS and in S-L-P order; each an (image,
    label) pair. The reordered ones hold the same voxels: a second storage order, not a second head."""
    thick = thick_slices(image, "axial", 5.0), thick_slices(label, "axial", 5.0, label=True)
    return {"stored": (image, label),
            "pir": tuple(reordered(v, ("P", "I", "R")) for v in (image, label)),
            "5mm_ras": thick,
            "5mm_slp": tuple(reordered(v, ("S", "L", "P")) for v in thick)}


def _slab_means(data: np.ndarray, edges: np.ndarray, axis: int) -> np.ndarray:
    """The exact mean of ``data`` along ``axis`` between consecutive fractional ``edges`` (thin voxel i spans [i, i+1]):
    differences of the running sum, interpolated linearly at the edges (it is linear within a voxel)."""
    shape = list(data.shape)
    shape[axis] = 1
    running = np.concatenate([np.zeros(shape), np.cumsum(data, axis=axis, dtype=np.float64)], axis=axis)
    at_edges = _sample(running, edges, axis)
    return np.diff(at_edges, axis=axis) / (edges[1] - edges[0])


def _sample(data: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """``data`` linearly interpolated at fractional ``positions`` along ``axis``."""
    low = np.clip(np.floor(positions).astype(int), 0, data.shape[axis] - 1)
    high = np.clip(low + 1, 0, data.shape[axis] - 1)
    weight = (positions - low).reshape([-1 if a == axis else 1 for a in range(data.ndim)])
    return np.take(data, low, axis=axis) * (1 - weight) + np.take(data, high, axis=axis) * weight
