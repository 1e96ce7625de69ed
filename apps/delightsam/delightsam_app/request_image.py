"""The image of an inference request, resolved once, where the app receives the request (``DeLightSAMApp._infer``):
a datastore id through the datastore (or the PACS), never as a path relative to the server's folder; a session's
image in the session store; an upload where monailabel put it; a server path only with `--conf allow_server_paths`;
and a folder as the DICOM series it holds. The infer task reads what this found and checks nothing of it again.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore

from delightsam.reading import DicomSeries, dicom_series

from . import guard, pacs


@dataclass(frozen=True)
class RequestImage:
    id: str | None  # the datastore id, whose label and uncertainty join the loop's record (None: an upload, a session)
    path: str  # what the reader opens: a volume file, or the folder of a DICOM series
    series: DicomSeries | None = None  # the DICOM series of a folder (its files: what a DICOM SEG references)


def resolve(image: str | None, in_session: bool, store, session_store: str | None, allow_server_paths: bool,
            pacs_modalities: Callable[[], list[str]]) -> RequestImage:
    """``image`` as monailabel left it in the merged request (``in_session``: monailabel put a session's image there);
    raises an HTTPException that says what is wrong."""
    if in_session:
        return _with_series(None, _within(image, session_store, "session"))
    if not image:
        raise guard.no_image()
    if guard.is_id(image):  # a datastore id, whatever exists in the server's folder
        if isinstance(store, DICOMWebDatastore):
            return _with_series(image, pacs.fetch_series(store, image, pacs_modalities()))
        uri = store.get_image_uri(image)
        if not uri:
            raise HTTPException(404, f"no image {image!r} in the datastore")
        return _with_series(image, uri)
    if Path(image).parent == Path(tempfile.gettempdir()) and Path(image).is_file():
        return _with_series(None, image)  # where monailabel copied an upload
    return _with_series(None, guard.check_image_reference(image, allow_server_paths))


def _within(path: str | None, folder: str | None, what: str) -> str:
    if not path or not folder or Path(folder).resolve() not in Path(path).resolve().parents:
        raise HTTPException(422, f"the {what}'s image is not in the {what} store")
    return path


def _with_series(image_id: str | None, path: str) -> RequestImage:
    """A folder is read as the DICOM series in it or below it (perhaps inside the folder of a zipped upload)."""
    if not Path(path).is_dir():
        return RequestImage(image_id, path)
    try:
        series = dicom_series(path)
    except ValueError as e:
        raise HTTPException(422, f"cannot read {Path(path).name!r} as a DICOM series: {e}") from e
    return RequestImage(image_id, series.folder, series)
