"""The app's --conf keys, their defaults, and where the checkpoint comes from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from monailabel.utils.others.generic import strtobool
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[3]
DEFAULT_MODEL = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"  # the starter bundle


@dataclass
class AppSettings:
    checkpoint: Path | None  # the checkpoint served by default; None when none was found
    # the modality of training images that neither the datastore's image info nor a DICOM tag names; None
    # (the default): such images are refused, never trained as a guessed modality
    modality: str | None
    device: str
    img_size: int | None  # None: the checkpoint's own input size
    batch_size: int  # slices per forward pass
    threads: int  # torch intra-op threads; 0 keeps torch's default
    cleanup: bool  # largest connected component and hole filling per structure
    model_dir: Path  # published models, their versions, training runs, the split, the embedding cache

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str | Path) -> "AppSettings":
        checkpoint = conf.get("checkpoint")
        path = resolve_checkpoint(checkpoint, Path(app_dir))
        return cls(
            checkpoint=path,
            modality=conf["modality"].lower() if conf.get("modality") else None,
            device=conf.get("device", "cpu"),
            img_size=int(conf["img_size"]) if conf.get("img_size") else None,
            batch_size=int(conf.get("batch_size", 4)),
            threads=int(conf.get("threads", 0)),
            cleanup=strtobool(conf.get("cleanup", "false")),
            model_dir=Path(conf.get("model_dir") or Path(app_dir) / "model").expanduser().resolve(),
        )


def resolve_checkpoint(value: str | None, app_dir: Path) -> Path | None:
    """An explicit path (absolute, or relative to the repository or the app), else the starter model, else
    the first ``*.safetensors`` under the repository's models/ folder."""
    if value:
        path = Path(value).expanduser()
        for candidate in (path, REPO / path, app_dir / path):
            if candidate.exists():
                return candidate.resolve()
        return path  # reported as missing by the infer task
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    found = sorted((REPO / "models").rglob("*.safetensors"))
    return found[0].resolve() if found else None


def checkpoint_config(path: Path) -> dict | None:
    """The configuration stored in a project checkpoint, read without loading its weights."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})["config"])
    except Exception:  # unreadable or not a project checkpoint: the infer task reports why
        return None
