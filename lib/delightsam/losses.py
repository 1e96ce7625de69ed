"""Training losses: feature distillation (MDKD), segmentation on the masks, and the SP-Generator's patch loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceFocalLoss
from torch import nn

from .model import DeLightSAMOutput


@dataclass
class LossWeights:
    distill: float = 1.0  # MSE between student and teacher embeddings
    segmentation: float = 1.0  # Dice + focal on each structure's mask
    patch: float = 1.0  # BCE of the SP-Generator's patch map against the max-pooled union of the masks


class DeLightSAMLoss(nn.Module):
    def __init__(self, weights: LossWeights | None = None) -> None:
        super().__init__()
        self.weights = weights or LossWeights()
        # per sample and channel (batch=False), so the loss of a sample does not depend on its batch
        self.dice_focal = DiceFocalLoss(sigmoid=True, batch=False, reduction="mean")

    def forward(self, out: DeLightSAMOutput, masks: torch.Tensor, teacher: torch.Tensor | None = None,
                known: torch.Tensor | None = None, distilled: torch.Tensor | None = None) -> dict:
        """masks: [B, S_max, H, W] in {0, 1} at the model's input size; channels beyond a sample's structures
        are ignored. teacher: [B, 256, G, G] or None (no distillation). known: [B, S_max] whether each mask is
        known (a structure the user did not label is not trained as absent): unknown masks add no segmentation
        loss, and a sample with one adds no patch loss (its union of masks would miss that structure).
        distilled: [B] the samples that ``teacher`` holds embeddings of, in order (None: all)."""
        terms = {}
        seg, complete = [], []
        for i, structures in enumerate(out.structures):
            n = len(structures)
            channels = torch.arange(n, device=masks.device) if known is None else known[i, :n].nonzero()[:, 0]
            complete.append(len(channels) == n)
            if len(channels):
                seg.append(self.dice_focal(out.mask_logits[i : i + 1, channels], masks[i : i + 1, channels]))
        zero = out.mask_logits.sum() * 0
        terms["segmentation"] = torch.stack(seg).mean() if seg else zero
        grid = out.patch_logits.shape[-1]
        union = masks.amax(dim=1, keepdim=True)
        target = F.adaptive_max_pool2d(union, grid)
        per_sample = F.binary_cross_entropy_with_logits(out.patch_logits, target, reduction="none").flatten(1).mean(1)
        weights = torch.tensor(complete, dtype=per_sample.dtype, device=per_sample.device)
        terms["patch"] = (per_sample * weights).sum() / weights.sum() if weights.any() else zero
        if teacher is not None and self.weights.distill:
            student = out.image_embeddings if distilled is None else out.image_embeddings[distilled]
            terms["distill"] = F.mse_loss(student, teacher)
        terms["total"] = sum(getattr(self.weights, k) * v for k, v in terms.items())
        return terms
