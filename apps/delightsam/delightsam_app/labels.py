"""A saved label in the model's terms: which voxel value is which structure, by the names a client sent; and the
check a label passes before it is saved.

3D Slicer's Submit Label numbers the segments by their position in the user's list and sends their names in
``label_info`` ([{"name": "liver", "idx": 1}, ...]); those names, not the numbers, say what a voxel is. A label
sent without names is taken by value only when its values are the model's own label ids. Either way a structure
counts as annotated only where its value occurs in the file: Slicer lists every segment of the user's
segmentation, the empty ones too (it creates one per structure of the model), and an empty segment is a structure
the user did not draw, not one the user found absent.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from fastapi import HTTPException
from monai.transforms import LoadImage

from delightsam.label_maps import relabel
from delightsam.headers import HeaderError
from delightsam.reading import READ_ERRORS, read_error, read_grid, read_label, read_volume

from . import anatomy
from .dicom_seg import segment_info
from .options import SavedLabelInfo, parse


@dataclass
class LabelMapping:
    values: dict[int, int]  # voxel value in the saved file -> the model's label id (other values: background)
    known: list[str]  # the model's structures that the label speaks for (a structure not sent is unknown)
    unmatched: list[str] = field(default_factory=list)  # the client's segments that are no structure of the model
    problem: str | None = None  # why the label cannot train the model at all


def named_segments(params: dict | None) -> list[tuple[int, str]]:
    """(voxel value, name) of the segments a client named in its label_info (entries without a usable index, which
    a label saved before these were checked may hold, are left out)."""
    entries = (params or {}).get("label_info")
    if not isinstance(entries, list):
        return []
    return [(int(e["idx"]), str(e["name"])) for e in entries
            if isinstance(e, dict) and "name" in e and str(e.get("idx", "")).isdigit() and 0 < int(e["idx"]) <= 255]


def map_label(params: dict | None, present: set[int], structures: dict[str, int]) -> LabelMapping:
    """How a saved label's voxel values (``present``: those in the file) become the model's label ids
    (``structures``: name -> id of the image's modality). Only structures whose value is present are known."""
    named = named_segments(params)
    present = {int(v) for v in present} - {0}
    if not named:
        extra = sorted(present - set(structures.values()))
        if extra:
            return LabelMapping({}, [], problem=f"its values {extra} are not label ids of the model's structures "
                                                f"({_listing(structures)}) and no segment names were sent with it")
        known = [n for n, i in structures.items() if i in present]
        return LabelMapping({i: i for i in structures.values()}, known,
                            problem=None if known else "it holds no structure (every voxel is 0)")
    values, known, unmatched = {}, [], []
    for value, name in named:
        structure = anatomy.match(name, structures)
        if structure is None:
            unmatched.append(name)
            continue
        values[value] = structures[structure]  # two segments may name one structure ("Liver", "liver")
        if value in present and structure not in known:
            known.append(structure)
    unnamed = sorted(present - {v for v, _ in named})
    unmatched += [f"unnamed value {v}" for v in unnamed]
    problem = None
    if not known:
        matched = [n for _, n in named if anatomy.match(n, structures)]
        problem = (f"none of its segments ({', '.join(n for _, n in named)}) is a structure of the model "
                   f"({_listing(structures)})" if not matched else
                   f"its segments that name structures of the model ({', '.join(matched)}) have no voxels")
    return LabelMapping(values, known, unmatched, problem)


def _listing(structures: dict[str, int]) -> str:
    return ", ".join(f"{n}={i}" for n, i in structures.items())


# ---- the check at save time -------------------------------------------------------------------------------
def refused(message: str) -> HTTPException:
    return HTTPException(422, f"the label was not saved: {message}")


def label_values(label) -> list[int]:
    """The values a label map holds, which must be whole numbers from 0 to 255 (uint8 label maps; NaN, fractions
    and negative values are no structure)."""
    data = np.asarray(label)
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise refused("it holds NaN or infinite values")
        if not (data == np.round(data)).all():
            raise refused("its values are not whole numbers (a label map holds one value per structure)")
    elif data.dtype.kind not in "iub":
        raise refused(f"its voxels are of type {data.dtype}, not numbers")
    low, high = (data.min(), data.max()) if data.size else (0, 0)
    if low < 0 or high > 255:
        raise refused(f"its values run from {low:g} to {high:g}; label values are 0 (background) to 255")
    counts = np.bincount(data.astype(np.uint8, copy=False).ravel(), minlength=256)
    return [int(v) for v in np.flatnonzero(counts)]


def check_saved_label(label_path: str, image_path: str, params: dict | None,
                      structures: dict[str, int] | None) -> tuple[dict, list[str]]:
    """Reads a label a client is saving and checks it against its image before anything is written: its params
    (label_info indices 1..255, each named once), its grid (the image's, in any storage order), its values (whole
    numbers 0..255, each one named in label_info, or without names a label id of ``structures``: the model's, for
    the image's modality; None when the modality is not known yet). Returns (the label's info to store, notes for
    the client); raises a 422 that says what is wrong."""
    info = parse(SavedLabelInfo, params or {}, "the saved label (its params)")
    try:
        grid = read_grid(image_path)
        label = read_label(label_path, grid, dtype=None)
    except HeaderError as e:
        if e.kind == "size":
            raise HTTPException(413, f"the saved label is refused: {e}") from e
        raise refused(f"cannot read it on its image's grid: {read_error(e)}") from e
    except READ_ERRORS as e:
        raise refused(f"cannot read it on its image's grid: {read_error(e)}") from e
    present = set(label_values(label)) - {0}
    named = {s.idx: s.name for s in info.label_info or [] if s.idx is not None}  # placed: Slicer's; unplaced: SEG's
    notes = []
    if named:
        unnamed = sorted(present - set(named))
        if unnamed:
            raise refused(f"its values {unnamed} are not named in label_info (named: "
                          f"{', '.join(f'{n}={i}' for i, n in sorted(named.items()))})")
        empty = [f"{n} ({i})" for i, n in sorted(named.items()) if i not in present]
        if empty:
            notes.append(f"segments with no voxels, not counted as annotated: {', '.join(empty)}")
    stored = info.model_dump(exclude_none=True)
    if structures is not None:
        mapping = map_label(stored, present, structures)
        if not named and present - set(structures.values()):
            raise refused(mapping.problem)
        if mapping.problem:
            notes.append(f"it cannot train the model: {mapping.problem}")
        else:
            notes.append(f"annotates {', '.join(mapping.known)} for training")
    elif present:
        notes.append("the image's modality is not known yet, so its segments are matched to structures when it trains "
                     "(run auto-segmentation on the image, or set its modality, to have them checked now)")
    return {**stored, "values": sorted(present), "notes": notes}, notes


def values_in(label_path) -> set[int]:
    """The values a stored label file holds (read header first: ``delightsam.headers``; READ_ERRORS if it cannot be)."""
    return set(np.unique(np.asarray(read_volume(label_path, dtype=None))).astype(int).tolist())


# ---- a label to be stored as a DICOM SEG ------------------------------------------------------------------
@contextmanager
def as_seg_label(label_path: str, image_path: str, label_info: dict | None, structures: dict[str, int],
                 series: str, modality: str):
    """A `final` label of a PACS series, as monailabel's DICOMweb datastore stores it (a DICOM SEG whose segments carry
    the structures' names, SNOMED CT codes and colours): yields (the label file, the label_info its SEG writer takes).
    The label is checked against its series first (``check_saved_label``: grid, values, label_info), its voxel values
    read as the client named them (Slicer's label_info), brought to the model's label ids (``structures``: the
    series' modality's; none: stored as it came) and described in the writer's own convention (label_info paired with
    the ids present, in ascending order). ``series``, ``modality``: for messages. The files made here are removed
    after."""
    written = []
    try:
        if str(label_path).endswith(".bin"):  # OHIF sends its labels raw, on the image's grid
            from monailabel.datastore.utils.convert import binary_to_image

            label_path = binary_to_image(image_path, label_path)
            written.append(label_path)
        checked, _ = check_saved_label(label_path, image_path, label_info, structures or None)
        if structures:
            label = LoadImage(image_only=True, dtype=None)(label_path)
            mapping = map_label(checked, set(checked["values"]), structures)
            if mapping.problem:
                raise HTTPException(422, f"the label for series {series} cannot be stored as a SEG of "
                                         f"{modality} structures: {mapping.problem}")
            values = relabel(torch.as_tensor(np.asarray(label)).to(torch.int64), mapping.values).numpy()
            label_path = _write_like(label, values)
            written.append(label_path)
            names = {label_id: name for name, label_id in structures.items()}
            present = sorted(int(i) for i in np.unique(values) if i)
            label_info = {**(label_info or {}), "known_structures": mapping.known, "label_info": [
                {**segment_info(names[i], i), "model_name": "De-LightSAM"} for i in present]}
        yield label_path, label_info
    finally:
        for path in written:
            if os.path.exists(path):
                os.unlink(path)


def _write_like(reference, data) -> str:
    """``data`` on ``reference``'s grid as a temporary NIfTI file."""
    handle, path = tempfile.mkstemp(suffix=".nii.gz")
    os.close(handle)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.asarray(reference.affine)), path)
    return path
