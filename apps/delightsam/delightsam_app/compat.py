"""Every place the app reaches into a private part of monailabel, FastAPI or dicomweb-client, in one module.

The app subclasses monailabel's datastores and app, replaces FastAPI routes in place, and tunes the DICOMweb
client's HTTP session; each of these leans on a name that its library does not promise to keep. Each such name
is used only through this module, and each is registered with the library and the version it was written
against and a probe (``private``). At start ``check()`` runs every probe: a missing feature stops the app with a
message that names it (instead of a dead override or an AttributeError in the middle of a request), and a
version other than the pinned one is logged. ``requirements.txt`` pins the versions named here.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Private:
    package: str
    version: str  # the version this use was written against (and requirements.txt pins)
    what: str  # the private name, as a reader would look it up
    probe: Callable[[], bool]  # whether the installed package still has it
    required: bool = True  # False: the app runs without it, losing only what it adds (a warning at start)


REGISTRY: list[Private] = []


def private(package: str, version: str, what: str, probe: Callable[[], bool], required: bool = True) -> None:
    REGISTRY.append(Private(package, version, what, probe, required))


def _has(owner_path: str, *names: str) -> Callable[[], bool]:
    """A probe: the class or module at ``owner_path`` (module:attr) has every one of ``names``."""
    def probe() -> bool:
        module, _, attr = owner_path.partition(":")
        owner = __import__(module, fromlist=["_"])
        for part in filter(None, attr.split(".")):
            owner = getattr(owner, part)
        return all(hasattr(owner, n) for n in names)

    return probe


def _sets_in_init(owner_path: str, *names: str) -> Callable[[], bool]:
    """A probe for instance attributes: the class's __init__ assigns each of ``names`` (read from its source)."""
    def probe() -> bool:
        module, _, attr = owner_path.partition(":")
        owner = getattr(__import__(module, fromlist=["_"]), attr)
        source = inspect.getsource(owner.__init__)
        return all(f"self.{n} =" in source or f"self.{n}:" in source for n in names)

    return probe


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def problems() -> tuple[list[str], list[str]]:
    """(missing features the app needs, version differences and missing optional features) of every registered
    private use."""
    missing, differ = [], set()
    for use in REGISTRY:
        version = installed(use.package)
        if version != use.version:
            differ.add(f"{use.package} {version or 'not installed'} (written for {use.version})")
        try:
            ok = use.probe()
        except Exception as e:  # a module or class that is gone
            ok = False
            logger.debug(f"probe of {use.what} failed: {e}")
        if not ok:
            found = f"{use.package} {version or '(not installed)'} has no {use.what} (written for {use.version})"
            if use.required:
                missing.append(found)
            else:
                differ.add(f"{found}: the app runs without what it adds")
    return missing, sorted(differ)


def check() -> None:
    """Stops the app at start if a library it reaches into lacks what it uses; logs other versions."""
    missing, differ = problems()
    if differ:
        logger.warning(f"libraries other than those this app was written for: {'; '.join(differ)} "
                       f"(requirements.txt pins them)")
    if missing:
        raise RuntimeError("this De-LightSAM app cannot run with the installed libraries: "
                           + "; ".join(missing) + ". Install the versions in requirements.txt.")


# ---- FastAPI ---------------------------------------------------------------------------------------------
FASTAPI = "0.165.0"


def _route_body_limit() -> bool:
    from fastapi.routing import APIRoute

    return "max_body_size" in inspect.signature(APIRoute.__init__).parameters


def _version_cache_has_a_reset() -> bool:
    """Newer FastAPI caches the routes of an included router by a version number: a route replaced in place is
    seen only once the router's version moves (``_mark_routes_changed``). Older versions copy routes instead."""
    from fastapi.routing import APIRouter

    return not hasattr(APIRouter, "_get_routes_version") or hasattr(APIRouter, "_mark_routes_changed")


private("fastapi", FASTAPI, "APIRoute(max_body_size=...) (a request body limit counted as it arrives)",
        _route_body_limit)
private("fastapi", FASTAPI, "APIRouter._mark_routes_changed (routes replaced in place are served)",
        _version_cache_has_a_reset)


def body_limit(route) -> int | None:
    """The route's own request body limit (None: none)."""
    return getattr(route, "max_body_size", None)


def included_router(route) -> tuple[Any, str] | None:
    """(the router, its path prefix) that this entry of a router's routes includes; None for a plain route.
    FastAPI keeps an included router as one entry referring to the original router; older versions copied its
    routes into the parent (then every entry is a plain route)."""
    router = getattr(route, "original_router", None)
    if router is None:
        return None
    return router, getattr(getattr(route, "include_context", None), "prefix", "")


def routes_changed(router) -> None:
    """Tells FastAPI that ``router``'s routes were replaced in place (it caches what it resolved)."""
    if hasattr(router, "_mark_routes_changed"):
        router._mark_routes_changed()


def _openapi_can_be_replaced() -> bool:
    from fastapi import FastAPI

    return callable(getattr(FastAPI, "openapi", None)) and _sets_in_init("fastapi:FastAPI", "openapi_schema")()


private("fastapi", FASTAPI, "FastAPI.openapi and .openapi_schema (the document extended and rebuilt, as FastAPI's "
        "'Extending OpenAPI' shows)", _openapi_can_be_replaced)


def openapi_changed(server) -> None:
    """The server's routes changed: FastAPI builds its OpenAPI document again on the next request for it."""
    server.openapi_schema = None


def extend_openapi(server, extend: Callable[[dict], dict]) -> None:
    """The server's OpenAPI document as FastAPI builds it, then passed through ``extend`` (kept until the routes
    change: ``openapi_changed``)."""
    built = server.openapi
    server.openapi = lambda: server.openapi_schema or extend(built())


# ---- monailabel ------------------------------------------------------------------------------------------
MONAILABEL = "0.8.5"
APP = "monailabel.interfaces.app:MONAILabelApp"
LOCAL = "monailabel.datastore.local:LocalDatastore"
DICOMWEB = "monailabel.datastore.dicom:DICOMWebDatastore"

private("monailabel", MONAILABEL, "MONAILabelApp._infers, _trainers, _scoring_methods, _strategies (the app's tasks)",
        _sets_in_init(APP, "_infers", "_trainers", "_scoring_methods", "_strategies"))
private("monailabel", MONAILABEL, "MONAILabelApp._download_dcmqi_tools, _init_dicomweb_datastore",
        _has(APP, "_download_dcmqi_tools", "_init_dicomweb_datastore"))
private("monailabel", MONAILABEL, "MONAILabelApp._batch_infer (the app's batch task)",
        _sets_in_init(APP, "_batch_infer"))
private("monailabel", MONAILABEL, "MONAILabelApp._load_sessions (overridden: checked uploads)",
        _has(APP, "_load_sessions"))
private("monailabel", MONAILABEL, "LocalDatastore's index (_datastore, _datastore_path, _datastore_config_path, "
        "_lock_file, _config_ts, _auto_reload, _extensions)",
        _sets_in_init(LOCAL, "_datastore", "_datastore_path", "_datastore_config_path", "_lock_file", "_config_ts",
                      "_auto_reload", "_extensions"))
private("monailabel", MONAILABEL, "LocalDatastore._init_from_datastore_file, _update_datastore_file, "
        "_reconcile_datastore, _filename, _to_id (overridden or called: the index under one lock)",
        _has(LOCAL, "_init_from_datastore_file", "_update_datastore_file", "_reconcile_datastore", "_filename",
             "_to_id"))
private("monailabel", MONAILABEL, "LocalDatastore._handler (its file watcher)", _sets_in_init(LOCAL, "_handler"))
private("monailabel", MONAILABEL, "DICOMWebDatastore._client, _search_filter (and its LocalDatastore's _datastore)",
        _sets_in_init(DICOMWEB, "_client", "_search_filter"))
private("monailabel", MONAILABEL, "LocalDatastore.get_label_uri called on a DICOMWebDatastore (the label file it "
        "cached, where its own would download a SEG)", lambda: _is_a(DICOMWEB, LOCAL) and _has(LOCAL, "get_label_uri")())


def _is_a(child_path: str, parent_path: str) -> bool:
    def load(path):
        module, _, attr = path.partition(":")
        return getattr(__import__(module, fromlist=["_"]), attr)

    return issubclass(load(child_path), load(parent_path))


# the MONAI Label panel of the OHIF viewer bundled in monailabel, whose error toast ``ohif.py`` extends
OHIF_TOAST = "message: 'Failed to Run Segmentation',"


def ohif_scripts() -> list:
    """The scripts of the OHIF viewer bundled in monailabel (its static files)."""
    from pathlib import Path

    import monailabel

    return sorted((Path(monailabel.__file__).parent / "endpoints" / "static" / "ohif").glob("*.bundle.*.js"))


@functools.lru_cache(maxsize=1)
def ohif_panel() -> tuple[str, str] | None:
    """(file name, text) of the bundled OHIF script that holds the MONAI Label panel's error toast, or None (read
    once per process: the scripts are megabytes)."""
    for script in ohif_scripts():
        text = script.read_text(encoding="utf-8", errors="surrogateescape")
        if OHIF_TOAST in text:
            return script.name, text
    return None


private("monailabel", MONAILABEL, f"the bundled OHIF's MONAI Label panel script with {OHIF_TOAST!r} (its error toast, "
        f"served extended by ohif.py)", lambda: ohif_panel() is not None, required=False)


def infer_tasks(app) -> dict:
    return app._infers


def trainers(app) -> dict:
    return app._trainers


def scoring_methods(app) -> dict:
    return app._scoring_methods


def strategies(app) -> dict:
    return app._strategies


def download_seg_tools(app) -> None:
    """monailabel's download of dcmqi's itkimage2segimage (the dcmqi wheel provides it: nothing is fetched)."""
    app._download_dcmqi_tools()


def monailabel_dicomweb_datastore(app):
    """monailabel's own DICOMweb datastore set-up (the app overrides it; its Google Cloud path stays monailabel's)."""
    from monailabel.interfaces.app import MONAILabelApp

    return MONAILabelApp._init_dicomweb_datastore(app)


def run_batch(app, request, datastore, infer):
    """monailabel's batch inference task of the app, run with ``infer``."""
    return app._batch_infer(request, datastore, infer)


class LocalIndex:
    """The parts of monailabel's LocalDatastore that its subclass here works on: the index (datastore_v2.json)
    in memory and on disk, its lock file, and how ids become file names."""

    @staticmethod
    def model(store):
        return store._datastore

    @staticmethod
    def replace(store, model, stamp: float) -> None:
        model.base_path = store._datastore_path
        store._datastore = model
        store._config_ts = stamp

    @staticmethod
    def path(store) -> str:
        return store._datastore_config_path

    @staticmethod
    def lock_path(store) -> str:
        return store._lock_file

    @staticmethod
    def seen(store, stamp: float) -> None:
        store._config_ts = stamp

    @staticmethod
    def watcher(store):
        return getattr(store, "_handler", None)

    @staticmethod
    def auto_reload(store) -> bool:
        return store._auto_reload

    @staticmethod
    def extensions(store) -> list[str]:
        return [e.replace("*", "") for e in store._extensions]

    @staticmethod
    def file_name(store, object_id: str, extension: str) -> str:
        return store._filename(object_id, extension)

    @staticmethod
    def split_name(store, file_name: str) -> tuple[str, str]:
        return store._to_id(file_name)


def pacs_client(store):
    """The DICOMweb client of monailabel's DICOMweb datastore."""
    return store._client


def pacs_search_filter(store) -> dict:
    return store._search_filter


def pacs_cache(store):
    """The local index (and folders) where monailabel's DICOMweb datastore caches series and SEGs."""
    return store._datastore


def cached_label_uri(store, image_id: str, tag: str) -> str:
    """The label file that monailabel's DICOMweb datastore keeps in its cache for an image (its own get_label_uri
    would download the SEG from the PACS)."""
    from monailabel.datastore.local import LocalDatastore

    return LocalDatastore.get_label_uri(store, image_id, tag)


# ---- dicomweb-client -------------------------------------------------------------------------------------
private("dicomweb-client", "0.59.3", "DICOMwebClient._session (its requests session)",
        _sets_in_init("dicomweb_client.web:DICOMwebClient", "_session"))


def http_session(client):
    return client._session
