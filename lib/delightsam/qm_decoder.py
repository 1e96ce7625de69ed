"""QM-Decoder: learned decoding queries through SAM's two-way transformer, one mask per query.

There are no point, box or mask prompts and no IoU token: the only tokens are the queries of a *query
group*. Each modality names a group and, per target structure, the query whose output becomes that
structure's mask; every query gives an independent binary mask (sigmoid, not softmax). The released
model has one group of 7 queries shared by the six modalities (query i is modality i's channel, the 7th
only takes part in attention). A new modality gets a group of its own, so adding it cannot change
the outputs of the modalities the model already had.
"""

from __future__ import annotations

import torch
from torch import nn

from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from segment_anything.modeling.transformer import TwoWayTransformer

from .config import FOUNDATION_TOKENS, DeLightSAMConfig


class QMDecoder(nn.Module):
    def __init__(self, config: DeLightSAMConfig) -> None:
        super().__init__()
        self.dim = dim = config.prompt_dim
        self.transformer = TwoWayTransformer(depth=config.decoder_depth, embedding_dim=dim,
                                             num_heads=config.decoder_heads, mlp_dim=config.decoder_mlp_dim)
        self.positional_encoding = PositionEmbeddingRandom(dim // 2)  # SAM's random-Fourier image PE
        self.upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU(),
        )
        self.hypernetwork = MLP(dim, dim, dim // 8, 3)  # one MLP shared by all queries, as released
        self.query_groups = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(n, dim)) for name, n in config.query_groups.items()})
        self.group_heads = nn.ModuleDict({name: MLP(dim, dim, dim // 8, 3) for name in config.own_heads})
        if config.box_prompts:
            # with a box, a structure's query decodes as SAM's first mask token does, among the foundation's
            # IoU token and its other mask tokens; the dense "no mask" embedding is added to the image embedding
            self.foundation_tokens = nn.Parameter(torch.zeros(FOUNDATION_TOKENS, dim))
            self.no_mask = nn.Parameter(torch.zeros(dim))
        else:
            self.foundation_tokens = self.no_mask = None

    def add_group_head(self, name: str) -> None:
        """Gives a query group its own hypernetwork head, starting as a copy of the shared one."""
        if name not in self.group_heads:
            head = MLP(self.dim, self.dim, self.dim // 8, 3).to(self.hypernetwork.layers[0].weight.device)
            head.load_state_dict(self.hypernetwork.state_dict())
            self.group_heads[name] = head

    def add_query_group(self, name: str, num_queries: int) -> None:
        if name in self.query_groups:
            raise ValueError(f"query group {name!r} exists already")
        ref = self.hypernetwork.layers[0].weight
        self.query_groups[name] = nn.Parameter(torch.randn(num_queries, self.dim, device=ref.device, dtype=ref.dtype))

    def forward(self, src: torch.Tensor, groups: list[str], tokens: list[list[int]]) -> torch.Tensor:
        """Low-resolution mask logits [B, S_max, 4G, 4G].

        src: prompted image embeddings [B, D, G, G]; groups[i]: sample i's query group; tokens[i]: the
        queries whose masks sample i returns, in order. Samples with fewer than S_max structures are padded
        with -inf (probability 0).
        """
        b, _, g, _ = src.shape
        pe = self.positional_encoding((g, g)).unsqueeze(0)
        out = src.new_full((b, max(len(t) for t in tokens), 4 * g, 4 * g), float("-inf"))
        for group in dict.fromkeys(groups):
            rows = [i for i in range(b) if groups[i] == group]
            head = self.group_heads[group] if group in self.group_heads else self.hypernetwork
            masks = self._decode(src[rows], pe, self.query_groups[group], head)
            for row, sample in enumerate(rows):
                out[sample, : len(tokens[sample])] = masks[row, tokens[sample]]
        return out

    def _decode(self, src: torch.Tensor, pe: torch.Tensor, queries: torch.Tensor, head: nn.Module,
                mask_rows: slice = slice(None)) -> torch.Tensor:
        """Token sets [B, T, D] (or one set [T, D] for all) for a batch of embeddings -> the masks of tokens
        ``mask_rows``: [B, Q, 4G, 4G]."""
        b, d, g, _ = src.shape
        queries = queries.expand(b, -1, -1) if queries.dim() == 2 else queries
        hs, keys = self.transformer(src, pe.expand(b, -1, -1, -1), queries)
        upscaled = self.upscaling(keys.transpose(1, 2).reshape(b, d, g, g))  # [B, D/8, 4G, 4G]
        hyper = head(hs[:, mask_rows])  # [B, Q, D/8]
        return (hyper @ upscaled.flatten(2)).view(b, -1, 4 * g, 4 * g)

    def forward_with_boxes(self, src: torch.Tensor, groups: list[str], tokens: list[list[int]],
                           box_tokens: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """Low-resolution mask logits [B, S_max, 4G, 4G], each structure decoded on its own with its box, as the
        foundation decodes a box: tokens [IoU, the structure's query, mask tokens 2-4, the box's two corners].

        box_tokens: [N, 2, D] for N (sample, channel) pairs ``which`` [N, 2]; channels without a box are -inf."""
        b, _, g, _ = src.shape
        pe = self.positional_encoding((g, g)).unsqueeze(0)
        out = src.new_full((b, max(len(t) for t in tokens), 4 * g, 4 * g), float("-inf"))
        if len(which) == 0:
            return out
        samples, channels = which[:, 0], which[:, 1]
        queries = torch.stack([self.query_groups[groups[i]][tokens[i][c]] for i, c in which.tolist()])
        ft = self.foundation_tokens.unsqueeze(0).expand(len(which), -1, -1)
        sets = torch.cat([ft[:, :1], queries[:, None], ft[:, 1:], box_tokens], dim=1)
        heads = [self.group_heads[groups[i]] if groups[i] in self.group_heads else self.hypernetwork for i in samples.tolist()]
        for head in dict.fromkeys(heads):  # one pass per hypernetwork head
            rows = torch.tensor([k for k, h in enumerate(heads) if h is head], device=src.device)
            masks = self._decode(src[samples[rows]], pe, sets[rows], head, slice(1, 2))
            out[samples[rows], channels[rows]] = masks[:, 0].to(out.dtype)
        return out
