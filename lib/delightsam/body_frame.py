"""Where a CT's abdominal structures can be, from what any CT shows by its Hounsfield units.

The prompt-free first stage learned organs from one patient's abdomen; on a scan of another field of view it marks
them wherever something looks alike (the heart as liver and spleen, on every slice from the neck down). A CT itself
says where the abdomen cannot be, without a label or a model:

- **outside the body**: the body is the largest object above ``BODY_HU`` on a slice, its holes filled;
- **in a head**: a slice whose bone (above ``BONE_HU``) encloses most of the body is the skull; the abdomen lies
  ``HEAD_CLEARANCE_MM`` or more below the lowest such slice (a small child's neck and thorax);
- **in the thorax above the liver's dome**: where the lungs (air inside the body) fill at least half of their
  largest share of the body's area, the thorax is in view; the diaphragm's domes rise above the level where that
  share falls below half by 15-20 mm (annotated on two unlabelled chest-abdomen CTs, pyradiomics' ``lung2`` and
  TotalSegmentator's angiography example), and ``DOME_MARGIN_MM`` allows three times that;
- **on the wrong side**: the spleen and the left kidney lie on the patient's left of the body's midline, the right
  kidney on the right (``SIDES``; ``SIDE_MARGIN_MM`` allows for a patient lying slightly turned);
- **a speck**: an abdominal structure drawn with less than ``MIN_ML`` in all is not that organ (``drop_specks``;
  chosen knowing what was drawn in the chest of pyradiomics' ``lung1``, the tests' scan of another region); a scan
  shorter than ``SPECK_SPAN_MM`` along the body (a slab, a single slice) may cut an organ to a sliver, and is held to
  that share of it.

None of these constants was chosen on a labelled scan. ``keep_structures`` applies them to a label map in a plane's
layout; ``absent`` says which structures a label map lacks (the result names them as not found).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from nibabel import orientations
from scipy import ndimage

from .geometry import LAYOUTS, _apply
from .label_maps import labelled_voxels

BODY_HU, AIR_HU, BONE_HU = -400.0, -400.0, 300.0
FRAME_MM = 2.0  # the frame is measured at about this in-plane resolution (an outline needs no more)
SKULL_SHARE = 0.6  # a slice whose bone encloses this share of the body's area is in the head
HEAD_CLEARANCE_MM = 200.0
THORAX_SHARE = 0.15  # below this largest share of the body that the lungs take, no thorax is in view
DOME_MARGIN_MM = 60.0
SIDE_MARGIN_MM = 10.0
SMOOTH_MM = 20.0  # the lungs' share per slice is averaged over this many millimetres
# an abdominal structure drawn with less than this volume is a speck, not an organ (the smallest of them, a kidney
# or a spleen, is over 100 mL; specks of 2-5 mL were drawn in the chest of pyradiomics' lung1)
MIN_ML, SPECK_SPAN_MM = 10.0, 100.0
# structures of the abdomen (the frame's slice rules apply to them), and the side of the patient each lies on
ABDOMINAL = {"liver", "spleen", "kidney_right", "kidney_left", "stomach", "pancreas", "gallbladder", "duodenum",
             "adrenal_gland_right", "adrenal_gland_left", "colon", "small_bowel", "urinary_bladder"}
SIDES = {"spleen": "left", "kidney_left": "left", "adrenal_gland_left": "left",
         "kidney_right": "right", "adrenal_gland_right": "right"}
PLS = orientations.axcodes2ornt(("P", "L", "S"))  # rows to the back, columns to the patient's left, slices upward


@dataclass
class BodyFrame:
    """A CT's frame in its axial view ([rows to the back, columns to the patient's left, slices upward])."""

    body: torch.Tensor  # bool, the body's outline filled, on the volume's grid in that view
    abdomen: np.ndarray  # bool per slice: the abdomen may lie here (not in the head, not above the domes)
    midline: np.ndarray  # per slice, the body's middle column (NaN where no body)
    spacing: tuple[float, float, float]
    notes: list[str]
    dome: float | None = None  # the slice of the lung bases (``_dome_level``), None where no thorax is in view

    def slices(self, structures, plane: str, depth: int) -> list[int]:
        """Which of the ``depth`` slices of a plane's layout any of ``structures`` may lie on: for axial slices and
        abdominal structures only, those of the abdomen; else all (another plane's slices each cross the body's
        axis)."""
        if plane != "axial" or any(s.name not in ABDOMINAL for s in structures):
            return list(range(depth))
        return np.flatnonzero(self.abdomen).tolist()

    def keep_side(self, name: str) -> torch.Tensor:
        """[columns, slices]: whether each column of each slice is on ``name``'s side of the midline (``SIDES``)."""
        columns = torch.arange(self.body.shape[1], dtype=torch.float32)[:, None]
        margin = SIDE_MARGIN_MM / self.spacing[1]
        middle = torch.from_numpy(np.nan_to_num(self.midline, nan=self.body.shape[1] / 2)).float()[None]
        # columns run to the patient's left: left of the midline is a larger column
        return columns >= middle - margin if SIDES[name] == "left" else columns <= middle + margin


def _view(plane: str) -> tuple[np.ndarray, np.ndarray]:
    layout = orientations.axcodes2ornt(LAYOUTS[plane])
    return orientations.ornt_transform(layout, PLS), orientations.ornt_transform(PLS, layout)


def body_frame(hu: torch.Tensor, spacing, plane: str) -> BodyFrame:
    """The frame of a CT in a plane's layout (``geometry.Oriented.data``, Hounsfield units; ``spacing`` in mm
    along its rows, columns and slices)."""
    forward, _ = _view(plane)
    axial = _apply(hu, forward)
    order = np.argsort(forward[:, 0])
    spacing = tuple(float(spacing[i]) for i in order)
    step = [max(1, int(round(FRAME_MM / s))) for s in spacing[:2]]
    coarse = axial[::step[0], ::step[1]].numpy()
    if not (coarse < AIR_HU).any():  # no air at all: not Hounsfield units (an offset, unscaled values) or no body edge
        return BodyFrame(torch.ones(axial.shape, dtype=torch.bool), np.ones(axial.shape[2], dtype=bool),
                         np.full(axial.shape[2], np.nan), spacing,
                         [f"no voxel below {AIR_HU:g}: the scan's values may not be Hounsfield units, so the body's "
                          "frame rules nothing out"])
    body = np.zeros(coarse.shape, dtype=bool)
    lung_share, skull = np.zeros(coarse.shape[2]), np.zeros(coarse.shape[2], dtype=bool)
    midline = np.full(coarse.shape[2], np.nan)
    for z in range(coarse.shape[2]):
        body[..., z], lung_share[z], skull[z], midline[z] = _slice_frame(coarse[..., z])
    notes = []
    abdomen = np.ones(coarse.shape[2], dtype=bool)
    if skull.any():
        lowest = int(np.flatnonzero(skull).min())
        heights = (np.arange(coarse.shape[2]) - lowest) * spacing[2]
        abdomen &= heights <= -HEAD_CLEARANCE_MM
        notes.append(f"a head (skull) in slices {lowest}-{int(np.flatnonzero(skull).max())}")
    dome = _dome_level(lung_share, spacing[2])
    if dome is not None:
        limit = dome + DOME_MARGIN_MM / spacing[2]
        abdomen &= np.arange(coarse.shape[2]) <= limit
        notes.append(f"the thorax from slice {int(np.ceil(limit))} up (lung bases at slice {dome:.0f})")
    full = torch.from_numpy(body).repeat_interleave(step[0], 0)[: axial.shape[0]]
    full = full.repeat_interleave(step[1], 1)[:, : axial.shape[1]]
    return BodyFrame(full, abdomen, midline * step[1] + (step[1] - 1) / 2, spacing, notes, dome)


def _slice_frame(hu: np.ndarray) -> tuple[np.ndarray, float, bool, float]:
    """One axial slice: (its body, the share of the body that is air (lungs, bowel gas), whether bone encloses most
    of it, its middle column)."""
    components, n = ndimage.label(hu > BODY_HU)
    if not n:
        return np.zeros(hu.shape, dtype=bool), 0.0, False, np.nan
    body = ndimage.binary_fill_holes(components == np.bincount(components.ravel())[1:].argmax() + 1)
    area = body.sum()
    enclosed = ndimage.binary_fill_holes(body & (hu > BONE_HU)).sum()
    return body, float((body & (hu < AIR_HU)).sum() / area), bool(enclosed >= SKULL_SHARE * area), \
        float(np.average(np.arange(hu.shape[1]), weights=body.sum(0)))  # the largest component is never empty


def _dome_level(lung_share: np.ndarray, slice_mm: float) -> float | None:
    """The slice at which the lungs' share of the body falls below half its largest, going down from that largest
    (the lung bases); None where no thorax is in view."""
    width = max(1, int(round(SMOOTH_MM / slice_mm)))
    share = ndimage.uniform_filter1d(lung_share, width, mode="nearest")
    top = int(share.argmax())
    if share[top] < THORAX_SHARE:
        return None
    below = np.flatnonzero(share[: top + 1] < share[top] / 2)
    return float(below.max()) if len(below) else 0.0


def keep_structures(labels: torch.Tensor, frame: BodyFrame, plane: str, structures) -> list[str]:
    """Removes from ``labels`` (a label map in the plane's layout, changed in place) each labelled voxel where the
    CT's ``frame`` (``body_frame``) says its structure cannot lie (outside the body; an abdominal structure off the
    abdomen's slices; a sided one across the midline); returns notes of what the frame found and removed. The rules
    are looked up where each labelled voxel lies in the frame's axial view, whatever the layout."""
    forward = _view(plane)[0]
    abdomen = torch.from_numpy(frame.abdomen)
    rules = [(torch.tensor(list(s.target_labels), dtype=labels.dtype), s.name in ABDOMINAL,
              frame.keep_side(s.name) if s.name in SIDES else None) for s in structures]
    removed = torch.zeros(256, dtype=torch.int64)
    for index, values in labelled_voxels(labels):
        rows, columns, slices = _axial_index(index, labels.shape, forward)
        keep = frame.body[rows, columns, slices]
        for ids, abdominal, side in rules:
            other = ~torch.isin(values, ids)
            if abdominal:
                keep &= other | abdomen[slices]
            if side is not None:
                keep &= other | side[columns, slices]
        removed += torch.bincount(values[~keep].long(), minlength=256)
        labels[tuple(i[~keep] for i in index)] = 0
    removed = [f"{s.name} {int(removed[s.label])}" for s in structures if removed[s.label]]
    notes = list(frame.notes)
    if removed:
        notes.append("voxels where the body's frame rules a structure out: " + ", ".join(removed))
    return notes


def _axial_index(index: tuple[torch.Tensor, ...], shape, forward: np.ndarray) -> list[torch.Tensor]:
    """Voxel indices of a plane's layout (of ``shape``) as indices of the axial view (``forward``: layout -> that view,
    a nibabel orientation transform)."""
    axial = [None] * 3
    for axis, (target, flip) in enumerate(forward.astype(int)):
        axial[target] = shape[axis] - 1 - index[axis] if flip == -1 else index[axis]
    return axial


def drop_specks(labels: torch.Tensor, frame: BodyFrame, structures) -> list[str]:
    """Removes each abdominal structure drawn with less than ``MIN_ML`` in all (``labels`` changed in place; a scan
    shorter than ``SPECK_SPAN_MM`` along the body, which may cut an organ to a sliver, is held to that share of it);
    returns a note naming them."""
    voxel_ml = float(np.prod(frame.spacing)) / 1000.0
    least = MIN_ML * min(1.0, len(frame.abdomen) * frame.spacing[2] / SPECK_SPAN_MM)
    counts = torch.bincount(labels.flatten(), minlength=256)
    dropped = []
    for s in structures:
        ml = float(counts[list(s.target_labels)].sum()) * voxel_ml
        if s.name in ABDOMINAL and 0 < ml < least:
            labels[torch.isin(labels, torch.tensor(list(s.target_labels), dtype=labels.dtype))] = 0
            dropped.append(f"{s.name} ({ml:.1f} mL)")
    return [f"left out as specks under {least:.1f} mL: {', '.join(dropped)}"] if dropped else []


def absent(labels, structures) -> list[str]:
    """The structures with no voxel in ``labels`` (a uint8 label map; counted, not sorted: it runs on every
    inference)."""
    counts = torch.bincount(torch.as_tensor(np.asarray(labels)).flatten(), minlength=256)
    return [s.name for s in structures if not counts[list(s.target_labels)].any()]
