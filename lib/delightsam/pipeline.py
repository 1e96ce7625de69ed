"""The served pipeline: how a modality is segmented, in one stage or two, with which settings.

One description (``Pipeline``) for everything that segments volumes as users get them: the app's infer tasks (the
served model's settings hold one; a request derives its own with ``for_request``, which decides once whether it
refines), the train task's validation (and so its publish decision), the bundle and the evaluation. In two stages
the first stage's masks (``first_stage``) become box prompts that the refiner, all of the foundation with the
adaptation the model carries, decodes (``refinement``); the refiner is built and cached here (``Pipeline.refiner``).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, replace

import torch

from .first_stage import SliceNetwork, VolumeResult, segment_with
from .foundation import foundation_model
from .keyframes import refine_stride
from .model import DeLightSAM
from .multiplanar import SEVERAL_PLANES_BELOW
from .precision import resolve
from .refinement import refine

PROMPTS = ("3d", "slice")
# ``Pipeline.memory_mb``: MB an inference adds whatever its size, and bytes per voxel beside the volume as read and
# its oriented copy. Measured through /infer (scripts/benchmark_memory.py, app defaults, int16 CT): the abdomen at
# 512x512x600, whose first stage finds organs everywhere, 16.2 bytes a voxel above the resting server (the peak is
# the connected components of the second stage's prompts); a 1024^3 volume of zeros (nothing found, nothing
# refined) 7.7. These carry a margin: an estimate must not be below what a volume can take. A CT's body frame
# (``body_frame``) adds its body mask and a rule's mask, a byte a voxel each (not yet measured through /infer).
MEMORY_FIXED_MB, MEMORY_ONE_STAGE, MEMORY_TWO_STAGE = 512.0, 7.0, 15.0
# a volume seen in several planes (``multiplanar``) holds, per structure, the planes' float16 sum (2 bytes a voxel),
# and beside the acquisition plane's oriented copy of the volume another plane's (through /infer, scripts/
# benchmark_memory.py --parts mr: 12-18 bytes a voxel above rest for a 1 and a 0.7 mm head, the estimate 2-3 times)
MEMORY_FUSED = 2.0


@dataclass
class Pipeline:
    refined: list[str] = field(default_factory=list)  # modalities segmented in two stages (the refiner's boxes)
    size: int = 96  # the refiner's input for a whole slice (the app's refine_size)
    prompts: str = "slice"  # the second stage's boxes: per slice or one per structure ("3d")
    refine_every_mm: float = 10.0  # the refiner decodes one slice about every this many mm
    first_every_mm: float = 3.0  # in two stages, the first stage sees one slice about every this many mm
    precision: str = "auto"  # the networks' products: "auto" (bfloat16 where the CPU has it natively), "float32"...

    def refines(self, modality: str) -> bool:
        return modality in self.refined or "*" in self.refined

    def for_request(self, modality: str, refine: bool | None = None, prompts: str | None = None) -> Pipeline:
        """The pipeline of one request for ``modality``: two stages or one as ``refine`` says (None: as this pipeline
        does), with its ``prompts`` (None: this pipeline's). What it segments and describes is what was decided."""
        two = self.refines(modality) if refine is None else refine
        return replace(self, refined=[modality] if two else [], prompts=prompts or self.prompts)

    def build_refiner(self, model: DeLightSAM) -> DeLightSAM:
        """A new second stage for ``model``: the foundation with the adaptation ``model`` carries, at ``size``, on
        ``model``'s device (the refiner's trainer adapts one of its own)."""
        return foundation_model(model, img_size=self.size).to(next(model.parameters()).device)

    def refiner(self, model: DeLightSAM) -> DeLightSAM:
        """``model``'s second stage, built once per model, input size, adaptation, configuration and device, and kept
        as long as the model is (a hot reload's old model takes its refiner with it). A model's adaptation
        (``refiner_state``) and configuration are replaced, never changed in place, so their identities say whether
        the kept refiner is still the model's."""
        size, device = self.size, next(model.parameters()).device
        with _BUILDING:
            kept = _REFINERS.get(model)
            if kept is not None and kept[:2] == (size, device) and kept[2] is model.refiner_state \
                    and kept[3] is model.config:
                return kept[4]
            built = self.build_refiner(model)
            _REFINERS[model] = (size, device, model.refiner_state, model.config, built)
            return built

    def segment(self, model: DeLightSAM, image, modality: str, **options) -> VolumeResult:
        """``segment_volume`` as served: two stages (with ``refiner(model)``) where the pipeline refines
        ``modality``, else the first stage on every slice. ``options``: batch_size, cleanup, doubt..."""
        two = self.refines(modality)
        return segment_volume(model, image, modality, refiner=self.refiner(model) if two else None,
                              prompts=self.prompts, refine_every_mm=self.refine_every_mm,
                              every_mm=self.first_every_mm if two else None, precision=self.precision, **options)

    def precision_on(self, device) -> str:
        """The products' number format on ``device``, "float32" or "bfloat16" (``precision.resolve``)."""
        return resolve(self.precision, device)

    def memory_mb(self, modality: str, voxels: int, itemsize: int, fused_structures: int = 0) -> float:
        """The peak memory that one inference of a volume of ``voxels`` stored ``itemsize`` bytes a voxel adds to a
        resting server: a fixed part (the refiner's copies, activations) and bytes per voxel (the volume as read,
        its oriented copy, the label maps, the second stage's connected components, the written result), measured
        through ``/infer`` by scripts/benchmark_memory.py, with a margin; ``fused_structures``: the structures of a
        modality seen in several planes (``multiplanar``: the planes' sum, float16, and another plane's copy)."""
        per_voxel = itemsize * 2 + (MEMORY_TWO_STAGE if self.refines(modality) else MEMORY_ONE_STAGE) \
            + (MEMORY_FUSED * fused_structures + itemsize if fused_structures else 0)
        return MEMORY_FIXED_MB + per_voxel * voxels / 2 ** 20

    def describe(self, modality: str, adapted: bool, planes=(), symmetric: bool = False) -> str:
        """The pipeline's name for a modality (the model card's, /info's and each result's); ``adapted``: whether the
        refiner carries queries and heads trained on users' labels for it (``refiner_training.is_adapted``);
        ``planes`` and ``symmetric``: the modality's (``multiplanar``: only a symmetric one's thick series are mirrored)."""
        mirrored = ", a thicker series' axial or coronal slices with their left-right mirror images, averaged" \
            if symmetric else ""
        seen = (f"; a volume with no axis {SEVERAL_PLANES_BELOW:g} times the next seen in {', '.join(planes)} slices, "
                f"averaged{mirrored}") if len(planes) > 1 else ""
        if not self.refines(modality):
            return f"De-LightSAM, one stage (prompt-free masks on every slice{seen})"
        return (f"De-LightSAM coarse masks (a slice about every {self.first_every_mm:g} mm{seen}) -> boxes "
                f"({'per slice' if self.prompts == 'slice' else '3-D'}) -> LiteMedSAM "
                f"{'with queries and heads adapted on users labels' if adapted else '(frozen)'} at input {self.size}, "
                f"a slice about every {self.refine_every_mm:g} mm")


# model -> (the refiner's input size, and the device, adaptation and configuration it was built with; the refiner):
# ``Pipeline.refiner``'s
_REFINERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BUILDING = threading.Lock()


@torch.inference_mode()
def segment_volume(model: DeLightSAM, volume, modality: str, spacing=None, batch_size: int = 8,
                   threshold: float = 0.5, cleanup: bool = False, progress: bool = False, affine=None,
                   refiner: DeLightSAM | None = None, prompts: str = "3d", doubt: bool = False,
                   refine_every_mm: float | None = None, every_mm: float | None = None,
                   precision: str = "float32") -> VolumeResult:
    """Label map of a 3-D volume on its own grid. ``volume``: a MetaTensor (its affine gives the orientation),
    or an [X, Y, Z] array or tensor with ``affine`` or ``spacing`` (else taken as stored RAS, 1 mm).

    With a ``refiner`` (a model with box prompts, such as ``foundation.foundation_model``), inference has two
    stages: ``model`` segments every slice prompt-free, then each structure's largest connected component
    becomes its automatic prompt, one 3-D box (``prompts="3d"``: the same box on every slice of its extent,
    and one slice beyond) or a box per slice (``"slice"``), and the refiner decodes the slices that have one
    (with ``refine_every_mm``, one slice in about that many millimetres, the others interpolated:
    ``refinement.refine``). ``every_mm``: the same for the first stage (its probabilities interpolated between
    decoded slices), so that its cost follows the anatomy's extent rather than the number of slices.
    ``doubt``: also measure how unsure the (first-stage) model is, per structure (``uncertainty``). ``precision``:
    the networks' products, "float32" or "bfloat16" (``precision``; a note says when it is bfloat16)."""
    spec = model.config.modality(modality)
    precision = resolve(precision, next(model.parameters()).device)
    if refiner is not None and prompts not in PROMPTS:
        raise ValueError(f"prompts must be one of {PROMPTS}, got {prompts!r}")
    second = None if refiner is None else (
        lambda grey, coarse, oriented, placed=False: refine(
            refiner, spec, grey, coarse, prompts, batch_size, threshold, refine_stride(refine_every_mm, oriented.spacing[2]),
            oriented, precision, box_atlas=not placed))
    result = segment_with(SliceNetwork(model, modality, precision), volume, spec, spacing, batch_size, threshold, cleanup,
                          progress, affine=affine, refine=second, doubt=doubt, every_mm=every_mm,
                          atlas=model.atlases.get(modality))
    if precision != "float32":
        result.notes.append(f"the networks' matrix products in {precision} (the app's --conf precision float32 "
                            "for float32)")
    return result
