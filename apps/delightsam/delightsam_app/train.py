"""The De-LightSAM train task: distillation fine-tuning (MDKD) on the datastore's `final` labels.

MONAI Label runs it in a subprocess (`POST /train/delightsam`); the training itself is
``delightsam.training.train``, the same code as `delightsam train`. What it keeps in the app's model/ folder:

  split.json                    the train/validation split, extended as labels arrive, never reshuffled
  train/<name>/                 a run: train_state.pt (to resume), train_stats.json, tensorboard/ or mlruns/
  versions/<version>.safetensors  every published model, with <version>.json holding its metrics
  published.safetensors         the served model (replaced atomically; the infer task hot-reloads it)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

from delightsam import load_model
from delightsam.training import TRAINABLE, TrainConfig, TrainItem, publish_version, train, update_split
from delightsam.teachers import TEACHERS

from . import pacs
from .infer import dicom_modality

logger = logging.getLogger(__name__)


class DeLightSAMTrain(TrainTask):
    def __init__(self, infer_task, model_dir: str | Path, default_modality: str) -> None:
        super().__init__("De-LightSAM distillation fine-tuning (MDKD) on the images with final labels")
        self.infer_task, self.model_dir, self.default_modality = infer_task, Path(model_dir), default_modality
        self._config = {
            "name": "train_01",
            "max_epochs": 5,
            "steps_per_epoch": 25,
            "train_batch_size": 4,
            "lr": 5e-4,
            "trainable": list(TRAINABLE[1:2] + TRAINABLE[:1] + TRAINABLE[2:]),  # modality first
            "teacher": ["lite_medsam", "none", *[t for t in TEACHERS if t != "lite_medsam"]],
            "val_split": 0.2,
            "embedding_cache": True,
            "resume": True,
            "tracking": ["tensorboard", "mlflow", "none"],
        }

    def config(self):
        return self._config

    def stats(self):
        runs = sorted((self.model_dir / "train").glob("*/train_stats.json"), key=os.path.getmtime)
        return json.loads(runs[-1].read_text()) if runs else {}

    def _items(self, datastore) -> list[TrainItem]:
        """Every image with a final label, by its datastore id (a file name stem, or a SeriesInstanceUID)."""
        if isinstance(datastore, DICOMWebDatastore):  # the SEGs in the PACS, by segment name
            found = pacs.training_items(datastore, self.infer_task.structures_of, str(self.model_dir / "pacs_labels"))
            return [TrainItem(*item) for item in found]
        items = []
        for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
            image = datastore.get_image_uri(image_id)
            label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            info = datastore.get_image_info(image_id) or {}
            modality = str(info.get("modality") or dicom_modality(image) or self.default_modality).lower()
            items.append(TrainItem(image_id, image, label, modality))
        return items

    def __call__(self, request, datastore):
        options = {k: (v[0] if isinstance(v, list) else v) for k, v in {**self._config, **request}.items()}
        items = self._items(datastore)
        if not items:
            raise ValueError("no image has a final label yet: save one (tag final) before training")
        split = update_split(self.model_dir / "split.json", [i.id for i in items], float(options["val_split"]))
        run_dir = self.model_dir / "train" / str(options["name"])
        if not strtobool(str(options["resume"])):
            (run_dir / "train_state.pt").unlink(missing_ok=True)
        config = TrainConfig(
            epochs=int(options["max_epochs"]), steps_per_epoch=int(options["steps_per_epoch"]),
            batch_size=int(options["train_batch_size"]), lr=float(options["lr"]), trainable=str(options["trainable"]),
            teacher=None if options["teacher"] == "none" else str(options["teacher"]),
            cache_dir=str(self.model_dir / "embedding_cache") if strtobool(str(options["embedding_cache"])) else None,
            tracking=str(options["tracking"]), device=self.infer_task.settings.device)
        served = self.infer_task.served_checkpoint()
        if served is None or not served.is_file():
            raise ValueError(f"no checkpoint to train from ({self.infer_task.problem}); configure one first")
        model = load_model(served)
        logger.info(f"training {served.name} on {sum(v == 'train' for v in split.values())} volumes, validating on "
                    f"{sum(v == 'val' for v in split.values())}; run folder {run_dir}")
        return train(model, [i for i in items if split[i.id] == "train"], [i for i in items if split[i.id] == "val"],
                     config, run_dir, publish=lambda m, metrics: publish_version(
                         m, metrics, self.model_dir / "versions", served=self.infer_task.published), log=logger.info)
