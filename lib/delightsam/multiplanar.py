"""Multi-planar inference: a volume cut thin along every axis (a 3-D MR head) seen in several planes.

An axial slice near the top or the bottom of the brain shows a small cross-section of it, and where the brain ends
is hard to tell from it; a coronal or a sagittal slice shows the brain's whole height. Each plane's per-structure
probabilities are brought to one layout and averaged, and the average is what the first stage thresholds. Each plane
decodes one slice in a few (keyframes, those between interpolated: one in four for a 1 mm head), so that three planes
decode about as many slices as the acquisition plane alone did. A thick-sliced series is seen in its own plane only: across 5 mm slices the other planes'
pixels are 5 mm tall, and they measured worse than the acquisition plane alone (the model card's MR section).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import Modality
from .geometry import GreyLevels, Oriented, as_volume, orient, plane_axis, thick_axis
from .keyframes import batches, interpolated, keyframes


def planes_for(spec: Modality, affine: np.ndarray) -> list[str]:
    """The planes a volume on ``affine`` is seen in: the modality's ``planes`` where the volume is cut thin along
    every axis (``geometry.thick_axis``), else none (its acquisition plane only)."""
    return list(spec.planes) if len(spec.planes) > 1 and thick_axis(affine) is None else []


def plane_probabilities(network, volume, affine: np.ndarray, plane: str, levels: GreyLevels, batch_size: int,
                        stride: int, guide=None, progress: bool = False) -> torch.Tensor:
    """Probabilities [S, X, Y, Z] (float16) of ``volume`` cut in ``plane``, seen on the volume's own grid (a view);
    ``network``, a ``first_stage.FittedSliceNetwork``, decodes one slice in ``stride``, the others interpolated."""
    oriented = orient(volume, affine, plane=plane)
    guide = oriented.to_layout(as_volume(guide)) if guide is not None else None
    depth = oriented.data.shape[2]
    keys = keyframes(list(range(depth)), stride)
    out = None

    def decoded():
        for batch in batches(len(keys), batch_size, progress):
            zs = keys[batch]
            stack = levels(oriented.data[..., zs])[None]
            if guide is not None:
                stack = torch.cat([stack, guide[..., zs].float()[None]])
            yield from zip(zs, network(stack.permute(3, 0, 1, 2), oriented.spacing[:2]))

    for z, probabilities in interpolated(decoded(), set(range(depth))):
        if out is None:
            out = torch.empty((probabilities.shape[0], *oriented.data.shape), dtype=torch.float16)
        out[..., z] = probabilities
    return oriented.as_input(out)


def fused_probabilities(network, volume, affine: np.ndarray, planes: list[str], levels: GreyLevels,
                        into: Oriented, batch_size: int, guide=None, progress: bool = False) -> torch.Tensor:
    """The mean of ``planes``' probabilities (``plane_probabilities``), [S, rows, columns, slices] in ``into``'s
    layout (float16: two bytes a voxel and structure, for the sum and for one plane's)."""
    # one slice in ``stride`` of each plane: about as many slices decoded as ``into``'s plane alone has
    depths = [into.input_shape[plane_axis(affine, plane)[1]] for plane in planes]
    stride = math.ceil(sum(depths) / into.data.shape[2])
    total = None
    for plane in planes:
        probabilities = into.to_layout(plane_probabilities(network, volume, affine, plane, levels, batch_size,
                                                           stride, guide, progress))
        total = probabilities.contiguous() if total is None else total.add_(probabilities)
    return total.div_(len(planes))
