"""DC-Encoder: the TinyViT-5M trunk shared by all modalities, plus one modality controller per modality.

The trunk is MobileSAM's TinyViT (a convolutional stage, then three stages of windowed attention
blocks, then SAM's neck). A *modality controller* adds to each of the attention blocks:

- one learnable key/value token in head space, appended to the keys and to the values of every window,
  with a learnable scalar logit bias for it (the relative position biases cover only the real keys);
- a parallel "expert" MLP: ``x <- x + mlp(x) + expert(x)``.

Unlike the released code (one controller per checkpoint), the encoder holds any number of named
controllers and picks one per sample, so a batch may mix modalities.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeLightSAMConfig
from segment_anything.modeling.common import LayerNorm2d


class ConvBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (TinyViT's Conv2d_BN)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class MBConv(nn.Module):
    """Inverted residual block of the convolutional first stage."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.expand = ConvBN(dim, hidden)
        self.depthwise = ConvBN(hidden, hidden, 3, groups=hidden)
        self.project = ConvBN(hidden, dim, bn_weight_init=0.0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.depthwise(self.act(self.expand(x))))
        return self.act(self.project(y) + x)


class PatchMerging(nn.Module):
    """Pointwise, depthwise (strided), pointwise; returns tokens [B, H'*W', C']."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.expand = ConvBN(dim, out_dim)
        self.depthwise = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.project = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        x = self.project(self.act(self.depthwise(self.act(self.expand(x)))))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Pre-norm MLP of a TinyViT block (also the form of a controller's expert)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class BlockController(nn.Module):
    """What one modality adds to one attention block: a key/value token, its logit bias, an expert MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        key_dim = dim // num_heads
        # The released initialisation: uniform(+-sqrt(6 / (3 * 16 * 16 + 16))), zero bias, trunc-normal MLP.
        bound = math.sqrt(6.0 / (3 * 16 * 16 + 16))
        self.kv_token = nn.Parameter(torch.empty(num_heads, 1, key_dim).uniform_(-bound, bound))
        self.kv_bias = nn.Parameter(torch.zeros(1))
        self.expert = Mlp(dim, int(dim * mlp_ratio))
        for layer in (self.expert.fc1, self.expert.fc2):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)


class ModalityController(nn.Module):
    """One modality's controller: a BlockController for every attention block, indexed [stage][block]."""

    def __init__(self, config: DeLightSAMConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        for stage, (dim, depth, heads) in enumerate(zip(config.embed_dims, config.depths, config.num_heads)):
            blocks = [] if stage == 0 else [BlockController(dim, heads, config.mlp_ratio) for _ in range(depth)]
            self.stages.append(nn.ModuleList(blocks))


def _relative_position_index(window: int) -> tuple[torch.Tensor, int]:
    """LeViT/TinyViT relative offsets: index [N, N] into a per-head table, and the table size."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    n = len(points)
    return torch.tensor(idxs, dtype=torch.long).view(n, n), len(offsets)


class WindowAttention(nn.Module):
    """TinyViT's windowed attention with the controller's key/value token appended to each window."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        index, size = _relative_position_index(window)
        self.relative_position_bias = nn.Parameter(torch.zeros(num_heads, size))
        self.register_buffer("relative_position_index", index, persistent=False)

    def forward(self, x: torch.Tensor, kv_token: torch.Tensor, kv_bias: torch.Tensor) -> torch.Tensor:
        """x: [W, N, C] windows; kv_token: [W, heads, 1, key_dim]; kv_bias: [W] (one per window), or both for all
        windows alike (kv_token [1, heads, 1, key_dim], kv_bias [1]: one controller for the batch, whose attention
        bias is then not copied per window)."""
        w, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(w, n, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.key_dim, dim=3)  # each [W, heads, N, key_dim]
        kv_token = kv_token.expand(w, -1, -1, -1)
        k = torch.cat([k, kv_token], dim=2)
        v = torch.cat([v, kv_token], dim=2)
        position_bias = self.relative_position_bias[:, self.relative_position_index]  # [heads, N, N]
        m = len(kv_bias)
        bias = torch.cat([position_bias.expand(m, -1, -1, -1),
                          kv_bias.view(m, 1, 1, 1).expand(-1, self.num_heads, n, 1)], dim=3)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.key_dim ** -0.5)
        return self.proj(out.transpose(1, 2).reshape(w, n, c))


def _partition(x: torch.Tensor, size: int, window: int) -> torch.Tensor:
    """[B, size*size, C] -> [B*nW, window*window, C], zero-padding bottom/right as TinyViT does."""
    b, _, c = x.shape
    pad = (window - size % window) % window
    x = F.pad(x.view(b, size, size, c), (0, 0, 0, pad, 0, pad))
    n = (size + pad) // window
    return x.view(b, n, window, n, window, c).transpose(2, 3).reshape(b * n * n, window * window, c)


def _merge(windows: torch.Tensor, b: int, size: int, window: int) -> torch.Tensor:
    """Inverse of _partition: [B*nW, window*window, C] -> [B, size*size, C]."""
    c = windows.shape[-1]
    n = math.ceil(size / window)
    x = windows.view(b, n, n, window, window, c).transpose(2, 3).reshape(b, n * window, n * window, c)
    return x[:, :size, :size].reshape(b, size * size, c)


class TinyViTBlock(nn.Module):
    """Windowed attention, local depthwise conv, MLP; the selected controllers act on attention and MLP."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: int, controllers: list[BlockController],
                sample_controller: torch.Tensor) -> torch.Tensor:
        """x: [B, size*size, C]; sample_controller[i] indexes ``controllers`` for sample i."""
        b, length, c = x.shape
        if len(controllers) == 1:  # the same token and bias for every window
            kv_token, kv_bias = controllers[0].kv_token[None], controllers[0].kv_bias
        else:
            per_window = sample_controller.repeat_interleave(math.ceil(size / self.window) ** 2)
            kv_token = torch.stack([ctl.kv_token for ctl in controllers])[per_window]
            kv_bias = torch.cat([ctl.kv_bias for ctl in controllers])[per_window]
        attn = self.attn(_partition(x, size, self.window), kv_token, kv_bias)
        x = x + _merge(attn, b, size, self.window)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, size, size)).view(b, c, length).transpose(1, 2)
        return x + self.mlp(x) + _experts(x, controllers, sample_controller)


def _experts(x: torch.Tensor, controllers: list[BlockController], sample_controller: torch.Tensor) -> torch.Tensor | float:
    """Each sample through its own controller's expert MLP. Outside training, experts whose output layer is all zeros
    (the foundation's, ``foundation._quiet_additions``: the refiner's are never trained) add exactly nothing and are
    not run: they would cost as much as the block's own MLP."""
    used = sample_controller.unique()
    if not torch.is_grad_enabled() and all(_silent(controllers[i].expert) for i in used.tolist()):
        return 0.0
    if len(used) == 1:
        return controllers[int(used)].expert(x)
    out = torch.zeros_like(x)
    for i in used.tolist():
        rows = (sample_controller == i).nonzero().squeeze(1)
        out = out.index_copy(0, rows, controllers[i].expert(x[rows]))
    return out


def _silent(mlp: Mlp) -> bool:
    return not (mlp.fc2.weight.any() or mlp.fc2.bias.any())


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, out_dim: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MBConv(dim, expand_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> tokens
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 out_dim: int | None, stride: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth)])
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim else None

    def forward(self, x: torch.Tensor, size: int, controllers: list[nn.ModuleList],
                sample_controller: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, size, [stage[i] for stage in controllers], sample_controller)
        if self.downsample is not None:
            b, _, c = x.shape
            x = self.downsample(x.transpose(1, 2).reshape(b, c, size, size))
        return x


class DCEncoder(nn.Module):
    """Image [B, 3, S, S] -> embedding [B, prompt_dim, S/16, S/16], one controller per sample."""

    def __init__(self, config: DeLightSAMConfig) -> None:
        super().__init__()
        self.config = config
        dims, depths = config.embed_dims, config.depths
        kernel, stride = (3, 2) if config.stem == "mobile_sam" else (1, 1)  # see config.STEM_STRIDES
        self.patch_embed = nn.Sequential(ConvBN(3, dims[0] // 2, kernel, stride), nn.GELU(),
                                         ConvBN(dims[0] // 2, dims[0], kernel, stride))
        self.stages = nn.ModuleList([ConvStage(dims[0], depths[0], config.mbconv_expand_ratio, dims[1],
                                               config.merge_strides[0])])
        for i in range(1, len(depths)):
            last = i == len(depths) - 1
            self.stages.append(AttentionStage(dims[i], depths[i], config.num_heads[i], config.window_sizes[i],
                                              config.mlp_ratio, None if last else dims[i + 1],
                                              None if last else config.merge_strides[i]))
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.prompt_dim, 1, bias=False), LayerNorm2d(config.prompt_dim),
            nn.Conv2d(config.prompt_dim, config.prompt_dim, 3, padding=1, bias=False), LayerNorm2d(config.prompt_dim),
        )
        self.controllers = nn.ModuleDict({name: ModalityController(config) for name in config.controller_names})
        self._init_trunk()

    def _init_trunk(self) -> None:
        # TinyViT's initialisation for the Linear and LayerNorm layers of the trunk.
        for name, m in self.named_modules():
            if name.startswith("controllers"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def add_controller(self, name: str, copy_from: str | None = None) -> ModalityController:
        """A new controller, freshly initialised or a copy of an existing one; the trunk is untouched."""
        if name in self.controllers:
            raise ValueError(f"controller {name!r} exists already")
        controller = ModalityController(self.config)
        if copy_from is not None:
            controller.load_state_dict(self.controllers[copy_from].state_dict())
        device = next(self.parameters()).device
        self.controllers[name] = controller.to(device)
        return controller

    def forward(self, images: torch.Tensor, controller_names: list[str]) -> torch.Tensor:
        """images: [B, 3, S, S]; controller_names: one per sample."""
        used = list(dict.fromkeys(controller_names))
        sample_controller = torch.tensor([used.index(n) for n in controller_names], device=images.device)
        controllers = [self.controllers[n].stages for n in used]
        x = self.stages[0](self.patch_embed(images))
        resolutions = self.config.stage_resolutions
        for i in range(1, len(self.stages)):
            x = self.stages[i](x, resolutions[i], [c[i] for c in controllers], sample_controller)
        b, _, c = x.shape
        size = resolutions[-1]
        return self.neck(x.transpose(1, 2).reshape(b, c, size, size))
