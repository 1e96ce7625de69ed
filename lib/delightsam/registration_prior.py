"""Where a new patient's abdominal organs are likely: a labelled training CT (the atlas) registered onto the scan.

The first stage learned organs from one patient's abdomen and, on another patient's scan of another field of view,
marks some of them in the wrong place; the body frame (``body_frame``) rules out the head, the thorax and the wrong
side, not a wrong place within the abdomen. The atlas, a training CT at ``ATLAS_MM`` with its organs' labels, is
registered onto the scan (SimpleITK: a translation that puts the atlas's liver top at the scan's diaphragm's domes
and the bodies' middles together, then an affine by the correlation of soft-tissue grey levels within the scan's
body, from ``GATE_MM`` above the domes to ``BELOW_DOME_MM`` below them). Its warped labels are the prior:

- a structure's first-stage voxels farther than ``GATE_MM`` (the registration's error allowance) from where the prior
  puts it are removed, before the second stage boxes them and again after it decodes;
- a structure of which less than ``MIN_SHARE`` of the prior's volume is left gets the prior's own mask as its
  coarse mask: the second stage (the foundation, which segments well from a rough box) decodes it from the boxes
  the prior gives;
- above the atlas's field of view (the thorax: its liver reaches its top slice) none of its organs is, so a structure
  reaches at most ``GATE_MM`` above where the atlas's top puts it; beyond its other edges the prior says nothing, and
  nothing is removed there.

The prior needs the domes (``BodyFrame.dome``) and ``MIN_BELOW_MM`` of the scan below them: a scan with no thorax in
view (an abdominal slab) or too little abdomen gets none and is segmented as before. None of the constants was chosen
on a labelled scan's figures: they were set before any was scored with the prior, and the placements were looked at on
two unlabelled chest-abdomen CTs (the model card).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from .body_frame import ABDOMINAL, BodyFrame, _view
from .geometry import _apply
from .label_maps import labelled_voxels

ATLAS_MM = 4.0  # the atlas's and the registration's grid
DOME_RISE_MM = 15.0  # the domes' top above the frame's lung-base level (body_frame)
BELOW_DOME_MM = 250.0  # the part of the scan the registration matches: the upper abdomen
# less than this in view below the domes' top (a chest CT that ends at its lung bases) is too little to match: the
# neck-and-chest CT of the tests (pyradiomics' lung1) has 15 mm, the angiography CT that reaches the spleen 61 mm
MIN_BELOW_MM = 40.0
GATE_MM = 20.0
MIN_SHARE = 0.3
ABOVE_TOP_MM = 400.0  # the atlas's field of view is taken to go on upward this far, with none of its organs
SOFT_TISSUE = (-200.0, 300.0)  # the grey levels the registration compares (HU)
ATLAS_PREFIX = "atlas."  # a checkpoint's atlas tensors: atlas.<modality>.image (int16 HU), atlas.<modality>.labels


@dataclass
class Atlas:
    """A labelled CT in the axial view ([rows to the back, columns to the patient's left, slices upward]) at
    ``ATLAS_MM``: its Hounsfield units (int16) and its structures' label ids (uint8, the modality's)."""

    image: torch.Tensor
    labels: torch.Tensor

    def tensors(self, modality: str) -> dict[str, torch.Tensor]:
        return {f"{ATLAS_PREFIX}{modality}.image": self.image, f"{ATLAS_PREFIX}{modality}.labels": self.labels}


def atlases_from(state: dict[str, torch.Tensor]) -> dict[str, Atlas]:
    """The atlases among a checkpoint's tensors (removed from ``state``), by modality."""
    keys = [k for k in state if k.startswith(ATLAS_PREFIX)]
    found = {k.removeprefix(ATLAS_PREFIX).rsplit(".", 1)[0] for k in keys}
    tensors = {k: state.pop(k) for k in keys}
    atlases = {}
    for modality in found:
        image, labels = tensors.get(f"{ATLAS_PREFIX}{modality}.image"), tensors.get(f"{ATLAS_PREFIX}{modality}.labels")
        if image is None or labels is None or image.shape != labels.shape or image.dim() != 3:
            raise ValueError(f"the {modality} atlas needs an image and labels of one 3-D shape")
        atlases[modality] = Atlas(image.to(torch.int16), labels.to(torch.uint8))
    return atlases


def make_atlas(hu: torch.Tensor, labels: torch.Tensor, spacing, plane: str = "axial") -> Atlas:
    """An atlas from a CT in a plane's layout (``geometry.Oriented.data``) and its label map (the modality's ids) on
    the same grid."""
    forward, _ = _view(plane)
    order = np.argsort(forward[:, 0])
    spacing = [float(spacing[i]) for i in order]
    image = _resampled(_apply(torch.as_tensor(hu), forward).float(), spacing, "trilinear")
    label_map = _resampled(_apply(torch.as_tensor(labels), forward).float(), spacing, "nearest")
    return Atlas(image.round().clamp(-1024, 3071).to(torch.int16), label_map.to(torch.uint8))


def _resampled(x: torch.Tensor, spacing, mode: str) -> torch.Tensor:
    """``x`` [rows, columns, slices] at ``spacing`` mm, on a grid of ``ATLAS_MM`` covering the same extent."""
    size = [max(1, int(round(n * s / ATLAS_MM))) for n, s in zip(x.shape, spacing)]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(x[None, None], size=size, mode=mode, **kwargs)[0, 0]


def _nearest(shape, spacing, coarse=None) -> tuple[np.ndarray, ...]:
    """Per axis, the indices that take a grid of ``shape`` at ``spacing`` mm to the ``ATLAS_MM`` grid covering it
    (nearest voxel); with ``coarse`` (that grid's shape), those that take it back."""
    if coarse is None:
        sizes = [max(1, int(round(n * s / ATLAS_MM))) for n, s in zip(shape, spacing)]
        return tuple(np.minimum(((np.arange(m) + 0.5) * ATLAS_MM / s).astype(int), n - 1)
                     for m, n, s in zip(sizes, shape, spacing))
    return tuple(np.minimum(((np.arange(n) + 0.5) * s / ATLAS_MM).astype(int), m - 1)
                 for n, m, s in zip(shape, coarse, spacing))


@dataclass
class Prior:
    """The atlas's labels warped onto a scan at ``ATLAS_MM`` (``labels``) and where the atlas had data (``seen``), in
    the scan's plane's layout; ``maps``: per axis, the coarse index of each of the scan's voxels."""

    labels: np.ndarray  # uint8 [rows, columns, slices] on the scan's coarse grid, in its plane's layout
    seen: np.ndarray  # bool, same grid
    maps: tuple[np.ndarray, np.ndarray, np.ndarray]
    voxel_ml: float  # a full-resolution voxel's volume
    _grown: dict = field(default_factory=dict, repr=False)  # label -> ``grown``'s answer

    def grown(self, label: int) -> np.ndarray:
        """Where ``label`` may lie, on the coarse grid: within ``GATE_MM`` of where the prior puts it, and wherever
        the atlas did not see (kept: the gate runs before the second stage and after it)."""
        if label not in self._grown:
            mask = self.labels == label
            if mask.any():
                mask = ndimage.distance_transform_edt(~mask, sampling=ATLAS_MM) <= GATE_MM
            self._grown[label] = mask | ~self.seen
        return self._grown[label]

    def full(self, coarse: np.ndarray, slices: slice = slice(None)) -> torch.Tensor:
        """A coarse array on the scan's full grid (its ``slices`` only)."""
        return torch.from_numpy(coarse[np.ix_(self.maps[0], self.maps[1], self.maps[2][slices])])

    def ml(self, label: int) -> float:
        return float((self.labels == label).sum()) * ATLAS_MM ** 3 / 1000.0


def _in_layout(coarse: list[np.ndarray], maps, back: np.ndarray):
    """The coarse arrays and the axial view's index ``maps`` (full -> coarse, per axis) in a plane's layout (``back``:
    the axial view -> that layout, a nibabel orientation)."""
    arrays = [_apply(torch.from_numpy(a), back).numpy() for a in coarse]
    moved = [None] * 3
    for axis, (target, flip) in enumerate(back.astype(int)):
        m = maps[axis]
        moved[target] = (coarse[0].shape[axis] - 1 - m[::-1]) if flip == -1 else m
    return arrays, tuple(np.ascontiguousarray(m) for m in moved)


def register(atlas: Atlas, hu: torch.Tensor, frame: BodyFrame, plane: str, liver: int) -> tuple[Prior | None, str]:
    """The ``atlas`` registered onto a CT in a plane's layout (``hu``, with its ``frame``; ``liver``: the
    modality's liver label): the prior and a note, or None and why not."""
    if frame.dome is None:
        return None, "no registration prior: no thorax in view to place the atlas by"
    axial = _apply(hu, _view(plane)[0])
    index = np.ix_(*_nearest(axial.shape, frame.spacing))  # nearest voxels: a grid of 4 mm, no float copy of the scan
    scan, body = axial.numpy()[index].astype(np.float32), frame.body.numpy()[index]
    liver = np.flatnonzero((atlas.labels == liver).any(0).any(0))
    if not len(liver):
        return None, "no registration prior: the atlas has no liver to place it by"
    top = (frame.dome * frame.spacing[2] + DOME_RISE_MM) / ATLAS_MM
    if top * ATLAS_MM < MIN_BELOW_MM:
        return None, "no registration prior: too little of the abdomen in view below the domes to place the atlas by"
    fixed, moving = _image(scan), _image(atlas.image.float().numpy())
    start = np.array([*_middle(atlas.image.numpy() > -400, liver.max()), liver.max()], dtype=float) \
        - np.array([*_middle(body, top), top])
    transform = sitk.AffineTransform(3)
    transform.SetTranslation((start[[1, 0, 2]] * ATLAS_MM).tolist())  # sitk's x, y, z: columns, rows, slices
    slices = np.arange(scan.shape[2]) * ATLAS_MM
    within = (slices <= top * ATLAS_MM + GATE_MM) & (slices >= top * ATLAS_MM - BELOW_DOME_MM)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricFixedMask(_image((body & within[None, None]).astype(np.uint8)))
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.3, 1)  # a fixed seed: the same scan gets the same prior
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-3, 150, relaxationFactor=0.7)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(sitk.Clamp(fixed, sitk.sitkFloat32, *SOFT_TISSUE), sitk.Clamp(moving, sitk.sitkFloat32, *SOFT_TISSUE))
    # the atlas says where each organ is within its field of view and, above its top (the thorax: its liver reaches
    # the top), that none of them is there; beyond its other edges it says nothing
    pad = ((0, 0), (0, 0), (0, int(ABOVE_TOP_MM / ATLAS_MM)))
    warped = sitk.Resample(_image(np.pad(atlas.labels.numpy(), pad)), fixed, transform, sitk.sitkNearestNeighbor, 0)
    seen = sitk.Resample(_image(np.pad(np.ones(atlas.labels.shape, np.uint8), pad, constant_values=1)), fixed,
                         transform, sitk.sitkNearestNeighbor, 0)
    maps = _nearest(axial.shape, frame.spacing, scan.shape)
    (labels, known), maps = _in_layout([_array(warped), _array(seen) > 0], maps, _view(plane)[1])
    prior = Prior(labels, known, maps, float(np.prod(frame.spacing)) / 1000.0)
    return prior, f"the atlas registered onto the scan (correlation {-method.GetMetricValue():.2f})"


def _middle(body: np.ndarray, z: float) -> tuple[float, float]:
    """The body's middle (row, column) on coarse slice ``z`` (the nearest slice with a body)."""
    zs = np.flatnonzero(body.any(0).any(0))
    k = int(zs[np.abs(zs - z).argmin()])
    rows, columns = np.nonzero(body[..., k])
    return float(rows.mean()), float(columns.mean())


def _image(array: np.ndarray) -> sitk.Image:
    """A [rows, columns, slices] array of the axial view as a SimpleITK image (x: columns, y: rows, z: slices)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 0, 1))))
    image.SetSpacing((ATLAS_MM,) * 3)
    return image


def _array(image: sitk.Image) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(image), (1, 2, 0)))


def gate(labels: torch.Tensor, prior: Prior, structures, fill: bool) -> list[str]:
    """Removes each abdominal structure's voxels of ``labels`` (the prior's layout, changed in place) farther than
    ``GATE_MM`` from where the ``prior`` puts it; with ``fill``, a structure left with less than ``MIN_SHARE`` of the
    prior's volume gets the prior's mask where no other structure is. Returns notes."""
    gated = [s for s in structures if s.name in ABDOMINAL]
    # each coarse voxel holds a bit per label value that may lie there
    bit = torch.zeros(256, dtype=torch.int64)
    allowed = np.zeros(prior.labels.shape, dtype=np.int64)
    for s in gated:
        grown = prior.grown(s.label)
        for value in s.target_labels:
            if value < 63:  # (a model of more labels than that leaves the others ungated)
                bit[value] = 1 << value
                allowed |= grown.astype(np.int64) << value
    allowed, maps = torch.from_numpy(allowed), [torch.from_numpy(m) for m in prior.maps]
    removed = torch.zeros(256, dtype=torch.int64)
    for index, values in labelled_voxels(labels):
        wanted = bit[values.long()]
        wrong = (wanted != 0) & ((allowed[tuple(m[i] for m, i in zip(maps, index))] & wanted) == 0)
        removed += torch.bincount(values[wrong].long(), minlength=256)
        labels[tuple(i[wrong] for i in index)] = 0
    notes = []
    named = [f"{s.name} {int(removed[list(s.target_labels)].sum())}" for s in gated if removed[list(s.target_labels)].any()]
    if named:
        notes.append("voxels far from where the registered atlas puts a structure: " + ", ".join(named))
    if fill:
        counts = torch.bincount(labels.flatten(), minlength=256)
        filled = []
        for s in gated:
            expected = prior.ml(s.label)
            if expected and float(counts[list(s.target_labels)].sum()) * prior.voxel_ml < MIN_SHARE * expected:
                labels[prior.full(prior.labels == s.label) & (labels == 0)] = s.label
                filled.append(s.name)
        if filled:
            notes.append("boxed where the registered atlas puts them (the first stage found too little): "
                         + ", ".join(filled))
    return notes
