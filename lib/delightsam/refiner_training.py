"""Fine-tuning of the second stage (the refiner: all of the foundation decoding box prompts) on users' labels.

The refiner (``foundation.foundation_model``) is LiteMedSAM inside a De-LightSAM network. What adapts is small and
per modality: the modality's query (one decoding query per structure) and its own hypernetwork head (the layer that
turns a query into a mask); the image encoder, the two-way transformer, the box embedding and the upscaling stay
the foundation's, and a distillation term keeps the adapted masks near the frozen foundation's on the same boxes,
so that a few labelled volumes teach a site's structures without the refiner forgetting how to follow a box.

Boxes are made as inference makes them (``refinement.refine``): from the first stage's coarse masks of the same slice
where it found the structure, else from the label, jittered (a coarse mask's box is rarely tight), on whole slices
at the refiner's input size (``refine_size``: the scale at which inference decodes the part of a slice it crops).

The adapted tensors travel inside the coarse model's checkpoint (``checkpoint.REFINER_PREFIX``, ``save_model``),
so that a published version carries the refiner it was validated with, and ``foundation_model`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss

from .geometry import model_input
from .model import DeLightSAM
from .normalization import get_normalization
from .sp_generator import boxes_from_masks


@dataclass
class RefinerTraining:
    size: int = 96  # the refiner's input for a whole slice (the app's refine_size)
    lr: float = 1e-3
    distill: float = 1.0  # weight of the MSE to the frozen foundation's logits on the same boxes
    jitter: float = 0.15  # each side of a label's box moves by up to this share of the box's extent (and 2 pixels)
    coarse_share: float = 0.5  # share of boxes taken from the first stage's coarse mask where it found the structure


def adaptable(refiner: DeLightSAM, modalities: list[str]) -> list[torch.nn.Parameter]:
    """Freezes the refiner, then gives each modality its own hypernetwork head and unfreezes that head and the
    modality's queries (a query group is the modality's own in the models this project makes; one shared with
    another modality is refused, since adapting it would change the other's masks)."""
    refiner.requires_grad_(False)
    for name in modalities:
        group = refiner.config.modality(name).query_group
        if not own_queries(refiner, name):
            raise ValueError(f"modality {name!r} shares its queries with another: give it its own first "
                             f"(DeLightSAM.give_own_parts) before adapting the refiner")
        refiner.give_own_head(group)
        refiner.decoder.query_groups[group].requires_grad_(True)
        refiner.decoder.group_heads[group].requires_grad_(True)
    return [p for p in refiner.parameters() if p.requires_grad]


def own_queries(model: DeLightSAM, modality: str) -> bool:
    group = model.config.modality(modality).query_group
    return all(m.query_group != group for m in model.config.modalities if m.name != modality)


def adapted_state(refiner: DeLightSAM, modalities: list[str]) -> dict[str, torch.Tensor]:
    """The adapted tensors of these modalities (what ``adaptable`` trains), as the checkpoint keeps them."""
    groups = {refiner.config.modality(m).query_group for m in modalities}
    keep = tuple(f"decoder.query_groups.{g}" for g in groups) + tuple(f"decoder.group_heads.{g}." for g in groups)
    return {k: v.detach().cpu().clone() for k, v in refiner.state_dict().items()
            if k in keep or k.startswith(keep)}


def is_adapted(adaptation, query_group: str) -> bool:
    """Whether an adaptation holds the queries of ``query_group``: the one test of whether a modality's refiner was
    adapted on users' labels. ``adaptation``: a model's ``refiner_state``, or the names of a checkpoint's refiner
    tensors without ``checkpoint.REFINER_PREFIX`` (``checkpoint.refiner_names``, read without loading it)."""
    return f"decoder.query_groups.{query_group}" in adaptation


def carries_adaptation(model: DeLightSAM, modality: str) -> bool:
    """``is_adapted`` for a loaded model's modality."""
    return is_adapted(model.refiner_state, model.config.modality(modality).query_group)


def apply_adapted(refiner: DeLightSAM, state: dict[str, torch.Tensor]) -> None:
    """Loads adapted tensors (``adapted_state``) into a refiner made by ``foundation_model``: each must exist there
    with its shape (a head is created for its group first), so that a checkpoint never half-applies."""
    for key in state:
        if key.startswith("decoder.group_heads."):
            group = key.removeprefix("decoder.group_heads.").split(".")[0]
            if group in refiner.config.query_groups:
                refiner.give_own_head(group)
    own = refiner.state_dict()
    wrong = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"the checkpoint's refiner tensors do not fit this model: {wrong[:3]}")
    refiner.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def _fitted(fitted: tuple[int, int], from_size: int, to_size: int) -> tuple[int, int]:
    return tuple(max(1, round(n * to_size / from_size)) for n in fitted)


def jittered(boxes: torch.Tensor, share: float, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Each side moved outwards or inwards by up to ``share`` of the box's extent plus 2 pixels, clipped to the
    image, and never inside out."""
    extent = torch.stack([boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]] * 2, -1) + 1
    moves = (torch.rand(boxes.shape, generator=generator) * 2 - 1) * (share * extent + 2)
    out = (boxes + moves * torch.tensor([-1.0, -1.0, 1.0, 1.0])).clamp(0, limit - 1)
    low, high = torch.minimum(out[..., :2], out[..., 2:]), torch.maximum(out[..., :2], out[..., 2:])
    return torch.cat([low, high], -1)


def prompts(masks: torch.Tensor, coarse: torch.Tensor, known: torch.Tensor, settings: RefinerTraining,
            generator: torch.Generator) -> torch.Tensor:
    """[B, S, 4] boxes at the refiner's input for the structures present and known in ``masks`` (NaN for the
    others): the coarse mask's box where the first stage found the structure (with ``coarse_share``'s odds), else
    the label's, jittered."""
    truth, found = boxes_from_masks(masks), boxes_from_masks(coarse)
    boxes = jittered(truth, settings.jitter, masks.shape[-1], generator)
    use_coarse = torch.isfinite(found).all(-1) & (torch.rand(found.shape[:2], generator=generator) < settings.coarse_share)
    boxes[use_coarse] = found[use_coarse]
    boxes[~(torch.isfinite(truth).all(-1) & known.cpu())] = float("nan")
    return boxes


class RefinerTrainer:
    """One optimiser step at a time on the batches the coarse model trains on (``training_data.SliceData.batch``)."""

    def __init__(self, refiner: DeLightSAM, foundation: DeLightSAM, modalities: list[str], settings: RefinerTraining,
                 seed: int = 0) -> None:
        """``refiner``: the refiner to adapt (in place; it may carry an earlier adaptation); ``foundation``: the
        refiner with none (``foundation_model(model, adapted=False)``), the distillation's frozen reference."""
        self.refiner, self.modalities, self.settings = refiner, modalities, settings
        self.frozen = foundation.requires_grad_(False).eval()
        self.params = adaptable(refiner, modalities)
        self.optimizer = torch.optim.Adam(self.params, lr=settings.lr)
        self.normalise = get_normalization(refiner)
        self.generator = torch.Generator().manual_seed(seed)
        self.dice_focal = DiceFocalLoss(sigmoid=True, batch=False, reduction="mean")

    def step(self, grey: torch.Tensor, masks: torch.Tensor, coarse_logits: torch.Tensor, fitted: list[tuple[int, int]],
             modalities: list[str], known: torch.Tensor) -> dict[str, float] | None:
        """grey [B, 1|3, S, S] grey levels and masks [B, S_max, S, S] at the coarse model's input, its logits there
        (the coarse masks), each slice's fitted size; returns the losses, or None when no slice had a box."""
        size, device = self.settings.size, next(self.refiner.parameters()).device
        keep = [i for i, m in enumerate(modalities) if m in self.modalities]
        if not keep:
            return None
        from_size = grey.shape[-1]
        small = F.interpolate(grey[keep, :1].float(), (size, size), mode="bilinear", align_corners=False, antialias=True)
        truth = F.interpolate(masks[keep].float(), (size, size), mode="nearest-exact") > 0.5
        coarse = F.interpolate(coarse_logits[keep].detach().float().nan_to_num(neginf=-100.0), (size, size),
                               mode="bilinear", align_corners=False) > 0
        boxes = prompts(truth.cpu(), coarse.cpu(), known[keep], self.settings, self.generator)
        if not torch.isfinite(boxes).all(-1).any():
            return None
        inputs = torch.cat([model_input(small[i: i + 1], _fitted(fitted[k], from_size, size), self.normalise)
                            for i, k in enumerate(keep)]).to(device)
        names, boxed = [modalities[k] for k in keep], torch.isfinite(boxes).all(-1)
        out = self.refiner(inputs, names, boxes.to(device))
        with torch.no_grad():
            reference = self.frozen(inputs, names, boxes.to(device)).low_res_logits
        segmentation = torch.stack([self.dice_focal(out.mask_logits[i: i + 1, boxed[i].to(device)],
                                                    truth[i: i + 1, boxed[i]].float().to(device))
                                    for i in range(len(keep)) if boxed[i].any()]).mean()
        on = boxed.to(device)
        distill = F.mse_loss(out.low_res_logits[on], reference[on])
        total = segmentation + self.settings.distill * distill
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        return {"refiner_segmentation": float(segmentation.detach()), "refiner_distill": float(distill.detach()),
                "refiner_total": float(total.detach())}

    def state(self) -> dict[str, torch.Tensor]:
        return adapted_state(self.refiner, self.modalities)
