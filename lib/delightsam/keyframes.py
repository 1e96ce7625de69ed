"""Which slices a network decodes: one about every few millimetres along each run of slices (keyframes), and the
slices between two keyframes take their probabilities interpolated linearly (organs change little over a few
millimetres), so that the cost follows the anatomy's extent, not the number of slices; the decoding of the keyframes
in batches, whatever plane a volume is cut in (``decoded``)."""

from __future__ import annotations

import torch


def refine_stride(every_mm: float | None, slice_mm: float) -> int:
    """Slices from one decoded slice to the next for a decoded slice about every ``every_mm`` millimetres
    (None: every slice)."""
    return 1 if not every_mm else max(1, round(float(every_mm) / float(slice_mm)))


def keyframes(slices: list[int], stride: int) -> list[int]:
    """Every ``stride``-th of ``slices`` (sorted) along each run of consecutive ones, and each run's last: the
    slices a network decodes (the first stage's or the refiner's); those between two keyframes take the interpolation
    of theirs."""
    keys, start = [], None
    for i, z in enumerate(slices):
        if i == 0 or slices[i - 1] != z - 1:
            start = z  # a new run
        if (z - start) % max(int(stride), 1) == 0 or i == len(slices) - 1 or slices[i + 1] != z + 1:
            keys.append(z)
    return keys


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


def decoded(network, oriented, keys: list[int], levels, batch_size: int, guide=None, meter=None,
            progress: bool = False, mirrored: bool = False):
    """(keyframe, probabilities [S, rows, columns]) of ``oriented``'s slices ``keys`` (a ``geometry.Oriented``),
    batch by batch: no whole-volume float copy. ``network``: a ``first_stage.FittedSliceNetwork``; ``levels``: the
    volume's grey levels; ``guide``: a second channel in the same layout; ``meter`` (``uncertainty.DoubtMeter``) sees
    what the network decoded; ``mirrored``: each slice is decoded as it is and mirrored along its columns (left-right
    in the axial and coronal layouts), and the two probabilities averaged (twice the decoding; half the slices a batch,
    so that a batch holds as many inputs, and as much memory, as without, two with ``batch_size`` 1); ``meter`` then
    sees both views, as it sees each plane's of a volume seen in several (``multiplanar``)."""
    for batch in _batches(len(keys), max(batch_size // 2, 1) if mirrored else batch_size, progress):
        zs = keys[batch]
        stack = levels(oriented.data[..., zs])[None]
        if guide is not None:
            stack = torch.cat([stack, guide[..., zs].float()[None]])
        stack = stack.permute(3, 0, 1, 2)  # [b, channels, rows, columns]
        views = network(torch.cat([stack, stack.flip(3)]) if mirrored else stack, oriented.spacing[:2])
        if meter is not None:
            meter.add(views)  # [b or 2b, S, rows, columns]
        probabilities = (views[: len(zs)] + views[len(zs):].flip(3)) / 2 if mirrored else views
        yield from zip(zs, probabilities)
