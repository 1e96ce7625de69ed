"""The first stage of whole-volume inference: prompt-free masks, slice by slice.

The volume goes through ``geometry`` (its plane's canonical layout, grey levels per modality, the NaN policy), the
slices (every one, or keyframes about every few millimetres with the others interpolated: ``keyframes``) run
through a 2-D network in batches, and each batch's per-structure probabilities become its slices of one uint8 label
map (memory bounded by the batch, not the volume), which is brought back to the input's own grid. A second stage
(``refinement``) may redraw it from box prompts; ``pipeline`` composes the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .body_frame import BodyFrame, absent, body_frame, drop_specks, keep_structures
from .config import Modality
from .geometry import (GreyVolume, VolumeError, affine_of, as_volume, fit_to_square, fitted_size, grey_levels, intensity_of,
                       model_input, orient, probabilities_on_slice)
from .keyframes import decoded, interpolated, keyframes, refine_stride
from .label_maps import clean_up, close_wholes, combine, part_indices
from .model import DeLightSAM
from .multiplanar import SEVERAL_PLANES_BELOW, fused_probabilities, mirrors, planes_for
from .normalization import get_normalization
from .precision import products_in
from .registration_prior import Atlas, Prior, gate, register
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
    not_found: list[str] = field(default_factory=list)  # the modality's structures with no voxel in ``labels``
    planes: list[str] = field(default_factory=list)  # the planes it was seen in (``multiplanar``); [] for ``plane`` only


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


class SliceNetwork(FittedSliceNetwork):
    """De-LightSAM on grey slices: replicated to three channels and normalised as the checkpoint expects; its products
    in ``precision`` (``precision.resolve``d)."""

    def __init__(self, model: DeLightSAM, modality: str, precision: str = "float32") -> None:
        super().__init__(model.config.img_size, next(model.parameters()).device, model.config.modality(modality).pixel_mm)
        self.model, self.modality, self.precision = model, modality, precision
        self.normalise = get_normalization(model)

    def logits(self, grey: torch.Tensor, fitted: tuple[int, int], guide: torch.Tensor | None) -> torch.Tensor:
        with products_in(self.precision, self.device):
            logits = self.model(model_input(grey, fitted, self.normalise), self.modality).low_res_logits
        return logits.float()


@torch.inference_mode()
def segment_with(network: FittedSliceNetwork, volume, spec: Modality, spacing=None, batch_size: int = 8,
                 threshold: float = 0.5, cleanup: bool = False, progress: bool = False, guide=None,
                 affine=None, refine=None, doubt: bool = False, every_mm: float | None = None,
                 atlas: Atlas | None = None) -> VolumeResult:
    """``segment_volume`` with any 2-D network that predicts ``spec``'s structures (the evaluation's
    baselines); ``guide``, a label map on the volume's grid, reaches the network as a second channel;
    ``refine(grey (a ``GreyVolume``), coarse labels, the oriented volume, placed) -> (labels, notes)`` is a second
    stage (``placed``: a registered atlas placed the structures); ``every_mm``: the
    network sees one slice in about that many millimetres (and the last), those between take interpolated
    probabilities (see ``segment_volume``; a volume seen in several planes, ``multiplanar``, decodes about as many
    slices in all its planes as its acquisition plane's keyframes); ``atlas``: a labelled CT to register onto the scan as a prior of where
    its organs are (``registration_prior``)."""
    if spacing is not None and len(spacing) != 3:
        raise VolumeError(f"expected 3 spacings for a 3-D volume, got {list(spacing)}")
    affine = np.asarray(affine, dtype=np.float64) if affine is not None else affine_of(volume, spacing)
    oriented = orient(volume, affine)
    levels = grey_levels(oriented.data, intensity_of(spec))  # the volume's mapping; applied batch by batch
    notes = [f"{levels.bad} NaN/infinite voxels were set to the volume's minimum"] if levels.bad else []
    planes = planes_for(spec, affine)  # an MR with no axis 2.5 times the next is seen in three planes (multiplanar)
    layout_guide = oriented.to_layout(as_volume(guide)) if guide is not None else None
    label_ids, parts = [s.label for s in spec.structures], part_indices(spec.structures)
    labels = torch.zeros(oriented.data.shape, dtype=torch.uint8)
    meter = DoubtMeter([s.name for s in spec.structures], threshold) if doubt else None
    depth = labels.shape[2]
    frame = _frame(spec, oriented)  # a CT's body frame: where its abdomen cannot be (body_frame)
    prior = _prior(atlas, spec, oriented, frame, notes)
    todo = frame.slices(spec.structures, oriented.plane, depth) if frame is not None else list(range(depth))
    keys = keyframes(todo, refine_stride(every_mm, oriented.spacing[2]))
    fused = None
    if planes:  # as many slices decoded in all planes as the acquisition plane's keyframes
        fused = fused_probabilities(network, volume, affine, planes, levels, oriented, batch_size, len(keys),
                                    guide, meter, progress)
        notes.append(f"seen in {', '.join(planes)} slices, their probabilities averaged (no axis of the volume "
                     f"{SEVERAL_PLANES_BELOW:g} times the next or more)")
    mirrored = mirrors(spec, planes, oriented.plane)
    if mirrored:
        notes.append(f"its {oriented.plane} slices decoded as they are and mirrored left-right, the two averaged (a "
                     f"series too thick for several planes)")
    averaged = ((z, fused[..., z].float()) for z in todo) if planes else None  # the planes' mean [S, rows, columns]
    for z, probabilities in averaged or interpolated(
            decoded(network, oriented, keys, levels, batch_size, layout_guide, meter, progress, mirrored), set(todo)):
        labels[..., z] = combine(probabilities, label_ids, threshold, parts)
    averaged = fused = None  # two bytes a voxel and structure, not held through what follows
    if parts:  # a whole with parts (the brain) is one closed object (label_maps.close_wholes)
        notes.extend(close_wholes(labels, spec.structures, float(np.prod(oriented.spacing)) / 1000))
    if frame is not None:
        notes.extend(keep_structures(labels, frame, oriented.plane, spec.structures))
    if prior is not None:  # a structure found too little of is boxed where the prior puts it (second stage only)
        notes.extend(gate(labels, prior, spec.structures, fill=refine is not None))
    if refine is not None:  # the second stage crops the volume's grey levels around its boxes
        labels, refined = refine(GreyVolume(oriented.data, levels), labels, oriented, prior is not None)
        notes.append(refined)
        if frame is not None:  # boxes the atlas placed may reach outside it too
            keep_structures(labels, frame, oriented.plane, spec.structures)
        if prior is not None:
            gate(labels, prior, spec.structures, fill=False)
    if cleanup:
        labels = clean_up(labels, spec.structures)
    if frame is not None:
        notes.extend(drop_specks(labels, frame, spec.structures))
    return VolumeResult(oriented.to_input(labels.numpy()), spec.name, oriented.slice_axis,
                        {s.name: s.label for s in spec.structures}, levels.bad, notes, oriented.plane,
                        meter.summary() if meter is not None else None, absent(labels, spec.structures), planes)


def _frame(spec: Modality, oriented) -> BodyFrame | None:
    """A CT's body frame (``body_frame``) for a modality in Hounsfield units (a CT window); None for others."""
    if "window" not in (intensity_of(spec) or {}):
        return None
    return body_frame(oriented.data, oriented.spacing, oriented.plane)


def _prior(atlas: Atlas | None, spec: Modality, oriented, frame: BodyFrame | None, notes: list[str]) -> Prior | None:
    """The ``atlas`` registered onto a CT with a body frame and a liver to place it by (``registration_prior``)."""
    liver = next((s.label for s in spec.structures if s.name == "liver"), None)
    if atlas is None or frame is None or liver is None:
        return None
    prior, note = register(atlas, oriented.data, frame, oriented.plane, liver)
    notes.append(note)
    return prior


