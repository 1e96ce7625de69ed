"""SP-Generator: the self-patch prompt generator that replaces clicks and boxes.

A patch head predicts, from the image embedding, which patches of the image hold the target (one logit
per 2x2 embedding cells, i.e. per 32x32 pixels at 1024). The prediction is detached and thresholded,
upsampled back to the embedding grid and encoded into a dense prompt that is added to the image
embedding. Because of the detach, the patch head learns only from its own patch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segment_anything.modeling.common import LayerNorm2d


class SPGenerator(nn.Module):
    def __init__(self, prompt_dim: int = 256, head_dim: int = 64) -> None:
        super().__init__()
        self.patch_head = nn.Sequential(
            nn.Conv2d(prompt_dim, head_dim, kernel_size=2, stride=2), LayerNorm2d(head_dim), nn.GELU(),
            nn.Conv2d(head_dim, 1, kernel_size=1),
        )
        self.prompt_encoder = nn.Sequential(nn.Conv2d(1, prompt_dim, kernel_size=1), LayerNorm2d(prompt_dim), nn.GELU())

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings [B, D, G, G] -> (patch logits [B, 1, G/2, G/2], dense prompt [B, D, G, G])."""
        patch_logits = self.patch_head(embeddings)
        # As released: threshold the probability (not the logit) at 0.5, then nearest-neighbour x2.
        patches = (torch.sigmoid(patch_logits.detach()) >= 0.5).to(embeddings.dtype)
        dense_prompt = self.prompt_encoder(F.interpolate(patches, size=embeddings.shape[-2:], mode="nearest"))
        return patch_logits, dense_prompt
