"""monailabel's local datastore with an index that several processes can change, and saves that a crash cannot
tear.

The server, and the train, scoring and batch processes it starts, each hold a copy of the datastore's index
(`datastore_v2.json`) and write it back. monailabel 0.8.5 changes its copy and then writes it, so a write made
from a stale copy drops what another process wrote meanwhile (a user's saved label among it), and it copies
labels and the index over the old files in place (a server killed mid-save leaves half a file). Here every change,
monailabel's own included (adding and removing images and labels, reconciling the folder, info updates), is made
under one lock to the index as it is on disk at that moment; files are written aside and renamed
(``delightsam.files``). What a request adds is checked first: an image's id and file, a label's voxels against
its image (``label_check``), an info update's keys and types (``options``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from delightsam.files import atomic_path, write_text
from delightsam.reading import READ_ERRORS, read_error, read_grid

from . import guard
from .compat import LocalIndex
from .options import ImageInfoUpdate, LabelInfoUpdate, parse

logger = logging.getLogger(__name__)
# (image id, image file, label file, the label's params) -> (the file to save, the label's info, notes)
LabelCheck = Callable[[str, str, str, dict], tuple[str, dict, list[str]]]


class AtomicLocalDatastore(LocalDatastore):
    def __init__(self, *args, label_check: LabelCheck | None = None,
                 modalities: Callable[[], list[str]] | None = None, **kwargs) -> None:
        self._label_check = label_check
        self._modalities = modalities  # those an image's info may name (the served model's)
        self._own_index: tuple | None = None
        self._lock: FileLock | None = None
        super().__init__(*args, **kwargs)
        watcher = LocalIndex.watcher(self)
        if watcher is not None:  # monailabel's file watcher (auto reload)
            watcher.on_moved = self._on_moved_event

    # ---- the index: read and written under one lock -----------------------------------------------------
    @property
    def index_lock(self) -> FileLock:
        """One lock object per datastore: re-entrant in a thread, exclusive between threads and processes."""
        if self._lock is None:
            self._lock = FileLock(LocalIndex.lock_path(self))
        return self._lock

    @contextmanager
    def changing(self):
        """The index as it is on disk now, under the lock, to change; written back when the block ends without an
        exception (nothing is written if it raises)."""
        with self.index_lock:
            self._read_index()
            try:
                yield LocalIndex.model(self)
            except BaseException:
                self._own_index = None  # the copy in memory may be half changed: the file is read again next time
                raise
            self._update_datastore_file()

    def _index_stamp(self) -> tuple | None:
        try:
            stat = os.stat(LocalIndex.path(self))
        except OSError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def _read_index(self, throw_exception: bool = True) -> None:
        """Reads the index file if another process (or a rename) changed it since this one last read or wrote it."""
        with self.index_lock:
            stamp = self._index_stamp()
            if stamp in (None, self._own_index):
                return
            try:
                with open(LocalIndex.path(self)) as f:
                    model = LocalDatastoreModel.model_validate_json(f.read())
            except ValueError as e:
                logger.error(f"the datastore index {LocalIndex.path(self)} cannot be read: {e}")
                if throw_exception:
                    raise
                return
            LocalIndex.replace(self, model, os.stat(LocalIndex.path(self)).st_mtime)
            self._own_index = stamp

    def _init_from_datastore_file(self, throw_exception=False):  # monailabel's name: its readers call it
        self._read_index(throw_exception)

    def _update_datastore_file(self, lock=True):  # monailabel's name; always under the (re-entrant) lock
        with self.index_lock:
            text = json.dumps(LocalIndex.model(self).model_dump(exclude={"base_path"}), indent=2, default=str)
            write_text(LocalIndex.path(self), text)
            self._own_index = self._index_stamp()  # the watcher's event for this rename is our own
            LocalIndex.seen(self, os.stat(LocalIndex.path(self)).st_mtime)

    def _reconcile_datastore(self):
        """monailabel's reconcile of the index with the files in the folders, from the index on disk, under the lock."""
        with self.index_lock:
            self._read_index()
            super()._reconcile_datastore()

    def _on_moved_event(self, event) -> None:
        """Files here are replaced by a rename (ours, and those of the train, scoring and batch processes, which run
        this class too): monailabel's watcher knows only created, deleted and modified files. An index that another
        process renamed into place is read again; a label renamed into place is left to its writer, which renames
        the index after it, with the label's info."""
        if getattr(event, "dest_path", None) == LocalIndex.path(self) and self._index_stamp() != self._own_index:
            logger.info("the datastore index was changed by another process: reading it again")
            self._read_index(throw_exception=False)

    def set_name(self, name: str):
        with self.changing() as index:
            index.name = name

    def set_description(self, description: str):
        with self.changing() as index:
            index.description = description

    # ---- images ---------------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """An uploaded image, under ``image_id`` or, without one, the upload's file name (checked alike), of a file
        type this datastore lists and readable as a volume; written aside and renamed into place."""
        derived, extension = LocalIndex.split_name(self, os.path.basename(image_filename))
        image_id = guard.check_id(image_id or derived, "image id")
        if extension not in LocalIndex.extensions(self):
            raise HTTPException(415, f"{Path(image_filename).name!r} is not a file type this datastore keeps "
                                     f"({', '.join(LocalIndex.extensions(self))})")
        info = self._checked_image_info(image_info or {})
        try:
            read_grid(image_filename)
        except READ_ERRORS as e:
            raise HTTPException(422, f"the image {image_id!r} was not added: cannot read it as a volume: "
                                     f"{read_error(e)}") from e
        folder = Path(LocalIndex.model(self).image_path())
        dest = folder / LocalIndex.file_name(self, image_id, extension)
        logger.info(f"Adding image {image_id} as {dest.name} (written aside, then renamed)")
        with self.changing() as index:
            old = index.objects.get(image_id)
            with atomic_path(dest) as tmp:
                shutil.copyfile(image_filename, tmp)
            if old is not None and old.image.ext != extension:  # the same id in another format: one file per id
                (folder / LocalIndex.file_name(self, image_id, old.image.ext)).unlink(missing_ok=True)
            info.update({"ts": int(time.time()), "name": dest.name})
            labels = old.labels if old is not None else {}
            index.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=extension), labels=labels)
        return image_id

    def remove_image(self, image_id: str) -> None:
        with self.changing() as index:
            obj = index.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            for tag, label in obj.labels.items():
                Path(index.label_path(tag), LocalIndex.file_name(self, image_id, label.ext)).unlink(missing_ok=True)
            Path(index.image_path(), LocalIndex.file_name(self, image_id, obj.image.ext)).unlink(missing_ok=True)
            del index.objects[image_id]

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        info = self._checked_image_info(info)
        with self.changing() as index:
            obj = index.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            obj.image.info.update(info)

    def _checked_image_info(self, info: dict[str, Any]) -> dict[str, Any]:
        context = {"modalities": self._modalities()} if self._modalities else None
        return parse(ImageInfoUpdate, info, "the image's info", context).model_dump(exclude_none=True)

    # ---- labels ---------------------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """A label of a datastore image, checked against the image before anything is written (``label_check``);
        written aside and renamed, its info in the index, both under the lock."""
        guard.check_id(image_id)
        guard.check_name(label_tag, "label tag")
        image = self.get_image_uri(image_id)
        if not image:
            raise ImageNotFoundException(f"Image {image_id} not found")
        _, extension = LocalIndex.split_name(self, os.path.basename(label_filename))
        if extension not in LocalIndex.extensions(self):
            raise HTTPException(415, f"the label was not saved: {Path(label_filename).name!r} is not a file type "
                                     f"this datastore keeps ({', '.join(LocalIndex.extensions(self))})")
        notes: list[str] = []
        if self._label_check is not None:
            label_filename, label_info, notes = self._label_check(image_id, image, label_filename, label_info or {})
        with self.changing() as index:
            obj = index.objects.get(image_id)
            if not obj:
                raise ImageNotFoundException(f"Image {image_id} not found")
            folder = Path(index.label_path(label_tag))
            dest = folder / LocalIndex.file_name(self, image_id, extension)
            logger.info(f"Saving label {label_tag} of {image_id} as {dest.name} (written aside, then renamed)")
            with atomic_path(dest) as tmp:
                shutil.copyfile(label_filename, tmp)
            old = obj.labels.get(label_tag)
            if old is not None and old.ext != extension:  # one file per image and tag
                (folder / LocalIndex.file_name(self, image_id, old.ext)).unlink(missing_ok=True)
            info = {**(label_info or {}), "ts": int(time.time()), "name": dest.name}
            obj.labels[label_tag] = DataModel(info=info, ext=extension)
        for note in notes:
            logger.info(f"label {label_tag} of {image_id}: {note}")
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        with self.changing() as index:
            obj = index.objects.get(label_id)
            label = obj.labels.get(label_tag) if obj else None
            if label is None:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            Path(index.label_path(label_tag), LocalIndex.file_name(self, label_id, label.ext)).unlink(missing_ok=True)
            del obj.labels[label_tag]

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        info = parse(LabelInfoUpdate, info, "the label's info").model_dump(exclude_none=True)
        with self.changing() as index:
            label = index.label(label_id, label_tag)
            if not label:
                raise LabelNotFoundException(f"Label: {label_id} Tag: {label_tag} not found")
            label.info.update(info)
