"""Next Sample's strategies (``POST /activelearning/<strategy>``): ``Uncertain`` (the default) hands out the
unlabelled image the served version is least sure of (``scoring.uncertainty``), skipping images handed to another
user within ``handout_minutes``; ``Random`` and ``Last`` beside monailabel's ``First``. Their requests are typed
where the app receives them (``options.NextSampleOptions``)."""

from __future__ import annotations

import random
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..served import ServedModel


class Uncertain(Strategy):
    def __init__(self, served: ServedModel) -> None:
        super().__init__("The unlabelled image the served model is least sure of (scoring method `uncertainty`); "
                         "images handed to another user recently are skipped")
        self.served = served

    def __call__(self, request, datastore: Datastore):
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        version = self.served.version()
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

