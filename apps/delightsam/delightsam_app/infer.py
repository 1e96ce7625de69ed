"""The De-LightSAM inference task: prompt-free auto-segmentation of a whole 3-D volume.

MONAI Label glue over ``delightsam.volume.segment_volume``: MONAI's LoadImaged (ITK: NIfTI, NRRD, DICOM
series) in, the library's slice-by-slice inference, monailabel's Writer out (NRRD/NIfTI on the input grid).
Bad input becomes an HTTP error whose message names the problem, so clients show it and the server stays up.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from fastapi import HTTPException
from monai.data import MetaTensor
from monai.transforms import LoadImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.utils.others.generic import strtobool

from delightsam import CheckpointError, load_model
from delightsam.volume import image_reader, segment_volume, spacing_of

from .dicom_seg import write_dicom_seg
from .settings import AppSettings, checkpoint_config

logger = logging.getLogger(__name__)
AUTO = "auto"


class DeLightSAMInfer(BasicInferTask):
    def __init__(self, settings: AppSettings, published_dir: str | Path) -> None:
        self.settings = settings
        self.published_dir = Path(published_dir)
        # Training publishes here; a published model beats the configured one (MONAI Label's convention).
        self.published = self.published_dir / "published.safetensors"
        super().__init__(path=None, network=None, type=InferType.SEGMENTATION, labels={}, dimension=3,
                         description="", config={})
        self._refresh()
        self._lock = threading.Lock()
        self._cached: tuple[tuple, Any] | None = None
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)

    # ---- checkpoints ----------------------------------------------------------------------
    def served_checkpoint(self) -> Path | None:
        return self.published if self.published.is_file() else self.settings.checkpoint

    def _refresh(self) -> None:
        """Labels, description and options from the checkpoint being served (it changes when training publishes)."""
        path = self.served_checkpoint()
        self.problem, config = _check_checkpoint(path)
        modalities = [m["name"] for m in config["modalities"]] if config else []
        self.labels = {s["name"]: s["label"] for m in (config or {}).get("modalities", []) for s in m["structures"]}
        if self.problem:
            self.description = f"De-LightSAM auto-segmentation: NOT AVAILABLE, {self.problem}"
        else:
            self.description = (f"De-LightSAM prompt-free auto-segmentation ({', '.join(modalities)}), "
                                f"model {config.get('version', '?')} from {path.name}")
        self._config.update({"modality": [AUTO, *modalities], "cleanup": self.settings.cleanup,
                             "batch_size": self.settings.batch_size, "model_filename": self._choices()})

    def info(self):
        self._refresh()
        return super().info()

    def served_modalities(self) -> list[str]:
        self._refresh()
        return list(self._config["modality"][1:])

    def structures_of(self, modality: str) -> dict[str, int]:
        config = checkpoint_config(self.served_checkpoint()) if self.served_checkpoint() else None
        for m in (config or {}).get("modalities", []):
            if m["name"] == modality:
                return {s["name"]: s["label"] for s in m["structures"]}
        return {}

    def _folders(self) -> list[Path]:
        default = self.settings.checkpoint
        return [f for f in (default.parent if default else None, self.published_dir, self.published_dir / "versions") if f]

    def _choices(self) -> list[str]:
        """The served checkpoint first, then the versions beside it and those that training published."""
        served = self.served_checkpoint()
        if served is None:
            return []
        others = {p.name for d in self._folders() if d.is_dir() for p in d.glob("*.safetensors")} - {served.name}
        return [served.name, *sorted(others)]

    def _checkpoint_path(self, data: dict) -> Path:
        served = self.served_checkpoint()
        name = data.get("model_filename")
        name = name[0] if isinstance(name, list) and name else name
        if not name or name == served.name:
            return served
        if isinstance(name, str) and name in self._choices():
            return next(d / name for d in self._folders() if (d / name).is_file())
        raise HTTPException(404, f"no checkpoint named {name!r}; available: {', '.join(self._choices())}")

    def is_valid(self) -> bool:
        return True  # listed even without a checkpoint, so that /info can say why it is unavailable

    def _get_network(self, device, data):
        """The model for this request, reloaded when its file changes (a newly published checkpoint)."""
        self._refresh()
        if self.problem:
            served = str(self.served_checkpoint())
            if self._cached and self._cached[0][1] == served:  # a broken replacement: keep what works
                logger.error(f"keeping the loaded model: {self.problem}")
                return self._cached[1]
            raise HTTPException(503, f"the De-LightSAM model is not available: {self.problem}")
        path = self._checkpoint_path(data)
        stat = path.stat()
        # os.replace gives a published file a new inode, so a same-size, same-mtime republish still counts
        key = (str(device), str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size, self.settings.img_size)
        with self._lock:
            if self._cached and self._cached[0] == key:
                return self._cached[1]
            overrides = {"img_size": self.settings.img_size} if self.settings.img_size else {}
            try:
                model = load_model(path, device=device, **overrides)
            except CheckpointError as e:
                if self._cached and self._cached[0][1] == str(path):
                    logger.error(f"keeping the loaded model: the changed checkpoint cannot be read ({e})")
                    return self._cached[1]
                raise HTTPException(503, f"the De-LightSAM model is not available: {e}") from e
            if self._cached:
                logger.info(f"reloaded De-LightSAM from {path}")
            self._cached = (key, model)
            return model

    # ---- the pipeline -----------------------------------------------------------------------
    def pre_transforms(self, data=None):
        return [LoadImaged(keys="image", reader=image_reader((data or {}).get("image_path", "")))]

    def post_transforms(self, data=None):
        return []

    def run_pre_transforms(self, data, transforms):
        try:
            return super().run_pre_transforms(data, transforms)
        except Exception as e:  # ITK raises RuntimeError/OSError for files it cannot read
            name = Path(str(data.get("image_path", "?"))).name
            reason = str(e).strip().splitlines()[0][:300]  # MONAI appends every reader's traceback
            raise HTTPException(422, f"cannot read {name!r} as a medical image volume (NIfTI, NRRD or a DICOM "
                                     f"series): {reason}") from e

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        model = self._get_network(device, data)
        image: MetaTensor = data["image"]
        channels = image.meta.get("original_channel_dim")
        if channels is not None and not (isinstance(channels, float) and np.isnan(channels)):
            raise HTTPException(422, f"expected a single-channel 3-D volume, got a {image.dim()}-D image of shape "
                                     f"{list(image.shape)}")
        modality, source = self._choose_modality(data, model.config.modality_names)
        spacing = spacing_of(image) if image.dim() == 3 else (1.0, 1.0, 1.0)
        try:
            result = segment_volume(model, image, modality, spacing, batch_size=int(data.get("batch_size", 8)),
                                    cleanup=strtobool(str(data.get("cleanup", False))))
        except ValueError as e:
            raise HTTPException(422, f"cannot segment {Path(str(data.get('image_path'))).name!r}: {e}") from e
        data["pred"] = MetaTensor(torch.from_numpy(result.labels), meta=dict(image.meta))  # same affine and grid
        data["result"] = {"modality": modality, "modality_source": source, "slice_axis": result.slice_axis,
                          "structures": result.label_names, "model_version": model.config.version,
                          "notes": result.notes}
        return data

    def _choose_modality(self, data: dict, available: list[str]) -> tuple[str, str]:
        """From the request, else the DICOM Modality tag, else the app's default; says which."""
        requested = str(data.get("modality") or AUTO).lower()
        if isinstance(data.get("modality"), list):
            requested = str(data["modality"][0]).lower()
        if requested != AUTO:
            choice, source = requested, "request"
        elif (tag := dicom_modality(data.get("image_path"))) is not None:
            choice, source = tag.lower(), "DICOM Modality tag"
        else:
            choice, source = self.settings.modality, "app default"
        if choice not in available:
            raise HTTPException(422, f"modality {choice!r} (from the {source}) is not served by this model; "
                                     f"it serves: {', '.join(available)}")
        return choice, source

    def writer(self, data, extension=None, dtype=None):
        source = Path(str(data.get("image_path")))
        if data.get("result_extension") == ".dcm":  # DICOM SEG referencing the source series
            if not source.is_dir() or dicom_modality(source) is None:
                raise HTTPException(422, "DICOM SEG output (result_extension .dcm) needs a DICOM series as input")
            data["result_extension"], data["result_dtype"] = ".nii.gz", "uint8"
            label_file, result = super().writer(data, extension, dtype)
            ids = set(np.unique(np.asarray(data["pred"])).tolist())
            present = {n: i for n, i in data["result"]["structures"].items() if i in ids}
            if not present:
                raise HTTPException(422, "nothing was segmented, and a DICOM SEG cannot be empty")
            return write_dicom_seg(source, label_file, present), result
        if not data.get("result_extension") and source.is_dir():
            data["result_extension"] = ".nii.gz"  # a DICOM series folder has no extension to mirror
        return super().writer(data, extension, dtype)

    def __call__(self, request, callbacks=None):
        request = {"device": self.settings.device, **request}  # --conf device unless the request says
        label_file, result = super().__call__(request, callbacks)
        result["label_names"] = result.get("structures", self.labels)  # this modality's names and ids
        return label_file, result


def _check_checkpoint(path: Path | None) -> tuple[str | None, dict | None]:
    """(why the checkpoint cannot be served or None, its configuration)."""
    if path is None:
        return "no checkpoint: put a .safetensors file under models/ or pass --conf checkpoint PATH", None
    if not path.is_file():
        return f"checkpoint not found: {path}", None
    config = checkpoint_config(path)
    if config is None:
        return f"{path} is not a De-LightSAM project checkpoint (convert released weights with `delightsam convert`)", None
    return None, config


def dicom_modality(path) -> str | None:
    """The Modality tag of a DICOM file, or of the first file of a series folder, or of the series folder
    beside a NIfTI made from it (how a DICOMweb datastore caches series); None for other files."""
    if not path:
        return None
    path = Path(str(path))
    source = path.with_name(path.name.removesuffix(".nii.gz"))
    if path.name.endswith(".nii.gz") and source.is_dir():
        path = source
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for f in files[:5]:
        try:
            return str(pydicom.dcmread(f, stop_before_pixels=True).Modality) or None
        except Exception:  # not DICOM (a NIfTI, an NRRD, a stray file in the folder)
            continue
    return None
