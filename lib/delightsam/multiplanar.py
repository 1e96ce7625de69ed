"""Multi-planar inference: a volume with no axis 2.5 times the next (a 3-D MR head, 2x2x3 mm) seen in several planes.

An axial slice near the top or the bottom of the brain shows a small cross-section of it, and where the brain ends
is hard to tell from it; a coronal or a sagittal slice shows the brain's whole height. Each plane's per-structure
probabilities are brought to one layout and averaged, and the average is what the first stage thresholds. Each plane
decodes one slice in a few (keyframes, those between interpolated: one in four for a 1 mm head), so that three planes
decode about as many slices as the acquisition plane alone did (or as its keyframes, ``every_mm``). A series of
slices 2.5 times as thick as its pixels are wide or more is seen in its own plane only: the other planes' pixels
are that tall, and they measured worse than the acquisition plane alone (the model card's MR section); a 2x2x3 mm
head (3 mm coronal slices) is seen in all three. Such a thick series' axial or coronal slices are decoded as they are
and mirrored left-right, the two averaged (``mirrors``): a second view of each voxel where the other planes give none.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import Modality
from .geometry import (GreyLevels, Oriented, apply_orientation, as_volume, layout_transform, orient, plane_axis,
                       thick_axis)
from .keyframes import decoded, interpolated, keyframes


# a volume is seen in several planes unless one axis is this many times the next widest or more (a 5 mm series of
# 1.5-2 mm pixels): up to twice (2x3x2, 3x3x5 and 1x1x2 mm) the planes together measured better on average than the
# acquisition plane alone on the three training heads resampled so (Colin 27 level at 1.5 times, 0.004 worse at
# 1.67), at 2.5 times (2x2x5 mm) worse on average; the threshold lies between the two (the model card). Ratios
# between 2 and 2.5 were not measured, and the other planes' pixels are then not square (``fitted_size``)
SEVERAL_PLANES_BELOW = 2.5


def planes_for(spec: Modality, affine: np.ndarray) -> list[str]:
    """The planes a volume on ``affine`` is seen in: the modality's ``planes`` where no axis is
    ``SEVERAL_PLANES_BELOW`` times the next widest or more (``geometry.thick_axis``), else none (its acquisition
    plane only)."""
    return list(spec.planes) if len(spec.planes) > 1 and thick_axis(affine, SEVERAL_PLANES_BELOW) is None else []


def mirrors(spec: Modality, planes: list[str], plane: str) -> bool:
    """Whether a volume's slices are decoded mirrored too (``keyframes.decoded``): a series of a modality seen in several
    planes that is too thick for them (``planes`` empty) lacks their second view of each voxel; the mirror image of an
    axial or coronal slice is one (a sagittal slice mirrored is the slice across the midline: no new view). A thin
    volume is not mirrored: three planes are its views, and twice their decoding would double a head's time. Only a
    modality declared ``symmetric`` is (each structure its own mirror image: a whole brain, not a left hippocampus,
    whose mirror image is the right one); the configuration refuses a symmetric modality with a structure named
    for one side."""
    return spec.symmetric and len(spec.planes) > 1 and not planes and plane != "sagittal"


def fused_probabilities(network, volume, affine: np.ndarray, planes: list[str], levels: GreyLevels,
                        into: Oriented, batch_size: int, slices: int, guide=None, meter=None,
                        progress: bool = False) -> torch.Tensor:
    """The mean of ``planes``' probabilities (``keyframes.decoded``), [S, rows, columns, slices] in ``into``'s
    layout, float16 (two bytes a voxel and structure): each plane's slices are added where they lie as they come, so
    no plane's whole volume of probabilities is held. ``slices``: about how many slices to decode in all (each plane
    one in the same stride, at most ``MAX_STRIDE``)."""
    depths = [into.input_shape[plane_axis(affine, plane)[1]] for plane in planes]
    stride = min(math.ceil(sum(depths) / max(slices, 1)), MAX_STRIDE)
    total = None
    for plane in planes:
        oriented = orient(volume, affine, plane=plane)
        ornt = layout_transform(plane, into.plane)  # a slice of this plane is a slab of one across ``into``'s axis
        axis, flipped, depth = int(ornt[2, 0]), ornt[2, 1] == -1, oriented.data.shape[2]
        layout_guide = oriented.to_layout(as_volume(guide)) if guide is not None else None
        keys = keyframes(list(range(depth)), stride)  # the others interpolated; ``meter`` sees what was decoded
        slices_of_plane = decoded(network, oriented, keys, levels, batch_size, layout_guide, meter, progress)
        for z, probabilities in interpolated(slices_of_plane, set(range(depth))):
            if total is None:
                total = torch.zeros((probabilities.shape[0], *into.data.shape), dtype=torch.float16)
            slab = apply_orientation(probabilities[..., None], ornt)
            total.narrow(1 + axis, depth - 1 - z if flipped else z, 1).add_(slab)
        del oriented  # its flipped copy of the volume
    return total.div_(len(planes))


# one slice decoded in at most this many of each plane (4 mm of a 1 mm head: decoding one slice in 1 to 4 mm of each
# plane moved no training or held-out head's brain by more than 0.001); a thin slab (60 slices of 1 mm) then decodes
# more slices in three planes than its acquisition plane alone has
MAX_STRIDE = 4
