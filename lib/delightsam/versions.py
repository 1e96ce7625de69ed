"""A training run's versions: the train/validation split kept across runs, and each published model (a checkpoint
and its metrics) beside the served one."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .checkpoint import save_model
from .files import write_text
from .model import DeLightSAM


def update_split(path: str | Path, ids: list[str], val_fraction: float = 0.2) -> dict[str, str]:
    """One train/validation split, kept in a file and extended as labels arrive, never reshuffled.
    A new id goes to validation when its hash falls under ``val_fraction``; the first two ids are one of
    each so that both sides exist as early as possible."""
    path = Path(path)
    split = json.loads(path.read_text()) if path.exists() else {}
    for image_id in sorted(ids):
        if image_id in split:
            continue
        if "train" not in split.values() or val_fraction <= 0:
            split[image_id] = "train"
        elif "val" not in split.values():
            split[image_id] = "val"
        else:
            h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            split[image_id] = "val" if h < val_fraction else "train"
    write_text(path, json.dumps(split, indent=1, sort_keys=True))
    return split


def publish_version(model: DeLightSAM, metrics: dict, versions_dir: str | Path, served: str | Path | None = None,
                    base: str | None = None) -> Path:
    """Writes a new version (checkpoint plus metrics JSON) and, if ``served`` is given, replaces the served
    checkpoint with it. Both writes are atomic, so inference never reads half a file; old versions stay.
    ``base``: the configured checkpoint the model descends from, kept in its metadata (a server configured with
    another checkpoint does not serve it)."""
    versions = Path(versions_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"delightsam-{stamp}-{os.urandom(2).hex()}-e{metrics.get('epoch', 0)}"  # unique within a second
    model.config = model.config.replace(version=name)
    extra = {"base": base} if base else None
    path = save_model(model, versions / f"{name}.safetensors", extra=extra)
    write_text(versions / f"{name}.json", json.dumps(metrics, indent=1))
    if served:
        save_model(model, served, extra=extra)
    return path
