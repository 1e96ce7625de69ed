"""The app over a DICOMweb PACS: ``PacsDatastore``, monailabel's DICOMWebDatastore with the Datastore
interface's methods overridden (which series it lists, SEGs with the structures' codes), requests that cannot
hang, and clear errors where monailabel would answer a bare 500 (a PACS that does not answer, a series that is
a SEG or of another modality, a series the PACS cannot send)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections import defaultdict
from typing import Callable

import requests
import retrying
from cachetools import TTLCache, cached
from fastapi import HTTPException
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from pydicom import Dataset

from . import compat
from .labels import as_seg_label

logger = logging.getLogger(__name__)
# what dicomweb-client raises when the PACS does not answer, or keeps answering "busy" after its retries
PACS_ERRORS = (requests.RequestException, retrying.RetryError)


class PacsDatastore(DICOMWebDatastore):
    """Lists the series of every served modality (``modalities()``), answers [] while the PACS is away, and
    stores `final` labels as SEGs whose segments carry the structures' names, codes and colours
    (``structures_of(modality)``: name -> label id)."""

    def __init__(self, modalities: Callable[[], list[str]], structures_of: Callable[[str], dict[str, int]],
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.modalities, self.structures_of = modalities, structures_of
        limit_waiting(compat.pacs_client(self))  # a PACS that went away or hangs must not hold every request

    @classmethod
    def from_settings(cls, url: str, modalities, structures_of) -> "PacsDatastore":
        """With monailabel's DICOMweb settings (the client, cache, search filter that it would use itself)."""
        session = None
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session = create_session_from_user_pass(settings.MONAI_LABEL_DICOMWEB_USERNAME,
                                                    settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        return cls(modalities, structures_of, client=client, search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
                   cache_path=cache or None, fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
                   convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI)

    def list_images(self) -> list[str]:
        return tolerant(list_series, compat.pacs_client(self).base_url)(self, self.modalities)

    def get_labeled_images(self, label_tag=None, labels=None) -> list[str]:
        return tolerant(super().get_labeled_images, compat.pacs_client(self).base_url)(label_tag, labels)

    def series_modality(self, series_uid: str) -> str | None:
        """The series' Modality tag from the PACS's search (QIDO), without downloading the series."""
        try:
            entry = search_series(compat.pacs_client(self), series_uid)
        except PACS_ERRORS as e:
            logger.error(f"the PACS at {compat.pacs_client(self).base_url} did not answer for series {series_uid}: {_reason(e)}")
            return None
        return (str(entry.get("Modality", "")) or None) if entry is not None else None

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        """A `final` label as a SEG whose segments carry the structures' names, codes and colours
        (``labels.as_seg_label``), checked against its series first."""
        modality = str(self.get_image_info(image_id).get("Modality") or "")
        if not modality:
            entry = search_series(compat.pacs_client(self), image_id)
            modality = str(entry.get("Modality", "")) if entry is not None else ""
        with as_seg_label(label_filename, self.get_image_uri(image_id), label_info, self.structures_of(modality.lower()),
                          image_id, modality) as (label, info):
            return super().save_label(image_id, label, label_tag, info, label_id)


@cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY),
        key=lambda datastore, modalities: (id(datastore), tuple(modalities())))
def list_series(datastore, modalities: Callable[[], list[str]]) -> list[str]:
    """The image series of every served modality (QIDO matches one Modality value per query)."""
    base = {k: v for k, v in compat.pacs_search_filter(datastore).items() if k != "Modality"}
    uids = set()
    for modality in modalities():
        for found in compat.pacs_client(datastore).search_for_series(search_filters={**base, "Modality": modality}):
            uids.add(str(Dataset.from_json(found)["SeriesInstanceUID"].value))
    return sorted(uids)


class TimeoutAdapter(requests.adapters.HTTPAdapter):
    """dicomweb-client sends its requests with no timeout: a PACS that accepts a connection and never answers
    would hold a request (and /info) for ever. This gives each one a connect and a read timeout."""

    def __init__(self, timeout: tuple[float, float], **kwargs) -> None:
        self.timeout = timeout
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().send(request, **kwargs)


def limit_waiting(client, timeout: tuple[float, float] = (5.0, 300.0)) -> None:
    """At most 3 tries over 0.75 s (dicomweb-client's own: 5 over 30 s, also when nothing listens) and
    ``timeout`` (connect, read) seconds per request; a series download streams, so the read timeout is
    the longest silence, not the whole transfer."""
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)
    adapter = TimeoutAdapter(timeout)
    compat.http_session(client).mount("http://", adapter)
    compat.http_session(client).mount("https://", adapter)


def tolerant(method: Callable, base_url: str) -> Callable:
    """``method`` of the datastore, answering [] (and logging why) while the PACS does not answer, so that
    /info, the datastore listing and everything that calls them go on."""
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except PACS_ERRORS as e:
            logger.error(f"the PACS at {base_url} did not answer ({method.__name__}): {_reason(e)}")
            return []

    return call


def _fail(status: int, message: str) -> HTTPException:
    logger.error(message)
    return HTTPException(status, message)


def _reason(error: Exception) -> str:
    if isinstance(error, retrying.RetryError):  # the last attempt's answer
        response = error.last_attempt.value
        if isinstance(response, requests.Response):
            return f"HTTP {response.status_code} {response.reason} after retries: {response.text[:200].strip()}"
        return f"no answer after retries: {str(response)[:200]}"
    response = getattr(error, "response", None)
    if response is None:
        return f"{type(error).__name__}: {str(error)[:200]}"
    return f"HTTP {response.status_code} {response.reason}: {response.text[:200].strip()}"


_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)


def search_series(client, series_uid: str) -> Dataset | None:
    """The PACS's search (QIDO) entry of one series (Modality, NumberOfSeriesRelatedInstances...), or None."""
    found = client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})
    return Dataset.from_json(found[0]) if found else None


def fetch_series(datastore, series_uid: str, modalities: list[str]) -> str:
    """Checks a series before it is downloaded, downloads it (once; monailabel caches it) and returns its local
    path, or raises an HTTPException that names the problem. A failed download leaves no partial copy."""
    pacs = compat.pacs_client(datastore).base_url
    try:
        entry = search_series(compat.pacs_client(datastore), series_uid)
    except requests.HTTPError as e:
        if e.response is not None and e.response.status_code < 500:  # it answered, and refused (a malformed UID)
            raise _fail(400, f"the PACS at {pacs} refused the search for series {series_uid}: {_reason(e)}") from e
        raise _fail(502, f"the PACS at {pacs} failed the search for series {series_uid}: {_reason(e)}") from e
    except PACS_ERRORS as e:
        raise _fail(502, f"the PACS at {pacs} did not answer the search for series {series_uid}: {_reason(e)}") from e
    if entry is None:
        raise _fail(404, f"no series {series_uid} in the PACS at {pacs}")
    modality = str(entry.get("Modality", "") or "none")
    if modality == "SEG":
        raise _fail(422, f"series {series_uid} is a DICOM SEG (a segmentation), not an image: run "
                         f"auto-segmentation on the image series it refers to")
    if modality not in modalities:
        raise _fail(422, f"series {series_uid} has Modality {modality}; De-LightSAM segments "
                         f"{' and '.join(modalities)} series")
    image_dir = os.path.join(compat.pacs_cache(datastore).image_path(), series_uid)
    expected = entry.get("NumberOfSeriesRelatedInstances")  # what the PACS says the series holds
    with _locks[series_uid]:  # concurrent requests for one series share one download
        return _download(datastore, series_uid, modality, image_dir, int(expected) if expected else None)


def _download(datastore, series_uid: str, modality: str, image_dir: str, expected: int | None = None) -> str:
    """``expected``: the instances the PACS says the series holds. A transfer cut where a part ends can parse as a
    shorter series, or as a dataset without its identifiers: both are the PACS's failure (502), not the image's."""
    pacs = compat.pacs_client(datastore).base_url
    try:
        path = datastore.get_image_uri(series_uid)
    except PACS_ERRORS as e:
        _forget(datastore, series_uid, image_dir)
        raise _fail(502, f"the PACS at {pacs} could not send series {series_uid} ({modality}): {_reason(e)}") from e
    except OSError as e:  # disk full, permissions: not the series' fault
        _forget(datastore, series_uid, image_dir)
        raise _fail(500, f"series {series_uid} could not be stored in the cache: {e}") from e
    except Exception as e:  # the series came, but is no readable volume (transfer syntax, geometry), or did not all come
        arrived = _arrived(image_dir)
        _forget(datastore, series_uid, image_dir)
        if expected and arrived < expected:
            raise _broken(pacs, series_uid, modality, arrived, expected, f" ({type(e).__name__}: {str(e)[:200]})") from e
        raise _fail(422, f"series {series_uid} ({modality}) could not be read as an image volume: "
                         f"{type(e).__name__}: {str(e)[:300]}") from e
    arrived = _arrived(image_dir)
    if expected and os.path.isdir(image_dir) and arrived < expected:
        _forget(datastore, series_uid, image_dir)
        raise _broken(pacs, series_uid, modality, arrived, expected)
    return path


def _arrived(image_dir: str) -> int:
    return len(os.listdir(image_dir)) if os.path.isdir(image_dir) else 0


def _broken(pacs: str, series_uid: str, modality: str, arrived: int, expected: int, cause: str = "") -> HTTPException:
    return _fail(502, f"the PACS at {pacs} could not send series {series_uid} ({modality}): the transfer broke after "
                      f"{arrived} of its {expected} instances{cause}")


def _forget(datastore, series_uid: str, image_dir: str) -> None:
    """Removes what a failed download left, so that the next request downloads the series again."""
    shutil.rmtree(image_dir, ignore_errors=True)
    nifti = os.path.join(compat.pacs_cache(datastore).image_path(), f"{series_uid}.nii.gz")
    if os.path.exists(nifti):
        os.unlink(nifti)
