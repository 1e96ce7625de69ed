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
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from delightsam.files import atomic_path, write_text

from . import guard

logger = logging.getLogger(__name__)


class AtomicLocalDatastore(LocalDatastore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._own_index: tuple | None = None
        if getattr(self, "_handler", None) is not None:  # monailabel's file watcher (auto reload)
            self._handler.on_moved = self._on_moved_event

    def _on_moved_event(self, event) -> None:
        """Files here are replaced by a rename (ours, and those of the train, scoring and batch processes, which
        run this class too): monailabel's watcher knows only created, deleted and modified files. An index that
        another process renamed into place is read again. A label renamed into place is not reconciled on its
        own: its writer renames the index after it, with the label's info, which a reconcile from this
        process's older copy could overwrite."""
        if getattr(event, "dest_path", None) == self._datastore_config_path and self._index_stamp() != self._own_index:
            logger.info("the datastore index was changed by another process: reading it again")
            self._init_from_datastore_file()  # under monailabel's lock

    def _index_stamp(self) -> tuple | None:
        try:
            stat = os.stat(self._datastore_config_path)
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def _read_index_locked(self) -> None:
        """The index as it is on disk now (the caller holds the lock): another process (train, scoring, batch
        inference) may have changed it since this one read it, and a change made on a stale copy would drop
        theirs, a user's saved label among them."""
        if self._index_stamp() not in (None, self._own_index):
            with open(self._datastore_config_path) as f:
                self._datastore = LocalDatastoreModel.model_validate_json(f.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = os.stat(self._datastore_config_path).st_mtime
            self._own_index = self._index_stamp()

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._read_index_locked()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._read_index_locked()
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)
            self._update_datastore_file(lock=False)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        guard.check_id(image_id)
        guard.check_name(label_tag, "label tag")
        _, extension = self._to_id(os.path.basename(label_filename))
        dest = Path(self._datastore.label_path(label_tag)) / self._filename(image_id, extension)
        logger.info(f"Saving label {label_tag} of {image_id} as {dest.name} (written aside, then renamed)")
        with FileLock(self._lock_file):
            self._read_index_locked()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            with atomic_path(dest) as tmp:
                shutil.copyfile(label_filename, tmp)
            info = {**(label_info or {}), "ts": int(time.time()), "name": dest.name}
            obj.labels[label_tag] = DataModel(info=info, ext=extension)
            self._update_datastore_file(lock=False)
        return image_id

    def _update_datastore_file(self, lock=True):
        def write() -> None:
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            write_text(self._datastore_config_path, text)
            self._own_index = self._index_stamp()  # the watcher's event for this rename is our own
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
