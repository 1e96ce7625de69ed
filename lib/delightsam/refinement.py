"""The second stage of whole-volume inference: the first stage's masks become box prompts that the refiner (all of
the foundation, ``foundation.foundation_model``) decodes.

Each structure's largest connected component gives its boxes (one per slice, or one 3-D box over its extent); a
structure whose box the modality's box atlas contradicts is boxed where the atlas puts it instead and decoded on
whole slices (``context_prompts``, ``CONTEXT_SIZE``). The refiner sees only the part of the slices the boxes cover,
at a whole slice's scale, and decodes keyframes (``keyframes``) with the slices between interpolated.
"""

from __future__ import annotations

import numpy as np
import torch

from .box_atlas import box_of, context_boxes
from .config import Modality
from .geometry import GreyVolume, Oriented, fit_to_square, model_input, probabilities_on_slice
from .keyframes import interpolated, keyframes
from .label_maps import Region, combine, part_indices, structure_regions
from .model import DeLightSAM, resized
from .normalization import get_normalization
from .precision import products_in
from .sp_generator import boxes_from_profiles


def slice_boxes(regions: list, prompts: str, depth: int) -> torch.Tensor:
    """[slices, S, 4] boxes (x0, y0, x1, y1 = column, row, column, row on the slice; NaN: none) from the
    structures' regions (``label_maps.Region``s, or [rows, columns, slices] masks): one 3-D box over each region's extent and one slice beyond
    it, or each slice's own box."""
    boxes = torch.full((depth, len(regions), 4), float("nan"))
    for k, region in enumerate(regions):
        if region is None:
            continue
        if isinstance(region, Region):  # from structure_regions
            rows, columns = region.profiles()
        else:  # a mask of a caller's own
            region = np.asarray(region)
            rows, columns = region.any(1).T, region.any(0).T
        per_slice = boxes_from_profiles(torch.from_numpy(np.ascontiguousarray(rows)), torch.from_numpy(np.ascontiguousarray(columns)))
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


# A structure boxed by the atlas gets a loose box, and the foundation decodes a loose box well only with the whole
# slice's context at about this input size per slice (held-out stomach 0.778 in the part at 96, 0.849 so): it is
# decoded there instead, on at most CONTEXT_KEYFRAMES slices (its box spans the scan where the atlas maps it badly).
CONTEXT_SIZE, CONTEXT_KEYFRAMES = 160, 6


def refine(refiner: DeLightSAM, spec: Modality, grey: GreyVolume, coarse: torch.Tensor, prompts: str,
           batch_size: int, threshold: float, stride: int, oriented: Oriented,
           precision: str = "float32", box_atlas: bool = True) -> tuple[torch.Tensor, str]:
    """The label map [rows, columns, slices] that the refiner draws on the slices that have a box (0 elsewhere).

    The refiner sees only the part of the slices that the boxes (and a margin of 10% of their extent) cover, at
    the scale a whole slice would have at its input size: the same anatomy at the same size in pixels, and an
    input (and a cost) as much smaller as the part is. With ``stride`` k > 1 it decodes every k-th slice of each
    run (``keyframes``), and a slice between two takes their probabilities interpolated linearly: organs change
    little over a few millimetres, and the cost falls k-fold. A structure whose box the modality's box atlas
    contradicts, given the ``oriented`` volume's geometry, is prompted where the atlas puts it (``context_prompts``)
    and decoded on whole slices (``_context_pass``), unless ``box_atlas`` is False (a registered atlas placed the
    structures already: ``registration_prior``). ``precision``: of the refiner's products (``precision``)."""
    rows, columns, depth = grey.shape
    regions = structure_regions(coarse, spec.structures)
    boxes = slice_boxes(regions, prompts, depth)
    if box_atlas:
        context, boxed = context_prompts(boxes, regions, spec, oriented)
    else:  # its boxes map one patient's along the slices too, and moved a spleen found where it is (the model card)
        context, boxed = ("; the box atlas not consulted: the registered atlas placed the structures"
                          if spec.box_atlas else ""), []
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
    part = grey.crop(slice(r0, r1 + 1), slice(c0, c1 + 1))
    scale = refiner.config.img_size / max(rows, columns)  # as if the whole slice were fitted
    size = min(refiner.config.img_size, max(64, 32 * int(np.ceil(max(part.shape[:2]) * scale / 32))))
    label_ids, parts = [s.label for s in spec.structures], part_indices(spec.structures)

    def draw(z: int, probabilities: torch.Tensor) -> None:  # [S, part rows, part columns]
        labels[r0: r1 + 1, c0: c1 + 1, z] = combine(probabilities, label_ids, threshold, parts)

    offset = torch.tensor([c0, r0, c0, r0], dtype=torch.float32)
    keys = _decode(resized(refiner, size), spec.name, part, boxes - offset, todo, stride, batch_size, draw, precision)
    if boxed:
        context += _context_pass(resized(refiner, CONTEXT_SIZE), spec, grey, labels, atlas_boxes, boxed, stride,
                                 batch_size, threshold, precision)
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


def _decode(model: DeLightSAM, modality: str, grey: GreyVolume, boxes: torch.Tensor, todo: list[int], stride: int,
            batch_size: int, draw, precision: str = "float32") -> list[int]:
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
            fitted_grey, fitted = fit_to_square(grey.slices(zs).permute(2, 0, 1)[:, None], size)
            inputs = model_input(fitted_grey, fitted, normalise).to(device)
            with products_in(precision, device):
                logits = model(inputs, modality, (boxes[zs] * scale).to(device)).low_res_logits
            logits = torch.nan_to_num(logits.float(), neginf=-100.0)  # structures without a box: empty, not NaN after resizing
            yield from zip(zs, probabilities_on_slice(logits, size, fitted, grey.shape[:2]))

    for z, probabilities in interpolated(decoded(), set(todo)):  # between keyframes of a run only: runs end in one
        draw(z, probabilities)
    return keys


def _context_pass(model: DeLightSAM, spec: Modality, grey: GreyVolume, labels: torch.Tensor, boxes: torch.Tensor,
                  boxed: list[int], stride: int, batch_size: int, threshold: float, precision: str) -> str:
    """Decodes the structures ``boxed`` by the atlas (``boxes`` [slices, S, 4] has only theirs) on whole slices (see
    CONTEXT_SIZE) and draws them in ``labels`` where no other structure is; returns a note."""
    todo = _boxed_slices(boxes)
    stride = max(stride, int(np.ceil(len(todo) / (CONTEXT_KEYFRAMES - 1))))
    ids = torch.tensor([spec.structures[k].label for k in boxed], dtype=labels.dtype)

    def draw(z: int, probabilities: torch.Tensor) -> None:
        best, index = probabilities[boxed].max(dim=0)
        free = (best > threshold) & (labels[..., z] == 0)
        labels[..., z][free] = ids[index[free]]

    keys = _decode(model, spec.name, grey, boxes, todo, stride, batch_size, draw, precision)
    return f"; those decoded on {len(keys)} whole slices at input {model.config.img_size}"
