"""The annotation loop: Next Sample by the model's own doubt, the model's labels scored against what users
save, and batch pre-segmentation on a CPU-only server. The record itself is ``delightsam.ledger`` (in
``<model_dir>/loop``); these are monailabel's task interfaces over it.

- ``UncertaintyScoring`` (``POST /scoring/uncertainty``; monailabel also runs it at start, after each Next
  Sample and after training): the served version segments every unlabelled image of a known modality that it
  has not scored yet, and its uncertainty per structure is kept per version (``delightsam.uncertainty``).
- ``Uncertain`` (``POST /activelearning/uncertain``, Next Sample's default): the unlabelled image the served
  version is least sure of, skipping images handed to another user within ``handout_minutes``; ``Last`` beside
  monailabel's ``First`` and ``Random``.
- ``agree_with_final``: when a `final` label is saved, each version's label of that image is scored against it.
- ``CPUBatchInfer`` (``POST /batch/infer/<model>``): monailabel 0.8.5's batch path spreads work over CUDA
  devices and fails without one; this one runs the images one after another on the server's device, says
  ``progress i/n`` as it goes (the task's status), and saves each label as `original`.

Their requests are typed (``options``) where they run, in the processes monailabel starts for them; the server
checks the same options before it starts one (``edge``). Their inferences take the app's work slots in turn with
the users' (``gate``).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .infer import dicom_modality, task_name
from .labels import map_label
from .options import BatchOptions, ScoringOptions, parse
from .served import ServedModel

logger = logging.getLogger(__name__)


def image_modality(datastore, image_id: str, served: ServedModel, default: str | None) -> tuple[str | None, str]:
    """(the image's modality, or None and why it is unknown or not served): recorded in its image info by an
    inference, else its DICOM Modality tag, else ``default`` (the server's --conf modality, or what the request
    declared). Never guessed from the pixels."""
    info = datastore.get_image_info(image_id) or {}
    modality = info.get("modality") or info.get("Modality")  # ours, or a downloaded DICOMweb series' tag
    if not modality and hasattr(datastore, "series_modality"):  # a PACS series: its tag, without downloading it
        modality = datastore.series_modality(image_id)
    elif not modality:
        modality = dicom_modality(datastore.get_image_uri(image_id))
    modality = modality or default
    if not modality:
        return None, (f"its modality is unknown: run one of this server's auto-segmentation models on it (which "
                      f"records the modality), or set it with PUT /datastore/image/info?image={image_id} and form "
                      f"field info={{\"modality\": \"ct\"}} (or \"mr\"), or start the server with --conf modality NAME")
    modality = str(modality).lower()
    if modality not in served.modalities():
        return None, f"its modality {modality} is not served by this model ({', '.join(served.modalities())})"
    return modality, ""


def version_of(served: ServedModel) -> str:
    served.refresh()
    return str(served.config.get("version") or "unversioned")


class UncertaintyScoring(ScoringMethod):
    def __init__(self, served: ServedModel, infer: Callable) -> None:
        super().__init__("How unsure the served model is of each unlabelled image, per structure (mean binary "
                         "entropy of its structure probabilities); Next Sample's `uncertain` strategy ranks by it")
        self.served, self.infer = served, infer

    def pending(self, datastore: Datastore) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """(image id, modality) of the unlabelled images the served version has not scored, and why others
        cannot be scored."""
        scored = self.served.ledger.doubt(version_of(self.served))
        todo, skipped = [], {}
        for image_id in sorted(datastore.get_unlabeled_images()):
            if image_id in scored:
                continue
            try:
                modality, why = image_modality(datastore, image_id, self.served, self.served.settings.modality)
            except Exception as e:  # a series the PACS cannot describe or send: the others go on
                modality, why = None, f"its modality could not be read: {type(e).__name__}: {str(e)[:200]}"
            if modality is None:
                skipped[image_id] = why
            else:
                todo.append((image_id, modality))
        return todo, skipped

    def __call__(self, request, datastore: Datastore):
        parse(ScoringOptions, request, "uncertainty scoring")
        version = version_of(self.served)
        todo, skipped = self.pending(datastore)
        for image_id, why in skipped.items():
            logger.info(f"uncertainty: not scoring {image_id}: {why}")
        failed = {}
        for i, (image_id, modality) in enumerate(todo):
            try:
                self.infer({"model": task_name(modality), "image": image_id, "loop_source": "scoring",
                            "output": "json", "refine": False})  # doubt: the first stage's
            except Exception as e:  # one unreadable image does not stop the others
                failed[image_id] = f"{type(e).__name__}: {getattr(e, 'detail', e)}"
                logger.warning(f"uncertainty: {image_id} could not be scored: {failed[image_id]}")
            logger.info(f"uncertainty: progress {i + 1}/{len(todo)} ({image_id}, model {version})")
        scores = self.served.ledger.doubt(version)
        return {"model_version": version, "scored": {k: v["score"] for k, v in scores.items()},
                "failed": failed, "skipped": skipped}


class Uncertain(Strategy):
    def __init__(self, served: ServedModel) -> None:
        super().__init__("The unlabelled image the served model is least sure of (scoring method `uncertainty`); "
                         "images handed to another user recently are skipped")
        self.served = served

    def __call__(self, request, datastore: Datastore):
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        version = version_of(self.served)
        scores = self.served.ledger.doubt(version)
        window = self.served.settings.handout_minutes * 60
        client = request.get("client_id")
        free = [i for i in images if not _handed_to_another(datastore.get_image_info(i) or {}, client, window)]
        candidates = free or images  # everyone is busy: the least recently handed out still beats nothing
        scored = sorted((i for i in candidates if i in scores), key=lambda i: -scores[i]["score"])
        if scored:
            image = scored[0]
            return {"id": image, "uncertainty": scores[image]["score"], "model_version": version,
                    "uncertainty_by_structure": {n: s["entropy"] for n, s in scores[image]["structures"].items()}}
        image = min(candidates, key=lambda i: _last_handed(datastore.get_image_info(i) or {}))
        return {"id": image, "uncertainty": None, "model_version": version,
                "note": "no unlabelled image is scored by this model version yet (POST /scoring/uncertainty)"}


class Random(Strategy):
    def __init__(self) -> None:
        super().__init__("A random unlabelled image, the longer since it was handed out the likelier")

    def __call__(self, request, datastore: Datastore):
        """monailabel's Random, weighted by the seconds since each image was handed out plus one: its own weights
        are all zero (a ValueError, a 500) once every image was handed out within the current second."""
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        now = time.time()
        weights = [now - _last_handed(datastore.get_image_info(i) or {}, request["strategy"]) + 1 for i in images]
        image = random.choices(images, weights=weights)[0]
        return {"id": image, "weight": weights[images.index(image)]}


class Last(Strategy):
    def __init__(self) -> None:
        super().__init__("The last unlabelled image, by id")

    def __call__(self, request, datastore: Datastore):
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        return {"id": images[-1]} if images else None


def _handed_to_another(info: dict, client: str | None, window: float) -> bool:
    now = time.time()
    return any(now - ts < window and who != client for ts, who in _handouts(info))


def _last_handed(info: dict, strategy: str | None = None) -> float:
    return max([ts for ts, _ in _handouts(info, strategy)] or [0])


def _handouts(info: dict, strategy: str | None = None) -> list[tuple[float, str | None]]:
    """(time, client) of each Next Sample (of ``strategy``, or of any) that handed the image out (the index is
    typed when written; an entry an older server wrote that is not a time is ignored)."""
    found = []
    for name, entry in (info.get("strategy") or {}).items():
        if strategy in (None, name) and isinstance(entry, dict) and isinstance(entry.get("ts", 0), (int, float)):
            found.append((float(entry.get("ts", 0)), entry.get("client_id")))
    return found


def agree_with_final(datastore: Datastore, served: ServedModel, image_id: str) -> dict | None:
    """Scores every stored version's label of the image against its final label, by the structures the
    user's label names; None when there is nothing to compare (no final label, no stored prediction)."""
    from monai.transforms import LoadImage
    import numpy as np

    if not served.ledger.predictions(image_id):
        return None
    label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
    if not label:
        return None
    modality, why = image_modality(datastore, image_id, served, served.settings.modality)
    if modality is None:
        logger.warning(f"not scoring the saved label of {image_id}: {why}")
        return None
    present = set(np.unique(np.asarray(LoadImage(image_only=True)(label))).astype(int).tolist())
    mapping = map_label(datastore.get_label_info(image_id, DefaultLabelTag.FINAL), present,
                        served.structures_of(modality))
    if mapping.problem:
        logger.warning(f"not scoring the saved label of {image_id}: {mapping.problem}")
        return None
    names = {i: n for n, i in served.structures_of(modality).items()}
    entry = served.ledger.record_agreement(image_id, label, {v: names[i] for v, i in mapping.values.items()},
                                           mapping.known, modality)
    logger.info(f"the saved label of {image_id} against each model version: "
                f"{ {v: s['mean_dice'] for v, s in entry['versions'].items()} }")
    return entry


class CPUBatchInfer(BatchInferTask):
    def __init__(self, served: ServedModel) -> None:
        self.served = served

    def __call__(self, request, datastore: Datastore, infer: Callable):
        """``infer``: the app's loop inference (it saves each label; ``DeLightSAMApp.batch_infer``)."""
        options = parse(BatchOptions, request, f"batch inference with {request.get('model')!r}")
        model = options.model
        modality = model.removeprefix("delightsam_")
        declared = options.modality or self.served.settings.modality  # what the request says unknown ones are
        todo, skipped = [], {}
        for image_id in sorted(self.get_images(options.model_dump(), datastore)):
            found, why = image_modality(datastore, image_id, self.served, declared)
            if found != modality:
                skipped[image_id] = why or f"it is {found.upper()}; {model} segments {modality.upper()} images"
            else:
                todo.append(image_id)
        if options.max_batch_size:
            todo = todo[: options.max_batch_size]
        tag = options.label_tag
        done, failed, began = [], {}, time.time()
        logger.info(f"batch inference with {model}: {len(todo)} images, {len(skipped)} skipped")
        for image_id, why in skipped.items():
            logger.info(f"batch inference: skipping {image_id}: {why}")
        for i, image_id in enumerate(todo):
            try:
                infer({"model": model, "image": image_id, "save_label": True, "label_tag": tag,
                       "loop_source": "batch", "result_extension": ".nii.gz"}, datastore)
                done.append(image_id)
            except Exception as e:  # the others go on; the result says which failed and why
                failed[image_id] = f"{type(e).__name__}: {getattr(e, 'detail', e)}"
                logger.warning(f"batch inference: {image_id} failed: {failed[image_id]}")
            logger.info(f"batch inference: progress {i + 1}/{len(todo)} ({image_id}, {time.time() - began:.0f} s)")
        # the last lines are what the task's status keeps: the outcome, with every reason, on one line
        logger.info(f"batch inference: {len(done)}/{len(todo)} done in {time.time() - began:.0f} s; failed: "
                    f"{failed or 'none'}; " + "; ".join(f"skipping {k}: {v}" for k, v in skipped.items()))
        return {"model": model, "label_tag": tag, "done": done, "failed": failed, "skipped": skipped,
                "seconds": time.time() - began}
