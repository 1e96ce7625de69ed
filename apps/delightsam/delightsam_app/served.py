"""The checkpoint the server serves, shared by every infer task (one per modality) and the trainer.

Training publishes to ``<model_dir>/published.safetensors``; a published model beats the configured checkpoint
it was trained from (MONAI Label's convention), and only that one: configure another checkpoint and it is served. The file is re-read when it changes (hot reload); a broken replacement leaves the
loaded model serving.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from delightsam.checkpoint import CheckpointError, load_model, read_header, refiner_names, stored_config
from delightsam.ledger import Ledger, safe_name
from delightsam.pipeline import Pipeline
from delightsam.refiner_training import is_adapted

from .settings import AppSettings

logger = logging.getLogger(__name__)


class ServedModel:
    def __init__(self, settings: AppSettings, published_dir: str | Path) -> None:
        self.settings = settings
        self.published_dir = Path(published_dir)
        self.published = self.published_dir / "published.safetensors"
        self.ledger = Ledger(self.published_dir / "loop")  # predictions, uncertainty, agreement with users
        self.problem: str | None = None
        self.config: dict = {}
        self._lock = threading.Lock()
        self._cached: tuple[tuple, Any] | None = None
        self._ignored: str | None = None
        self.refresh()

    def served_checkpoint(self) -> Path | None:
        configured = self.settings.checkpoint
        if not self.published.is_file():
            return configured
        base = read_header(self.published)[0].get("base")
        if base is None or configured is None or base == str(configured):
            return self.published
        if self._ignored != base:  # said once per published model
            logger.warning(f"serving the configured checkpoint {configured}: the published model {self.published} "
                           f"was trained from another one ({base})")
            self._ignored = base
        return configured

    def refresh(self) -> None:
        """The served checkpoint's configuration (it changes when training publishes), or why there is none."""
        self.problem, config = _check_checkpoint(self.served_checkpoint())
        self.config = config or {}

    @property
    def pipeline(self) -> Pipeline:
        """The served pipeline (``--conf refine``, ``prompts``, ...): what the infer tasks run and training validates;
        it builds and keeps each model's refiner."""
        return self.settings.pipeline

    def version(self) -> str:
        """The served checkpoint's version, read again (training may have published another)."""
        self.refresh()
        return str(self.config.get("version") or "unversioned")

    def modalities(self) -> dict[str, dict]:
        """Modality name -> its configuration (structures, intensity, title)."""
        return {m["name"]: m for m in self.config.get("modalities", [])}

    def structures_of(self, modality: str) -> dict[str, int]:
        """Structure name -> label id of one modality ({} if the served model has no such modality)."""
        spec = self.modalities().get(modality)
        return {s["name"]: s["label"] for s in spec["structures"]} if spec else {}

    def _folders(self) -> list[Path]:
        default = self.settings.checkpoint
        return [f for f in (default.parent if default else None, self.published_dir, self.published_dir / "versions") if f]

    def choices(self) -> list[str]:
        """The served checkpoint first, then the versions beside it and those that training published."""
        served = self.served_checkpoint()
        if served is None:
            return []
        others = {p.name for d in self._folders() if d.is_dir() for p in d.glob("*.safetensors")} - {served.name}
        return [served.name, *sorted(others)]

    def checkpoint_path(self, name) -> Path:
        served = self.served_checkpoint()
        name = name[0] if isinstance(name, list) and name else name
        if not name or name == served.name:
            return served
        if isinstance(name, str) and name in self.choices():
            return next(d / name for d in self._folders() if (d / name).is_file())
        raise HTTPException(404, f"no checkpoint named {name!r}; available: {', '.join(self.choices())}")

    def network(self, device, name=None):
        """The model for a request (``name``: a ``model_filename`` choice), reloaded when its file changes."""
        self.refresh()
        if self.problem:
            served = str(self.served_checkpoint())
            if self._cached and self._cached[0][1] == served:  # a broken replacement: keep what works
                logger.error(f"keeping the loaded model: {self.problem}")
                return self._cached[1]
            raise HTTPException(503, f"the De-LightSAM model is not available: {self.problem}")
        path = self.checkpoint_path(name)
        with self._lock, open(path, "rb") as f:
            # one open of the file: the key and the weights are those of the same file, even if training
            # replaces it meanwhile (os.replace gives it a new inode, so a same-size republish still counts)
            stat = os.fstat(f.fileno())
            key = (str(device), str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, self.settings.img_size)
            if self._cached and self._cached[0] == key:
                return self._cached[1]
            overrides = {"img_size": self.settings.img_size} if self.settings.img_size else {}
            try:
                model = load_model(path, device=device, content=f.read(), **overrides)
            except CheckpointError as e:
                if self._cached and self._cached[0][1] == str(path):
                    logger.error(f"keeping the loaded model: the changed checkpoint cannot be read ({e})")
                    return self._cached[1]
                raise HTTPException(503, f"the De-LightSAM model is not available: {e}") from e
            if self._cached:
                logger.info(f"reloaded De-LightSAM from {path}")
            self._cached = (key, model)
            return model

    def bundle(self) -> Path | None:
        """The MONAI bundle folder of the configured checkpoint (models/<bundle>/models/model.safetensors)."""
        checkpoint = self.settings.checkpoint
        folder = checkpoint.parent.parent if checkpoint else None
        return folder if folder and (folder / "configs" / "metadata.json").is_file() else None

    def model_card(self) -> Path | None:
        bundle = self.bundle()
        card = bundle / "docs" / "README.md" if bundle else None
        return card if card and card.is_file() else None

    def describe(self, modality: str) -> dict:
        """What /info says of the served model: its version, what it was trained on, and how its
        auto-segmentations compared with the labels users saved (the loop's record)."""
        version = str(self.config.get("version") or "unversioned")
        published = self.published_dir / "versions" / f"{safe_name(version)}.json"
        try:
            if published.is_file():
                metrics = json.loads(published.read_text())
                training = {k: metrics[k] for k in ("train_volumes", "val_volumes", "trained_from", "epoch", "mean_dice")
                            if k in metrics}
            elif self.bundle():
                metadata = json.loads((self.bundle() / "configs" / "metadata.json").read_text())
                training = {"bundle": self.bundle().name, "bundle_version": metadata.get("version"),
                            "data_source": metadata.get("data_source")}
            else:
                training = {}
        except (OSError, ValueError) as e:  # /info answers whatever a file holds
            training = {"problem": f"unreadable: {e}"}
        scores = self.ledger.summary().get(version)
        user_scores = None
        if scores:
            user_scores = {"images": scores["images"], "mean_dice": scores["mean_dice"],
                           "structures": {n: d for n, d in scores["structures"].items() if n in self.structures_of(modality)}}
        spec = self.modalities().get(modality) or {}
        adapted = is_adapted(refiner_names(self.served_checkpoint()), spec.get("query_group"))
        pipeline = self.pipeline
        return {"model_version": version, "training": training, "user_scores": user_scores,
                "pipeline": pipeline.describe(modality, adapted, spec.get("planes") or (), bool(spec.get("symmetric"))), "refiner_adapted": adapted and pipeline.refines(modality),
                "precision": pipeline.precision_on(self.settings.device),
                # what it was measured on (MR contrasts, slice thicknesses); requests outside it are flagged
                "measured": spec.get("measured") or {},
                # the planes a volume with no axis 2.5 times the next is seen in (multiplanar); [] for its own plane only
                "planes": spec.get("planes") or [],
                # each structure its own mirror image (declared in the checkpoint): a thick series is decoded mirrored too
                "symmetric": bool(spec.get("symmetric")),
                "model_card": "/model_card" if self.model_card() else None}


def _check_checkpoint(path: Path | None) -> tuple[str | None, dict | None]:
    """(why the checkpoint cannot be served or None, its configuration)."""
    if path is None:
        return "no checkpoint: put a .safetensors file under models/ or pass --conf checkpoint PATH", None
    if not path.is_file():
        return f"checkpoint not found: {path}", None
    config = stored_config(path)
    if config is None:
        return f"{path} is not a De-LightSAM project checkpoint (convert released weights with `delightsam convert`)", None
    return None, config
