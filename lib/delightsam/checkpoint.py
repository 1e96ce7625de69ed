"""Checkpoint files: the released De-LightSAM format, the project's own format, and the converter between them.

- Released: a ``torch.save`` state dict with keys ``SemiTViT.*``, ``prompt_encoder.*``, ``mask_decoder.*``,
  ``patch_decoder.*``, ``dense_prompter.*``, ``mask_query.weight`` and one modality controller. Read
  with ``weights_only=True``; every key must map onto this project's modules or be one of the released
  network's known-unused tensors (TinyViT's classification head and SAM's point/box/mask prompt
  embeddings); nothing may be missing.
- Project: one safetensors file whose metadata holds the configuration (``DeLightSAMConfig``) and
  whose tensors are the model's state dict, in float32 or float16.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from .files import atomic_path

from .config import FORMAT_VERSION, RELEASED_MODALITIES, RELEASED_QUERY_GROUP, DeLightSAMConfig, released_config
from .model import DeLightSAM
from .registration_prior import atlases_from

FORMAT_NAME = "delightsam"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, foreign or incomplete; the message says which."""


# ---- released key names <-> project key names -------------------------------------------------
# Each pair: released name, project name; {s} {b} {i} are indices, {p} a dotted tail; {c} the controller
# and {g} the query group that a released checkpoint's tensors become.
_RENAMES = [
    ("SemiTViT.patch_embed.seq.{i}.{p}", "encoder.patch_embed.{i}.{p}"),
    ("SemiTViT.layers.{s}.blocks.{b}.conv1.{p}", "encoder.stages.{s}.blocks.{b}.expand.{p}"),
    ("SemiTViT.layers.{s}.blocks.{b}.conv2.{p}", "encoder.stages.{s}.blocks.{b}.depthwise.{p}"),
    ("SemiTViT.layers.{s}.blocks.{b}.conv3.{p}", "encoder.stages.{s}.blocks.{b}.project.{p}"),
    ("SemiTViT.layers.{s}.downsample.conv1.{p}", "encoder.stages.{s}.downsample.expand.{p}"),
    ("SemiTViT.layers.{s}.downsample.conv2.{p}", "encoder.stages.{s}.downsample.depthwise.{p}"),
    ("SemiTViT.layers.{s}.downsample.conv3.{p}", "encoder.stages.{s}.downsample.project.{p}"),
    ("SemiTViT.layers.{s}.blocks.{b}.attn.attention_biases", "encoder.stages.{s}.blocks.{b}.attn.relative_position_bias"),
    ("SemiTViT.layers.{s}.blocks.{b}.attn.deep_QKV_embeddings_med", "encoder.controllers.{c}.stages.{s}.{b}.kv_token"),
    ("SemiTViT.layers.{s}.blocks.{b}.attn.med_attention_biases", "encoder.controllers.{c}.stages.{s}.{b}.kv_bias"),
    ("SemiTViT.layers.{s}.blocks.{b}.med_dah.{p}", "encoder.controllers.{c}.stages.{s}.{b}.expert.{p}"),
    ("SemiTViT.layers.{s}.blocks.{b}.{p}", "encoder.stages.{s}.blocks.{b}.{p}"),  # attn.*, mlp.*, local_conv.*
    ("SemiTViT.neck.{p}", "encoder.neck.{p}"),
    ("prompt_encoder.pe_layer.{p}", "decoder.positional_encoding.{p}"),
    ("mask_decoder.transformer.{p}", "decoder.transformer.{p}"),
    ("mask_decoder.output_upscaling.{p}", "decoder.upscaling.{p}"),
    ("mask_decoder.output_hypernetworks_mlps.0.{p}", "decoder.hypernetwork.{p}"),
    ("patch_decoder.{p}", "sp_generator.patch_head.{p}"),
    ("dense_prompter.{p}", "sp_generator.prompt_encoder.{p}"),
    ("mask_query.weight", "decoder.query_groups.{g}"),
]
# Tensors of the released network that never reach its outputs.
_UNUSED = ["SemiTViT.norm_head.{p}", "SemiTViT.head.{p}", "prompt_encoder.point_embeddings.{p}",
           "prompt_encoder.not_a_point_embed.{p}", "prompt_encoder.mask_downscaling.{p}",
           "prompt_encoder.no_mask_embed.{p}"]
# TinyViT's Conv2d_BN calls its convolution "c"; this project's ConvBN calls it "conv".
_CONV_RELEASED, _CONV_PROJECT = re.compile(r"\.c\.weight$"), re.compile(r"\.conv\.weight$")


def _pattern(template: str, controller: str, group: str) -> re.Pattern:
    text = re.escape(template).replace(r"\{c\}", re.escape(controller)).replace(r"\{g\}", re.escape(group))
    for name, rx in (("s", r"\d+"), ("b", r"\d+"), ("i", r"\d+"), ("p", r".+")):
        text = text.replace(r"\{" + name + r"\}", f"(?P<{name}>{rx})")
    return re.compile(text + "$")


def _rename(key: str, pairs: Iterable[tuple[str, str]], controller: str, group: str) -> str | None:
    for source, target in pairs:
        match = _pattern(source, controller, group).match(key)
        if match:
            return target.format(c=controller, g=group, **match.groupdict())
    return None


def released_to_project(state: dict[str, torch.Tensor], controller: str = RELEASED_QUERY_GROUP,
                        group: str = RELEASED_QUERY_GROUP) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Maps a released state dict onto project names. Returns (mapped tensors, unused keys dropped);
    raises CheckpointError on a key that is neither."""
    mapped, unused, unknown = {}, [], []
    for key, value in state.items():
        if any(_pattern(t, controller, group).match(key) for t in _UNUSED):
            unused.append(key)
            continue
        target = _rename(key, _RENAMES, controller, group)
        if target is None:
            unknown.append(key)
            continue
        mapped[_CONV_RELEASED.sub(".conv.weight", target)] = value
    if unknown:
        raise CheckpointError(f"{len(unknown)} tensor(s) are not part of the released De-LightSAM network: "
                              f"{_shorten(unknown)}")
    return mapped, unused


def project_to_released_name(key: str, controller: str = RELEASED_QUERY_GROUP, group: str = RELEASED_QUERY_GROUP) -> str:
    """The released name of a project key (for messages about what a released file lacks)."""
    key = _CONV_PROJECT.sub(".c.weight", key)
    return _rename(key, [(b, a) for a, b in _RENAMES], controller, group) or key


def _shorten(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _missing(path: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is missing {len(names)} tensor(s) of the De-LightSAM network: "
                           f"{_shorten(sorted(names))}")


# ---- reading files ---------------------------------------------------------------------------
def _read_file(path: Path, content: bytes | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """(tensors, safetensors metadata or None for a torch file). Refuses anything that is not plain tensors.
    ``content``: the file's bytes, already read (one read of a file that another process may replace)."""
    if content is None:
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        content = path.read_bytes()
    if not content:
        raise CheckpointError(f"checkpoint {path} is empty")
    if content[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        try:
            header = json.loads(content[8: 8 + int.from_bytes(content[:8], "little")])
            return safetensors_load(content), header.get("__metadata__") or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is a truncated or corrupt safetensors file ({e})") from e
    if content.startswith(b"PK") and not zipfile.is_zipfile(io.BytesIO(content)):
        raise CheckpointError(f"checkpoint {path} is a truncated PyTorch file (its zip archive is incomplete)")
    try:
        state = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors; it is refused "
                                  f"because loading it could run code") from e
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    for wrapper in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors (found {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}, None


def _is_released(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("SemiTViT.") for k in state)


def _load_into(model: DeLightSAM, state: dict[str, torch.Tensor], path: Path, released_names=None) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        raise _missing(path, [released_names(k) if released_names else k for k in missing])
    if extra:
        raise CheckpointError(f"checkpoint {path} has {len(extra)} tensor(s) this model does not have: {_shorten(extra)}")
    wrong = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"checkpoint {path} has tensors of the wrong shape: {_shorten(wrong, 4)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def load_released(paths: list[str | os.PathLike] | str | os.PathLike, modalities: list[str] | None = None,
                  **config_overrides) -> DeLightSAM:
    """One model from one or several released per-modality checkpoints.

    With one file and no ``modalities``, its controller serves all six released modalities (as the released
    code does). Otherwise ``modalities[i]`` names the modality of ``paths[i]``; the files must agree on
    everything but their controllers.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if modalities is None and len(paths) > 1:
        modalities = [released_modality_from_filename(p) for p in paths]
    if modalities is not None and len(modalities) != len(paths):
        raise ValueError(f"{len(paths)} checkpoints but {len(modalities)} modalities")
    known = [name for name, _ in RELEASED_MODALITIES]
    for m in modalities or []:
        if m not in known:
            raise CheckpointError(f"unknown released modality {m!r}; the released ones are {', '.join(known)}")
    if modalities is not None and len(set(modalities)) != len(modalities):
        raise CheckpointError(f"each modality may come from one checkpoint only: {modalities}")
    controllers = None if modalities is None else dict(zip(modalities, modalities))
    model = DeLightSAM(released_config(controllers, **config_overrides))
    merged: dict[str, torch.Tensor] = {}
    for i, path in enumerate(paths):
        controller = RELEASED_QUERY_GROUP if modalities is None else modalities[i]
        state, _ = _read_file(path)
        if not _is_released(state):
            raise CheckpointError(f"checkpoint {path} is not a released De-LightSAM checkpoint (no SemiTViT.* keys)")
        mapped, _unused = released_to_project(state, controller)
        missing = [k for k in model.state_dict() if k not in mapped
                   and (not k.startswith("encoder.controllers.") or k.startswith(f"encoder.controllers.{controller}."))]
        if missing:
            raise _missing(path, [project_to_released_name(k, controller) for k in missing])
        _check_shared(merged, mapped, path, paths[0])
        merged.update(mapped)
    _load_into(model, merged, paths[0], project_to_released_name)
    return model.eval()


def _check_shared(merged: dict, mapped: dict, path: Path, first: Path) -> None:
    """Files merged into one model must have the same trunk and heads (released training trains only
    the controllers); otherwise one model cannot serve them all."""
    differ = [k for k, v in mapped.items() if k in merged and not torch.equal(merged[k], v)]
    if differ:
        raise CheckpointError(f"checkpoints {first} and {path} differ outside their modality controllers "
                              f"({_shorten(differ, 3)}), so they cannot share one model; convert them separately")


_FILENAME_MODALITY = {"isic": "dermoscopy", "ph2": "dermoscopy", "lung": "xray", "nih": "xray",
                      "ultrasound": "ultrasound", "busi": "ultrasound", "retinal": "fundus", "stare": "fundus",
                      "dsb": "microscopy", "tnbc": "microscopy", "cvccdb": "colonoscopy", "colon": "colonoscopy"}


def released_modality_from_filename(path: str | os.PathLike) -> str:
    """The modality of a released checkpoint named after its dataset, e.g. ESP_isic_best.pth -> dermoscopy."""
    name = Path(path).stem.lower()
    for dataset, modality in _FILENAME_MODALITY.items():
        if re.search(rf"(^|[_\-.]){dataset}([_\-.]|$)", name):
            return modality
    raise CheckpointError(f"cannot tell the modality of {path} from its name; give it as PATH:MODALITY")


# ---- the project's own format ------------------------------------------------------------------
REFINER_PREFIX = "refiner."  # the adapted tensors of the second stage's refiner (refiner_training.adapted_state)


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], set[str]]:
    """A safetensors checkpoint's metadata and tensor names, from its header without its weights ({} and an empty
    set when it cannot be read: whoever loads it says why)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, set(f.keys())
    except Exception:  # unreadable, missing or not safetensors
        return {}, set()


def stored_config(path: str | os.PathLike) -> dict | None:
    """The configuration stored in a project checkpoint (None: not a readable project checkpoint)."""
    try:
        return json.loads(read_header(path)[0]["config"])
    except (KeyError, ValueError, TypeError):
        return None


def refiner_names(path: str | os.PathLike) -> set[str]:
    """The names of a checkpoint's adapted refiner tensors (``REFINER_PREFIX`` removed), from its header."""
    return {k.removeprefix(REFINER_PREFIX) for k in read_header(path)[1] if k.startswith(REFINER_PREFIX)}


def save_model(model: DeLightSAM, path: str | os.PathLike, half: bool = False,
               extra: dict[str, str] | None = None) -> Path:
    """Writes the model and its configuration to one safetensors file, atomically (aside, then renamed).
    ``extra``: more metadata strings (such as the checkpoint a published model was trained from)."""
    path = Path(path)
    dtype = torch.float16 if half else torch.float32
    # the second stage's adapted tensors (refiner_training) travel with the model they were validated with
    state = {**model.state_dict(), **{REFINER_PREFIX + k: v for k, v in model.refiner_state.items()},
             **{k: v for m, atlas in model.atlases.items() for k, v in atlas.tensors(m).items()}}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(model.config.to_dict()), **(extra or {})}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # safetensors reports a full disk as its own error: callers expect OSError
            raise OSError(f"cannot write {path}: {e}") from e
    return path


def _check_refiner(model: DeLightSAM, refiner: dict[str, torch.Tensor], path: Path) -> None:
    """The adapted refiner tensors are a query group of the model's and a head shaped as its hypernetwork."""
    head = model.decoder.hypernetwork.state_dict()
    for key, value in refiner.items():
        group, _, rest = key.removeprefix("decoder.query_groups.").removeprefix("decoder.group_heads.").partition(".")
        if key.startswith("decoder.query_groups.") and not rest and group in model.decoder.query_groups:
            expected = model.decoder.query_groups[group].shape
        elif key.startswith("decoder.group_heads.") and group in model.decoder.query_groups and rest in head:
            expected = head[rest].shape
        else:
            raise CheckpointError(f"checkpoint {path} has a refiner tensor this model has no place for: {REFINER_PREFIX}{key}")
        if value.shape != expected:
            raise CheckpointError(f"checkpoint {path}: refiner tensor {REFINER_PREFIX}{key} has shape {list(value.shape)}, "
                                  f"expected {list(expected)}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *, content: bytes | None = None,
               **config_overrides) -> DeLightSAM:
    """A De-LightSAM model in eval mode from a project checkpoint or a released one.

    ``content``: the file's bytes when the caller has read them (``path`` then only names it in messages).
    ``config_overrides`` replace configuration values, e.g. ``img_size=512`` to run at a smaller input.
    """
    path = Path(path)
    state, metadata = _read_file(path, content)
    if metadata is None and _is_released(state):
        return load_released(path, **config_overrides).to(device)
    if metadata is None or metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path} is neither a De-LightSAM project checkpoint nor a released "
                              f"De-LightSAM state dict (found keys such as {_shorten(sorted(state), 3)})")
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path} has an invalid format version {metadata.get('format_version')!r}") from e
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}; this library reads up to "
                              f"{FORMAT_VERSION}: upgrade delightsam")
    try:
        config = DeLightSAMConfig.from_dict({**json.loads(metadata["config"]), **config_overrides})
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid configuration: {e}") from e
    model = DeLightSAM(config)
    refiner = {k.removeprefix(REFINER_PREFIX): state.pop(k).float() for k in [k for k in state if k.startswith(REFINER_PREFIX)]}
    try:
        atlases = atlases_from(state)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    if set(atlases) - set(config.modality_names):
        raise CheckpointError(f"checkpoint {path} has an atlas of a modality it does not serve: {sorted(set(atlases) - set(config.modality_names))}")
    _load_into(model, state, path)
    model.atlases = atlases
    if refiner:
        _check_refiner(model, refiner, path)
        model.refiner_state = refiner  # applied by foundation.foundation_model (``pipeline.Pipeline.refiner``)
    return model.eval().to(device)
