"""The De-LightSAM train task: distillation fine-tuning (MDKD) on the datastore's `final` labels, of the pipeline
that is served: the first stage and, for the modalities served in two stages, the refiner's queries and heads
(``delightsam.refiner_training``); validation and the publish decision run that pipeline with the server's settings.

MONAI Label runs it in a subprocess (`POST /train/delightsam`); the training itself is
``delightsam.training.train``, the same code as `delightsam train`. Every image's modality is known before it
trains (the datastore's image info, which inference records, or its DICOM Modality tag, or the server's explicit
`--conf modality`), and every saved label is read in the model's label ids by the segment names its client sent
(``labels.map_label``); an image that fails either check is left out, and the run's statistics say why. Over a
PACS, the `final` labels are the SEGs it holds, read back by segment name and code (``pacs_items``).
What it keeps in the app's model/ folder:

  split.json                    the train/validation split, extended as labels arrive, never reshuffled
  train/<name>/                 a run: train_state.pt (to resume), train_stats.json, tensorboard/ or mlruns/
  versions/<version>.safetensors  every published model, with <version>.json holding its metrics
  published.safetensors         the served model (replaced atomically; the infer tasks hot-reload it)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from delightsam import load_model
from delightsam.training import TrainConfig, train
from delightsam.reading import READ_ERRORS, read_error
from delightsam.training_data import TrainItem
from delightsam.versions import publish_version, update_split

from .. import compat
from ..dicom_seg import read_seg_label
from ..labels import map_label, values_in
from ..modality import image_modality
from ..options import TrainOptions, parse
from ..served import ServedModel

logger = logging.getLogger(__name__)


class DeLightSAMTrain(TrainTask):
    def __init__(self, served: ServedModel, model_dir: str | Path, default_modality: str | None) -> None:
        super().__init__("De-LightSAM distillation fine-tuning (MDKD) on the images with final labels")
        self.served, self.model_dir, self.default_modality = served, Path(model_dir), default_modality

    def config(self):
        return TrainOptions.config()  # the typed options' defaults, choices first

    def stats(self):
        """The latest run's statistics with what Slicer's training and accuracy bars read (epoch, total_epochs,
        best_metric, and total_time once finished), and each model version's Dice against the labels users
        saved (``user_scores``)."""
        runs = sorted((self.model_dir / "train").glob("*/train_stats.json"), key=os.path.getmtime)
        stats = json.loads(runs[-1].read_text()) if runs else {}
        if stats.get("phase") == "finished":
            stats["total_time"] = f"{stats.get('wall_seconds', 0.0):.0f} s"
        user_scores = self.served.ledger.summary()
        if user_scores:
            stats["user_scores"] = {v: {k: s[k] for k in ("images", "mean_dice", "structures")}
                                    for v, s in user_scores.items()}
        return stats

    def _items(self, datastore) -> tuple[list[TrainItem], dict]:
        """The images with a final label that can train the model, and a report of those that cannot (by image
        id: why) and of saved segments that name no structure of the model."""
        if isinstance(datastore, DICOMWebDatastore):  # the SEGs in the PACS, mapped by segment name and code
            return pacs_items(datastore, self.served.structures_of, str(self.model_dir / "pacs_labels"))
        items, report = [], {"refused": {}, "unmatched_segments": {}}
        for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
            image = datastore.get_image_uri(image_id)
            modality, why = image_modality(datastore, image_id, self.served, self.default_modality)
            if modality is None:
                report["refused"][image_id] = why
                continue
            label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            try:
                present = values_in(label)
            except READ_ERRORS as e:
                report["refused"][image_id] = f"its final label cannot be read: {read_error(e)}"
                continue
            mapping = map_label(datastore.get_label_info(image_id, DefaultLabelTag.FINAL),
                                present, self.served.structures_of(modality))
            if mapping.unmatched:
                report["unmatched_segments"][image_id] = mapping.unmatched
            if mapping.problem:
                report["refused"][image_id] = f"its final label cannot train the {modality} model: {mapping.problem}"
                continue
            items.append(TrainItem(image_id, image, label, modality, mapping.values, mapping.known))
        return items, report

    def __call__(self, request, datastore):
        options = parse(TrainOptions, request, f"the trainer {request.get('model')!r}")  # after monailabel's merge
        self.served.refresh()
        items, report = self._items(datastore)
        for image_id, why in report["refused"].items():
            logger.warning(f"not training on {image_id}: {why}")
        for image_id, names in report["unmatched_segments"].items():
            logger.warning(f"{image_id}: segments that are no structure of the model, left out: {names}")
        if not items:
            refused = "; ".join(f"{k}: {v}" for k, v in report["refused"].items())
            raise ValueError("no image with a final label can train the model yet"
                             + (f" ({refused})" if refused else ": save one (tag final) before training"))
        split = update_split(self.model_dir / "split.json", [i.id for i in items], options.val_split)
        run_dir = self.model_dir / "train" / options.name
        if not options.resume:
            (run_dir / "train_state.pt").unlink(missing_ok=True)
        config = TrainConfig(
            epochs=options.max_epochs, steps_per_epoch=options.steps_per_epoch, batch_size=options.train_batch_size,
            lr=options.lr, trainable=options.trainable, teacher=None if options.teacher == "none" else options.teacher,
            cache_dir=str(self.model_dir / "embedding_cache") if options.embedding_cache else None,
            tracking=options.tracking, device=self.served.settings.device,
            pipeline=self.served.pipeline, train_refiner=options.train_refiner,
            seed=options.seed)
        served = self.served.served_checkpoint()
        if served is None or not served.is_file():
            raise ValueError(f"no checkpoint to train from ({self.served.problem}); configure one first")
        model = load_model(served)
        report["trained"] = {i.id: {"modality": i.modality, "structures": i.known} for i in items}
        logger.info(f"training {served.name} on {sum(v == 'train' for v in split.values())} volumes, validating on "
                    f"{sum(v == 'val' for v in split.values())}; run folder {run_dir}")
        trained = [i for i in items if split[i.id] == "train"]
        size = {"train_volumes": len(trained), "val_volumes": sum(split[i.id] == "val" for i in items),
                "trained_from": model.config.version}
        return train(model, trained, [i for i in items if split[i.id] == "val"],
                     config, run_dir, publish=lambda m, metrics: publish_version(
                         m, {**metrics, **size}, self.model_dir / "versions", served=self.served.published,
                         base=str(self.served.settings.checkpoint)), log=logger.info,
                     data_report=report)


def pacs_items(datastore, structures_of: Callable[[str], dict[str, int]],
               out_dir: str) -> tuple[list[TrainItem], dict]:
    """The training items of every image series with a SEG in the PACS, and a report of those that cannot train and of segments that are no structure of the model. The
    SEGs are downloaded (monailabel's datalist) and turned into label maps in the model's ids by segment name and
    code."""
    datastore.datalist()  # downloads every SEG that refers to a listed series
    os.makedirs(out_dir, exist_ok=True)
    items, report = [], {"refused": {}, "unmatched_segments": {}}
    for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
        info = datastore.get_image_info(image_id) or {}
        modality = str(info.get("Modality") or "").lower()
        if not structures_of(modality):
            report["refused"][image_id] = f"its modality {modality or 'unknown'} is not served by this model"
            continue
        seg_uid = (datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}).get("SeriesInstanceUID")
        seg_dir = os.path.join(compat.pacs_cache(datastore).label_path(DefaultLabelTag.FINAL), str(seg_uid))
        image = datastore.get_image_uri(image_id)
        if seg_uid and os.path.isdir(seg_dir) and os.listdir(seg_dir):
            label, known, unknown = read_seg_label(seg_dir, structures_of(modality), image,
                                                   os.path.join(out_dir, f"{image_id}.nii.gz"))
            if unknown:
                report["unmatched_segments"][image_id] = unknown
            if label is None:
                report["refused"][image_id] = "no segment of its SEG is a structure of the model"
                continue
        else:  # saved through this server and not re-read from the PACS: the label map as it was saved
            label = compat.cached_label_uri(datastore, image_id, DefaultLabelTag.FINAL)
            known = (datastore.get_label_info(image_id, DefaultLabelTag.FINAL) or {}).get("known_structures")
        # structures the SEG does not name are unknown, not absent (values None: the label is in the model's ids)
        items.append(TrainItem(image_id, image, label, modality, None, known))
    return items, report
