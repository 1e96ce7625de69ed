"""monailabel's local datastore with saves that a crash cannot tear.

monailabel 0.8.5 copies a saved label over the old one in place and rewrites `datastore_v2.json` in place: a
server killed mid-save leaves half a label or half an index. Here both are written aside and renamed
(``delightsam.files``), under monailabel's own lock, so after a restart each is the old one or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore
from monailabel.interfaces.exception import ImageNotFoundException

from delightsam.files import atomic_path, write_text

from . import guard

logger = logging.getLogger(__name__)


class AtomicLocalDatastore(LocalDatastore):
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        guard.check_id(image_id)
        guard.check_name(label_tag, "label tag")
        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, extension = self._to_id(os.path.basename(label_filename))
        dest = Path(self._datastore.label_path(label_tag)) / self._filename(image_id, extension)
        logger.info(f"Saving label {label_tag} of {image_id} as {dest.name} (written aside, then renamed)")
        with FileLock(self._lock_file):
            with atomic_path(dest) as tmp:
                shutil.copyfile(label_filename, tmp)
            info = {**(label_info or {}), "ts": int(time.time()), "name": dest.name}
            obj.labels[label_tag] = DataModel(info=info, ext=extension)
            self._update_datastore_file(lock=False)
        return image_id

    def _update_datastore_file(self, lock=True):
        def write() -> None:
            self._ignore_event_config = True  # monailabel's file watcher: this change is our own
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
