"""De-LightSAM: composes the DC-Encoder, the SP-Generator and the QM-Decoder.

The model takes normalised images (see ``normalization.py``) and a modality per sample; it needs no
prompt. ``mask_logits`` come at the input resolution, one channel per structure of the sample's modality.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeLightSAMConfig, Modality, Structure
from .dc_encoder import DCEncoder
from .qm_decoder import QMDecoder
from .sp_generator import SPGenerator


@dataclass
class DeLightSAMOutput:
    mask_logits: torch.Tensor  # [B, S, img_size, img_size]; -inf where a sample has fewer than S structures
    low_res_logits: torch.Tensor  # [B, S, img_size/4, img_size/4], before the bilinear upsampling
    patch_logits: torch.Tensor  # [B, 1, img_size/32, img_size/32], the SP-Generator's patch map
    image_embeddings: torch.Tensor  # [B, 256, img_size/16, img_size/16], the DC-Encoder's output
    structures: list[list[Structure]]  # per sample, the structure of each mask channel


class DeLightSAM(nn.Module):
    def __init__(self, config: DeLightSAMConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = DCEncoder(config)
        self.sp_generator = SPGenerator(config.prompt_dim, config.patch_head_dim, config.box_prompts)
        self.decoder = QMDecoder(config)
        # the second stage's adapted queries and heads (``refiner_training.adapted_state``), which the checkpoint
        # carries beside the model's own tensors; replaced as a whole, never changed in place (``pipeline``)
        self.refiner_state: dict[str, torch.Tensor] = {}
        self.atlases: dict = {}  # modality -> registration_prior.Atlas: a labelled scan registered as a prior

    def forward(self, images: torch.Tensor, modality: str | Sequence[str],
                boxes: torch.Tensor | None = None) -> DeLightSAMOutput:
        """images: [B, 3, S, S] normalised as ``config.pixel_mean``/``pixel_std`` say, S = ``config.img_size``;
        modality: one name for the whole batch, or one per sample. ``boxes`` (models with ``box_prompts``):
        [B, S_max, 4] one box per structure channel (x0, y0, x1, y1 in input pixels; NaN: no box, and that
        channel is empty); without boxes the model is prompt-free."""
        modalities = self._modalities_for(images, modality)
        images = images.as_subclass(torch.Tensor)  # MONAI MetaTensors would carry metadata through every layer
        embeddings = self.encoder(images, [m.controller for m in modalities])
        patch_logits, dense_prompt = self.sp_generator(embeddings)
        src = embeddings + dense_prompt
        if self.decoder.no_mask is not None:
            src = src + self.decoder.no_mask.view(1, -1, 1, 1)
        groups, tokens = [m.query_group for m in modalities], [[s.token for s in m.structures] for m in modalities]
        if boxes is None:
            low_res = self.decoder(src, groups, tokens)
        else:
            which = torch.isfinite(boxes).all(-1).nonzero()
            box_tokens = self.sp_generator.box_tokens(boxes[which[:, 0], which[:, 1]], self.decoder.positional_encoding,
                                                      self.config.img_size)
            low_res = self.decoder.forward_with_boxes(src, groups, tokens, box_tokens, which)
        size = self.config.img_size
        counts = torch.tensor([len(m.structures) for m in modalities], device=low_res.device)
        padding = (torch.arange(low_res.shape[1], device=low_res.device) >= counts[:, None])[..., None, None]
        if boxes is not None:  # a structure without a box is empty as well
            padding = padding | ~torch.isfinite(boxes[:, : low_res.shape[1]]).all(-1)[..., None, None]
        masks = F.interpolate(low_res.masked_fill(padding, 0.0), (size, size), mode="bilinear", align_corners=False)
        masks = masks.masked_fill(padding, float("-inf"))  # bilinear would turn -inf padding into NaN
        return DeLightSAMOutput(masks, low_res, patch_logits, embeddings, [list(m.structures) for m in modalities])

    def _modalities_for(self, images: torch.Tensor, modality: str | Sequence[str]) -> list[Modality]:
        size = self.config.img_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(f"expected normalised images [B, 3, {size}, {size}], got {list(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"expected a float tensor of normalised images, got {images.dtype}")
        names = [modality] * images.shape[0] if isinstance(modality, str) else list(modality)
        if len(names) != images.shape[0]:
            raise ValueError(f"{len(names)} modalities given for a batch of {images.shape[0]} images")
        return [self.config.modality(n) for n in names]

    def add_modality(self, name: str, structures: Sequence[str | tuple | Structure], copy_controller_from: str | None = None,
                     intensity: dict | None = None, controller: str | None = None, title: str = "",
                     pixel_mm: float | None = None) -> Modality:
        """Adds a modality with its own query group (one query per structure) and a controller: a new one named
        after the modality, or ``controller``: shared if one of that name exists (as the released modalities
        share theirs), else new under that name.

        Nothing that existing modalities use changes, so their outputs stay the same. Structures are names
        (label ids 1, 2, ... in order), (name, label id[, parts]) tuples or ``Structure``s (token ignored).
        """
        controller = controller or name
        shared = controller in self.config.controller_names
        if name in self.config.modality_names or name in self.config.query_groups or (shared and controller == name):
            raise ValueError(f"modality {name!r} exists already")
        specs = [_structure(s, token) for token, s in enumerate(structures)]
        modality = Modality(name, controller, name, specs, intensity, title, pixel_mm)
        config = self.config.replace(query_groups={**self.config.query_groups, name: len(specs)},
                                     modalities=[*self.config.modalities, modality])
        if not shared:
            self.encoder.add_controller(controller, copy_from=copy_controller_from)
        self.decoder.add_query_group(name, len(specs))
        self.config = self.encoder.config = config
        return config.modality(name)

    def give_own_parts(self, modality: str) -> None:
        """Gives a modality its own controller and query group (copies of the shared ones) and its own head,
        so that training them cannot change any other modality's output."""
        spec = self.config.modality(modality)
        others = [m for m in self.config.modalities if m.name != modality]
        controller, group = spec.controller, spec.query_group
        if any(m.controller == controller for m in others):
            controller = self._free_name(modality, set(self.config.controller_names))
            self.encoder.add_controller(controller, copy_from=spec.controller)
        if any(m.query_group == group for m in others):
            group = self._free_name(modality, set(self.config.query_groups))
            self.decoder.query_groups[group] = nn.Parameter(self.decoder.query_groups[spec.query_group].detach().clone())
            if spec.query_group in self.decoder.group_heads:
                self.decoder.add_group_head(group)
                self.decoder.group_heads[group].load_state_dict(self.decoder.group_heads[spec.query_group].state_dict())
        modalities = [dataclasses.replace(m, controller=controller, query_group=group) if m.name == modality else m
                      for m in self.config.modalities]
        self.config = self.encoder.config = self.config.replace(
            modalities=modalities, query_groups={**self.config.query_groups, group: self.config.query_groups[spec.query_group]})
        self.give_own_head(group)

    @staticmethod
    def _free_name(base: str, taken: set[str]) -> str:
        name, i = base, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    def give_own_head(self, query_group: str) -> None:
        """Lets a query group train a hypernetwork head of its own (see QMDecoder.add_group_head)."""
        if query_group not in self.config.query_groups:
            raise KeyError(f"unknown query group {query_group!r}")
        self.decoder.add_group_head(query_group)
        if query_group not in self.config.own_heads:
            self.config = self.encoder.config = self.config.replace(own_heads=[*self.config.own_heads, query_group])


def _structure(spec, token: int) -> Structure:
    if isinstance(spec, Structure):
        return Structure(spec.name, spec.label, token, list(spec.parts))
    if isinstance(spec, str):
        return Structure(spec, token + 1, token)
    name, label, *parts = spec
    return Structure(name, label, token, list(parts[0]) if parts else [])


_RESIZED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {input size: the model at that size}
_RESIZING = threading.Lock()


def resized(model: DeLightSAM, img_size: int) -> DeLightSAM:
    """``model`` at another input size: the same weights (every one of them is independent of the size), for the
    refiner to see part of a slice at a whole slice's scale. Kept per model and size as long as the model is (a
    refiner's copies go with it); a model's weights are not changed once it is resized (the served refiners)."""
    if img_size == model.config.img_size:
        return model
    with _RESIZING:
        copies = _RESIZED.setdefault(model, {})
        if img_size not in copies:
            other = DeLightSAM(model.config.replace(img_size=img_size))
            other.load_state_dict(model.state_dict())
            copies[img_size] = other.to(next(model.parameters()).device).eval()
        return copies[img_size]
