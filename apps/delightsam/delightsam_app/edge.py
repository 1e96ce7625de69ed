"""monailabel's REST API made safe for several users: checked requests, work off the event loop, bounded queue.

monailabel 0.8.5 declares its endpoints ``async def`` and does blocking work in them (inference, PACS I/O,
copying uploads), so one CPU inference stalls `/info`, the viewers' polling and every other user. Here each of
its API routes is registered again, ahead of the original, as a plain ``def`` path operation around the same
endpoint function: FastAPI runs such path operations in its threadpool (documented FastAPI behaviour); the route
keeps the original's path, methods, parameters (so its RBAC dependency) and OpenAPI description. Before the
endpoint runs, the request's ids, names and uploads are checked (``guard``), its JSON may not set what the server
sets (the image, the model, a session, where a label goes: ``options.refuse_internal``), and a job that runs in a
process of its own (training, batch inference, scoring) has its options typed here, as that process will type
them, so that a bad one is a 422 now rather than a failed job later. Inference also passes an admission gate:
``infer_workers`` at once, ``infer_queue`` waiting, and beyond that 503 with a Retry-After estimate. Routes that
await the request themselves (the DICOMweb proxy) stay as they are. The options of a request are typed where
they are used, after monailabel's merge (``options``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fastapi import HTTPException
from fastapi.routing import APIRoute
from monailabel.config import settings as ml_settings
from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException, MONAILabelError,
                                             MONAILabelException)
from monailabel.interfaces.utils.app import app_instance

from . import compat, guard, options

logger = logging.getLogger(__name__)
# monailabel's routers whose endpoints block; the DICOMweb proxy awaits the request on the server's own loop and
# stays there, as do the static OHIF files
OFF_THE_LOOP = ("/info", "/model", "/infer", "/batch", "/train", "/activelearning", "/scoring", "/datastore",
                "/session", "/logs")


class Admission:
    """At most ``workers`` inferences at once and ``queue`` waiting; the rest are told when to come back."""

    def __init__(self, workers: int, queue: int) -> None:
        self.workers, self.queue = workers, queue
        self._slots = threading.Semaphore(workers)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.seconds = 10.0  # running estimate of one inference, for Retry-After

    @contextmanager
    def __call__(self):
        with self._lock:
            if self.in_flight >= self.workers + self.queue:
                wait = math.ceil(self.seconds * (self.in_flight - self.workers + 1) / self.workers)
                raise HTTPException(503, f"the server is busy: {self.in_flight} inferences running or queued "
                                         f"(at most {self.workers} at once and {self.queue} waiting); retry in "
                                         f"about {wait} s", headers={"Retry-After": str(max(wait, 1))})
            self.in_flight += 1
        try:
            with self._slots:
                began = time.monotonic()
                yield
                self.seconds = 0.7 * self.seconds + 0.3 * (time.monotonic() - began)
        finally:
            with self._lock:
                self.in_flight -= 1


def check_request(path: str, values: dict, app_settings) -> None:
    """The ids, names and uploads of one request, by parameter name (monailabel's names)."""
    limits = guard.UploadLimits.from_settings(app_settings)
    for key, value in values.items():
        if value is None or (value == "" and (key not in ("image", "id", "label", "tag", "session_id")
                                               or "/infer" in path)):
            continue
        if _is_upload(value) or (isinstance(value, list) and any(_is_upload(v) for v in value)):
            for upload in value if isinstance(value, list) else [value]:
                check_upload(upload, limits)
        elif key == "image":
            if "/infer" in path:
                guard.check_image_reference(value, app_settings.allow_server_paths)
            else:
                guard.check_id(value, "image id")
        elif key in ("label", "id"):
            guard.check_id(value, f"{key} id")
        elif key == "session_id":
            guard.check_id(value, "session id")
        elif key in ("tag", "model", "strategy", "method"):
            guard.check_name(value, "label tag" if key == "tag" else key)


# the JSON fields of requests whose keys are options of the app: (route path, method, field) -> their type
JSON_FIELDS = {(r"/infer/[^/]+", "POST", "params"): options.LoopInferOptions,
               (r"/datastore/label", "PUT", "params"): options.SavedLabelInfo,
               (r"/datastore/image/info", "PUT", "info"): options.ImageInfoUpdate,
               (r"/datastore/(image)?", "PUT", "params"): options.ImageInfoUpdate,
               (r"/activelearning/[^/]+", "POST", "params"): options.NextSampleOptions}


def refuse_server_keys(path: str, methods: set[str], values: dict) -> None:
    """A request's JSON may not set what monailabel's route or the app sets (``options.refuse_internal``): a
    `params` naming another image than the one checked, a session, where a label is saved."""
    for (pattern, method, field), kind in JSON_FIELDS.items():
        if method in methods and re.fullmatch(pattern, path) and values.get(field) not in (None, ""):
            sent = values[field]
            if isinstance(sent, str):
                try:
                    sent = json.loads(sent)
                except json.JSONDecodeError as e:
                    raise HTTPException(422, f"{field} is not valid JSON: {e}") from e
            options.refuse_internal(kind, sent, f"the request's {field}")
            return


def check_background_job(path: str, methods: set[str], values: dict, app) -> None:
    """Training, batch inference and scoring run in processes of their own, where a bad option would only fail
    the job: their requests are built as monailabel builds them and typed here first (422), their task must
    exist (404), and they run in the background only (run_sync would hold a server thread for the whole run)."""
    if "POST" not in methods or not path.startswith(("/train", "/batch/infer", "/scoring")):
        return
    if values.get("run_sync"):
        raise HTTPException(422, "run_sync is not available: this server runs training, batch inference and "
                                 "scoring in the background (poll their status, e.g. GET /train/)")
    params = values.get("params") or {}
    if path.startswith("/train"):
        kind, field, tasks = options.TrainOptions, "model", compat.trainers(app)
    elif path.startswith("/scoring"):
        kind, field, tasks = options.ScoringOptions, "method", compat.scoring_methods(app)
    else:
        kind, field, tasks = options.BatchOptions, "model", compat.infer_tasks(app)
    options.refuse_internal(kind, params, "the request's params")
    named = values.get(field)
    if named and named not in tasks:
        raise HTTPException(404, f"no {field} named {named!r}; this server has: {', '.join(tasks)}")
    for name in [named] if named else list(tasks):
        own = params.get(name) if not named else None  # POST /train/ (all): a task's own dict, as monailabel merges it
        request = {field: name, **(own if isinstance(own, dict) else {}), **params}
        if kind is options.BatchOptions:
            request["images"] = getattr(values.get("images"), "value", values.get("images") or "all")
        options.parse(kind, request, f"{name!r}", {"max_batch_size": app.settings.max_batch_size})


def refuse_what_cannot_work(path: str, methods: set[str], values: dict) -> None:
    """Requests that monailabel would answer with a bare 500, answered with what is wrong instead."""
    if path.startswith("/infer/") and "POST" in methods and not (values.get("image") or values.get("file")
                                                                 or values.get("session_id")):
        raise guard.no_image()
    if path.startswith("/model/") and "PUT" in methods:
        raise HTTPException(403, "this server does not take model files over the API: the train task publishes "
                                 "new versions, and --conf checkpoint chooses the served one")
    if path.startswith("/logs/gpu") and shutil.which("nvidia-smi") is None:
        raise HTTPException(404, "this server has no NVIDIA GPU (nvidia-smi is not installed)")


def as_client_error(path: str, error: Exception) -> HTTPException | None:
    """monailabel's exceptions for requests that name something that is not there, or send malformed JSON, as
    the 4xx they are (None: a server error, left as it is)."""
    if isinstance(error, json.JSONDecodeError):
        return HTTPException(422, f"a parameter is not valid JSON: {error}")
    if isinstance(error, (ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(404, str(error.msg))
    if isinstance(error, MONAILabelException) and error.error == MONAILabelError.APP_INIT_ERROR:
        return HTTPException(404, str(error.msg))  # no such task (strategy, scoring method, trainer)
    if isinstance(error, MONAILabelException) and error.error == MONAILabelError.INVALID_INPUT:
        return HTTPException(422, str(error.msg))  # monailabel's own check of a request (no model named, say)
    if guard.is_out_of_memory(error):  # where the infer task's own message (with the estimate) did not apply
        return guard.out_of_memory("this request")
    if path.startswith("/datastore/dataset") and isinstance(error, AssertionError):
        return HTTPException(404, f"no dataset archive: {error}")
    return None


def _remove_after_sending(response, background_tasks) -> None:
    """A result file that monailabel made in the temp folder for this response (the DICOM SEG of
    output=dicom_seg, which it never removes) is removed once sent."""
    path = getattr(response, "path", None)
    if path and background_tasks is not None and Path(tempfile.gettempdir()) in Path(path).parents:
        background_tasks.add_task(_unlink, path)


def _unlink(path) -> None:
    Path(path).unlink(missing_ok=True)


def _is_upload(value) -> bool:
    return hasattr(value, "filename") and hasattr(value, "file")


def check_upload(upload, limits: guard.UploadLimits) -> None:
    size = upload.size if upload.size is not None else _stream_size(upload.file)
    guard.check_upload_size(size, upload.filename or "upload", limits)
    name = Path(upload.filename or "").name
    if name.lower().endswith(guard.HEADER_SUFFIXES):
        head = upload.file.read(64 * 1024)
        upload.file.seek(0)
        guard.check_header_bytes(head, name)


def _stream_size(f) -> int:
    position = f.tell()
    f.seek(0, 2)
    size = f.tell()
    f.seek(position)
    return size


def off_the_loop(route: APIRoute, state, gated: bool, max_body: int) -> APIRoute:
    """The same path operation as a plain function (run in FastAPI's threadpool), checked, and gated if
    inference. ``state``: the server's state, holding the admission gate. ``max_body``: bytes of request body,
    counted by FastAPI's own per-route limit as they arrive (413 before the form is spooled to disk)."""
    original = route.endpoint
    signature = inspect.signature(original)

    def endpoint(*args, **kwargs):
        app = app_instance()  # the serving app (created on the first request if need be)
        values = signature.bind_partial(*args, **kwargs).arguments
        check_request(route.path, values, app.settings)
        refuse_server_keys(route.path, route.methods, values)
        check_background_job(route.path, route.methods, values, app)
        refuse_what_cannot_work(route.path, route.methods, values)
        try:
            with state.delightsam_admission() if gated else _nothing():
                response = asyncio.run(original(*args, **kwargs))
            if route.path.startswith(("/infer/", "/datastore/dataset")):  # results made for this response only
                _remove_after_sending(response, values.get("background_tasks"))
            return response
        except HTTPException:
            raise
        except Exception as e:
            raise as_client_error(route.path, e) or e

    endpoint.__signature__ = signature
    endpoint.__name__ = original.__name__
    endpoint.__doc__ = original.__doc__
    return bounded(route, endpoint, max_body)


def bounded(route: APIRoute, endpoint, max_body: int) -> APIRoute:
    """``route`` with ``endpoint`` and FastAPI's per-route body limit: the same path, methods, parameters (so its
    RBAC dependency) and OpenAPI description."""
    return APIRoute(route.path, endpoint, methods=sorted(route.methods), name=route.name, summary=route.summary,
                    description=route.description, tags=route.tags, dependencies=route.dependencies,
                    include_in_schema=route.include_in_schema, deprecated=route.deprecated,
                    response_class=route.response_class, responses=route.responses,
                    status_code=route.status_code, operation_id=route.operation_id, max_body_size=max_body)


def _replace(router, prefix: str, state, max_body: int) -> int:
    """Replaces, in place, the blocking API routes of ``router`` and of the routers included in it (FastAPI
    keeps an included router as one entry that refers to the original router; older versions copy its routes)."""
    replaced = 0
    for index, route in enumerate(router.routes):
        included = compat.included_router(route)
        if included is not None:
            replaced += _replace(included[0], prefix + included[1], state, max_body)
            continue
        if not isinstance(route, APIRoute) or not inspect.iscoroutinefunction(route.endpoint):
            continue
        path = (prefix + route.path).removeprefix(ml_settings.MONAI_LABEL_API_STR)
        if not path.startswith(OFF_THE_LOOP):
            if path.startswith("/proxy") and compat.body_limit(route) is None:  # awaits the request: stays on the loop
                router.routes[index] = bounded(route, route.endpoint, max_body)
                replaced += 1
            continue
        gated = path.startswith("/infer/") and "POST" in route.methods
        router.routes[index] = off_the_loop(route, state, gated, max_body)  # in place: one operation per path
        replaced += 1
    if replaced:
        compat.routes_changed(router)  # FastAPI caches the routes it resolved
    return replaced


def task_names(app) -> dict[str, list[str]]:
    """Route path -> the names of this server's tasks it takes (its models, trainers, scoring methods, strategies)."""
    infers = list(compat.infer_tasks(app))
    return {"/infer/{model}": infers, "/batch/infer/{model}": infers, "/train/{model}": list(compat.trainers(app)),
            "/scoring/{method}": list(compat.scoring_methods(app)), "/activelearning/{strategy}": list(compat.strategies(app))}


@contextmanager
def _nothing():
    yield


def install(server, app_settings) -> Admission:
    """Replaces monailabel's API routes by their checked, off-the-loop copies (the routes once per server; the
    admission gate is that of the latest app instance)."""
    admission = Admission(app_settings.infer_workers, app_settings.infer_queue)
    server.state.delightsam_admission = admission
    replaced = _replace(server.router, "", server.state, int(app_settings.max_request_mb * guard.MB))
    if replaced:
        compat.openapi_changed(server)  # FastAPI rebuilds the schema from the routes
        logger.info(f"{replaced} API routes run off the event loop")
    if not getattr(server.state, "delightsam_documented", False):  # the typed options in the OpenAPI document
        compat.extend_openapi(server, lambda built: options.document(built, task_names(app_instance())))
        server.state.delightsam_documented = True
    logger.info(f"inference: {admission.workers} at once, {admission.queue} waiting")
    return admission
