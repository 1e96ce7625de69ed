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

from delightsam.headers import Header, HeaderError, Limits, check_series, check_volume
from delightsam.reading import READ_ERRORS, DicomSeries, dicom_series

from . import guard, pacs


@dataclass(frozen=True)
class RequestImage:
    id: str | None  # the datastore id, whose label and uncertainty join the loop's record (None: an upload, a session)
    path: str  # what the reader opens: a volume file, or the folder of a DICOM series
    series: DicomSeries | None = None  # the DICOM series of a folder (its files: what a DICOM SEG references)
    header: Header | None = None  # read and checked before any voxel is (``delightsam.headers``)


def resolve(image: str | None, in_session: bool, store, session_store: str | None, allow_server_paths: bool,
            pacs_modalities: Callable[[], list[str]], limits: Limits | None = None) -> RequestImage:
    """``image`` as monailabel left it in the merged request (``in_session``: monailabel put a session's image there),
    its header read and checked against ``limits``; raises an HTTPException that says what is wrong."""
    found = _resolve(image, in_session, store, session_store, allow_server_paths, pacs_modalities)
    return RequestImage(found.id, found.path, found.series, checked_header(found, limits))


def checked_header(image: RequestImage, limits: Limits | None) -> Header:
    """The image's header, refused with 413 beyond the server's limits and 422 where the file itself is wrong
    (shorter than it says, impossible geometry, not 3-D, unreadable), before a voxel is read."""
    name = Path(image.series.folder if image.series else image.path).name
    try:
        if image.series is not None:
            return check_series(image.series.files, name, limits)
        return check_volume(image.path, limits)
    except HeaderError as e:
        raise HTTPException(413 if e.kind == "size" else 422, f"refused {name!r} by its header: {e}") from e
    except READ_ERRORS as e:
        raise guard.unreadable(name, e) from e


def _resolve(image: str | None, in_session: bool, store, session_store: str | None, allow_server_paths: bool,
             pacs_modalities: Callable[[], list[str]]) -> RequestImage:
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
