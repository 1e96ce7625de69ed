"""Agreement with users: when a `final` label is saved, each stored model version's label of that image is scored
against it (Dice, HD95 per structure, by the structures the user's label names), into the loop's record
(``delightsam.ledger``; ``delightsam report``, ``user_scores`` in /info and the train task's stats)."""

from __future__ import annotations

import logging

from delightsam.reading import READ_ERRORS, read_error
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from ..labels import map_label, values_in
from ..modality import image_modality
from ..served import ServedModel

logger = logging.getLogger(__name__)


def agree_with_final(datastore: Datastore, served: ServedModel, image_id: str) -> dict | None:
    """Scores every stored version's label of the image against its final label, by the structures the
    user's label names; None when there is nothing to compare (no final label, no stored prediction)."""
    if not served.ledger.predictions(image_id):
        return None
    label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
    if not label:
        return None
    modality, why = image_modality(datastore, image_id, served, served.settings.modality)
    if modality is None:
        logger.warning(f"not scoring the saved label of {image_id}: {why}")
        return None
    try:
        present = values_in(label)
    except READ_ERRORS as e:
        logger.warning(f"not scoring the saved label of {image_id}: {read_error(e)}")
        return None
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

