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
    def __init__(self, prompt_dim: int = 256, head_dim: int = 64, box_prompts: bool = False) -> None:
        super().__init__()
        self.patch_head = nn.Sequential(
            nn.Conv2d(prompt_dim, head_dim, kernel_size=2, stride=2), LayerNorm2d(head_dim), nn.GELU(),
            nn.Conv2d(head_dim, 1, kernel_size=1),
        )
        self.prompt_encoder = nn.Sequential(nn.Conv2d(1, prompt_dim, kernel_size=1), LayerNorm2d(prompt_dim), nn.GELU())
        # SAM's box embedding: a box is its two corners, each the positional encoding of its coordinates plus a
        # learned embedding of which corner it is (the foundation's point_embeddings 2 and 3)
        self.box_corners = nn.Parameter(torch.zeros(2, prompt_dim)) if box_prompts else None

    def box_tokens(self, boxes: torch.Tensor, positional_encoding, input_size: int) -> torch.Tensor:
        """Boxes [N, 4] (x0, y0, x1, y1 in input pixels) -> sparse prompt tokens [N, 2, D], as SAM's prompt
        encoder embeds a box (coordinates at pixel centres, normalised by the input size)."""
        if self.box_corners is None:
            raise ValueError("this model has no box prompts (its configuration's box_prompts is false)")
        corners = (boxes.float() + 0.5).view(-1, 2, 2)
        return positional_encoding.forward_with_coords(corners, (input_size, input_size)) + self.box_corners

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings [B, D, G, G] -> (patch logits [B, 1, G/2, G/2], dense prompt [B, D, G, G])."""
        patch_logits = self.patch_head(embeddings)
        # As released: threshold the probability (not the logit) at 0.5, then nearest-neighbour x2.
        patches = (torch.sigmoid(patch_logits.detach()) >= 0.5).to(embeddings.dtype)
        dense_prompt = self.prompt_encoder(F.interpolate(patches, size=embeddings.shape[-2:], mode="nearest"))
        return patch_logits, dense_prompt


def boxes_from_masks(masks: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Binary masks [..., H, W] -> their bounding boxes [..., 4] (x0, y0, x1, y1 in pixels, grown by ``margin``
    pixels and kept inside the image); NaN where a mask is empty."""
    return boxes_from_profiles(masks.any(dim=-1), masks.any(dim=-2), margin)


def boxes_from_profiles(rows: torch.Tensor, cols: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """``boxes_from_masks`` from the masks' profiles: ``rows`` [..., H] and ``cols`` [..., W], whether each row
    and column holds any of the mask (a caller with a volume gets these by cheap reductions)."""
    h, w = rows.shape[-1], cols.shape[-1]
    idx_r = torch.arange(h, device=rows.device).expand_as(rows)
    idx_c = torch.arange(w, device=cols.device).expand_as(cols)
    big = torch.tensor(10**9, device=rows.device)
    y0, y1 = torch.where(rows, idx_r, big).amin(-1), torch.where(rows, idx_r, -big).amax(-1)
    x0, x1 = torch.where(cols, idx_c, big).amin(-1), torch.where(cols, idx_c, -big).amax(-1)
    boxes = torch.stack([x0 - margin, y0 - margin, x1 + margin, y1 + margin], dim=-1).float()
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w - 1, h - 1, w - 1, h - 1], device=rows.device).float())
    return torch.where(rows.any(-1, keepdim=True), boxes, torch.full_like(boxes, float("nan")))
