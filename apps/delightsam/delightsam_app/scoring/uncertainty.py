"""Uncertainty scoring (``POST /scoring/uncertainty``; monailabel also runs it at start, after each Next Sample and
after training): the served version segments every unlabelled image of a known modality that it has not scored yet,
in a process of its own, and its uncertainty per structure is kept per version in the loop's record
(``delightsam.ledger``, ``delightsam.uncertainty``); Next Sample's ``uncertain`` strategy ranks by it. Its inferences
take the app's work slots in turn with the users' (``gate``)."""

from __future__ import annotations

import logging
from typing import Callable

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from ..modality import image_modality, task_name
from ..options import ScoringOptions, parse
from ..served import ServedModel

logger = logging.getLogger(__name__)


class UncertaintyScoring(ScoringMethod):
    def __init__(self, served: ServedModel, infer: Callable) -> None:
        super().__init__("How unsure the served model is of each unlabelled image, per structure (mean binary "
                         "entropy of its structure probabilities); Next Sample's `uncertain` strategy ranks by it")
        self.served, self.infer = served, infer

    def pending(self, datastore: Datastore) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """(image id, modality) of the unlabelled images the served version has not scored, and why others
        cannot be scored."""
        scored = self.served.ledger.doubt(self.served.version())
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
        version = self.served.version()
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

