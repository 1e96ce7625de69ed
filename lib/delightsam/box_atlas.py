"""Context prompts: where a structure should be, from where the structures around it were found.

The prompt-free first stage finds large organs reliably but can miss a smaller one that looks unlike its training
examples (a filled stomach where the training CT had a collapsed one): its box is then elsewhere, and the
foundation decodes the wrong place. Anatomy varies less than appearance: a structure's 3-D box relative to the
union box of its neighbours changes little between patients (the stomach's within the liver's and spleen's, as
fractions of that union's width from the patient's left and depth from the back: 0.24-0.59 and 0.35-0.92 in the
training CT, 0.20-0.52 and 0.38-0.98 in the held-out one). So a modality keeps a *box atlas*
(``Modality.box_atlas``), learned from its training labels: per training volume, each structure's 3-D box in
millimetres in the layout of its acquisition plane.

At inference (``context_boxes``) the structures the first stage found are trusted from the largest (by atlas
volume) down: each next one is trusted if its box agrees (IoU >= ``MIN_IOU``) with where the atlas puts it
relative to those already trusted; one that disagrees gets the atlas's box instead, and the foundation decodes it
there. The largest found structure is trusted as found: it anchors the rest.

Known weakness: the boxes are mapped along the slice axis too, and a scan's field of view often cuts its organs
(the training CT ends inside the liver), so a scan of another extent can be mapped wrongly along it.
"""

from __future__ import annotations

import numpy as np

Box = tuple[np.ndarray, np.ndarray]  # (low, high) corners in mm along the layout's rows, columns and slices
MIN_IOU = 0.25  # a found box overlapping its atlas box less than this is taken to be elsewhere than the structure


def mask_extent(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box of index ranges holding a mask, from its projections on each axis; None if it is empty."""
    extent = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not len(hit):
            return None
        extent.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(extent)


def box_of(mask, spacing) -> Box | None:
    """A mask's (or a ``label_maps.Region``'s) 3-D box in mm (a voxel spans [index, index + 1) times the spacing);
    None if the mask is empty."""
    extent = mask.extent if hasattr(mask, "extent") else mask_extent(np.asarray(mask))  # a label_maps.Region knows
    if extent is None:
        return None
    step = np.asarray(spacing, dtype=np.float64)
    return np.array([e.start for e in extent]) * step, np.array([e.stop for e in extent]) * step


def atlas_entry(masks: dict, spacing, plane: str) -> dict:
    """One volume's entry of a box atlas from its structures' masks (name -> [rows, columns, slices] mask in
    the plane's layout): {"plane": plane, "boxes": {name: [6 numbers, low then high corner, mm]}}; structures
    absent from the volume are left out."""
    boxes = {name: box_of(mask, spacing) for name, mask in masks.items()}
    return {"plane": plane, "boxes": {name: [round(float(v), 2) for v in (*b[0], *b[1])]
                                      for name, b in boxes.items() if b is not None}}


def iou(a: Box, b: Box) -> float:
    low, high = np.maximum(a[0], b[0]), np.minimum(a[1], b[1])
    inter = float(np.prod(np.clip(high - low, 0, None)))
    union = float(np.prod(a[1] - a[0]) + np.prod(b[1] - b[0])) - inter
    return inter / union if union > 0 else 0.0


def _union(boxes: list[Box]) -> Box:
    return np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0)


def placed(target: str, anchors: list[str], found: dict[str, Box], boxes: dict[str, list[float]]) -> Box:
    """Where one atlas entry (``boxes``) puts ``target`` given where the ``anchors`` were found: the entry's union
    box of the anchors is mapped onto the found one, axis by axis (an offset and a scale), and the target's box
    with it."""
    entry = {name: (np.asarray(b[:3], dtype=np.float64), np.asarray(b[3:], dtype=np.float64)) for name, b in boxes.items()}
    a0, a1 = _union([entry[n] for n in anchors])
    v0, v1 = _union([found[n] for n in anchors])
    scale = (v1 - v0) / np.maximum(a1 - a0, 1e-6)
    return v0 + (entry[target][0] - a0) * scale, v0 + (entry[target][1] - a0) * scale


def _volume(b: list[float]) -> float:
    return float(np.prod(np.subtract(b[3:], b[:3])))


def context_boxes(found: dict[str, Box], atlas: list[dict], plane: str, extent, min_iou: float = MIN_IOU) -> \
        tuple[dict[str, Box | None], list[str]]:
    """The found structures whose box the atlas contradicts, each with the box the atlas puts it in (median
    over the atlas's volumes; None where that box falls outside the volume's ``extent``, mm per axis), and the
    structures trusted as found. Structures the atlas does not know keep their own boxes."""
    entries = [e["boxes"] for e in atlas if e.get("plane") == plane]
    known = [n for n in found if any(n in e for e in entries)]
    size = {n: np.median([_volume(e[n]) for e in entries if n in e]) for n in known}
    order = sorted(known, key=lambda n: -size[n])
    trusted, moved = order[:1], {}
    for name in order[1:]:
        guesses = [placed(name, trusted, found, e) for e in entries if name in e and all(t in e for t in trusted)]
        if not guesses:
            continue
        low = np.clip(np.median([g[0] for g in guesses], 0), 0, extent)
        high = np.clip(np.median([g[1] for g in guesses], 0), 0, extent)
        if np.all(high > low) and iou(found[name], (low, high)) >= min_iou:
            trusted.append(name)
        else:
            moved[name] = (low, high) if np.all(high > low) else None
    return moved, trusted


def update_box_atlas(model, entries: dict[str, list[dict]]) -> None:
    """Adds the training volumes' box atlas entries to their modalities' (``box_atlas``): an entry of the same
    volume id is replaced, the others are kept (a site's labels join the ones the model shipped with)."""
    for name, new in entries.items():
        spec = model.config.modality(name)
        ids = {e["id"] for e in new}
        spec.box_atlas = [e for e in spec.box_atlas if e.get("id") not in ids] + new
