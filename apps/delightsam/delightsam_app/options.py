"""Every option a request can carry, typed, and parsed where it is used: after monailabel has merged the
request's `params` (and its task's config) into it, never before.

monailabel builds each request from several places (the route's own fields, `params`, the task's config,
a session) and merges them into one dict that reaches the app's code. Here that dict is parsed once into a
pydantic model: an option this app does not know, or a value of the wrong type or out of range, is a 422 whose
message names the option. A list is read as monailabel's clients send a choice (its first entry is the value).
Options whose valid values depend on the server (the largest batch, the model files, the devices) are checked
against it (``context``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

import torch
from fastapi import HTTPException
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from delightsam.scope import CONTRASTS
from delightsam.teachers import TEACHERS
from delightsam.training import TRAINABLE

from .guard import NAME

LOG_LEVELS = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def _name(value: str) -> str:
    if not NAME.fullmatch(value) or ".." in value:
        raise ValueError("use 1 to 64 letters, digits, '.', '_' or '-' (starting with a letter or digit; no path)")
    return value


Name = Annotated[str, AfterValidator(_name)]  # a run's name, a label tag: one path component at most
ClientId = Field(None, max_length=256, description="the client's name for itself (3D Slicer and OHIF send one)")


class Options(BaseModel):
    """Unknown options are refused, and a list given for a single value is monailabel's choice: its first entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    LISTS: ClassVar[frozenset[str]] = frozenset()  # options that are lists in their own right
    TASK: ClassVar[str | None] = None  # the field that names the task (model, method) in monailabel's requests

    @model_validator(mode="before")
    @classmethod
    def _choices_as_values(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if cls.TASK and isinstance(data.get(data.get(cls.TASK)), dict):
            # monailabel's POST /train/ (and /scoring/) merges each task's own dict into its request, then the
            # whole `params` again: the request also holds that dict under the task's name, which is no option
            data = {k: v for k, v in data.items() if k != data[cls.TASK]}
        return {k: (v[0] if isinstance(v, list) and v and k not in cls.LISTS else v) for k, v in data.items()}

    @field_validator("logging", mode="before", check_fields=False)
    @classmethod
    def _level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


def parse(kind: type[Options], values: dict, what: str, context: dict | None = None):
    """``values`` as a ``kind``, or a 422 that names each option that is unknown or wrong. ``what``: whose options
    they are, for the message."""
    if not isinstance(values, dict):
        raise HTTPException(422, f"the options of {what} must be a JSON object, got {type(values).__name__}")
    try:
        return kind.model_validate(values, context=context or {})
    except ValidationError as e:
        raise HTTPException(422, f"invalid options for {what}: {describe(e, kind)}") from e


def describe(error: ValidationError, kind: type[Options]) -> str:
    """pydantic's errors as one line per option: its name, what is wrong and the value sent."""
    lines = []
    for problem in error.errors(include_url=False):
        option = ".".join(str(p) for p in problem["loc"]) or "(the options)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"unknown option {option!r} (known: {', '.join(sorted(public_fields(kind)))})")
        else:
            sent = repr(problem.get("input"))[:60]
            lines.append(f"option {option!r}: {problem['msg'].removeprefix('Value error, ')} (got {sent})")
    return "; ".join(lines)


def public_fields(kind: type[Options]) -> list[str]:
    return [name for name, f in kind.model_fields.items() if not (f.json_schema_extra or {}).get("internal")]


def refuse_internal(kind: type[Options], sent: dict, what: str) -> None:
    """A request's own JSON (its `params`, an image's `info`) may not set what monailabel's route or the app sets
    (the image, the model, a session, where a label is saved): a 422 that names the key."""
    if not isinstance(sent, dict):
        raise HTTPException(422, f"{what} must be a JSON object, got {type(sent).__name__}")
    taken = sorted(set(sent) & (set(kind.model_fields) - set(public_fields(kind))))
    if taken:
        raise HTTPException(422, f"{what} cannot set {', '.join(map(repr, taken))}: the server sets "
                                 f"{'it' if len(taken) == 1 else 'them'} (name the image with the request's own "
                                 f"field, or upload it)")


def internal(default: Any = None, **kwargs) -> Any:
    """A field that monailabel's route or the app itself sets, never a client's params (the edge refuses it there)."""
    return Field(default, json_schema_extra={"internal": True}, **kwargs)


# ---- inference -------------------------------------------------------------------------------------------
class InferOptions(Options):
    """A request to one of the app's inference models, as 3D Slicer, OHIF and monailabel's client send it."""

    model: str = internal(...)  # the route's model name
    image: str = internal("")  # the route's image id, or the path monailabel gave an upload or a session
    session: dict | None = internal()  # monailabel's record of the session named by session_id
    client_id: str | None = ClientId
    result_extension: Literal[".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".dcm"] | None = Field(
        None, description="the label file's format (.dcm: a DICOM SEG of a DICOM series); default: the input's")
    result_dtype: Literal["uint8", "uint16", "int16", "int32", "float32"] | None = None
    result_compress: bool = False
    restore_label_idx: bool = False  # OHIF's; the labels are the model's ids either way
    logging: LOG_LEVELS = "INFO"
    refine: bool | None = Field(None, description="two stages: the model's masks as box prompts for the foundation "
                                                  "(default: the server's --conf refine for the modality)")
    prompts: Literal["slice", "3d"] | None = Field(None, description="the second stage's boxes: per slice or 3-D")
    cleanup: bool | None = Field(None, description="largest connected component and hole filling per structure")
    batch_size: int | None = Field(None, description="slices per forward pass, 1 to the server's max_batch_size")
    model_filename: str | None = Field(None, max_length=255, description="another version of the served model")
    device: str | None = Field(None, max_length=16, description="cpu, cuda or cuda:N (the server's --conf device)")
    modality: str | None = Field(None, max_length=32, description="the image's modality, if the client says it")
    contrast: Literal[("auto", *CONTRASTS)] | None = Field(  # type: ignore[misc]
        None, description="an MR's contrast, if the client says it (auto: its DICOM series description's): a result "
                          "of one the model was not measured on says so")
    label_info: Segments | None = Field(None, description="with output=dicom_seg on a PACS: monailabel's description "
                                                          "of each segment, paired with the label's values in order")
    LISTS: ClassVar[frozenset[str]] = frozenset({"label_info"})

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int | None, info: ValidationInfo) -> int | None:
        largest = (info.context or {}).get("max_batch_size", 32)
        if value is not None and not 1 <= value <= largest:
            raise ValueError(f"must be a whole number from 1 to {largest} (--conf max_batch_size)")
        return value

    @field_validator("model_filename")
    @classmethod
    def _model_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return served_choice(value, info, "model_files", "no checkpoint of that name; available")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        return check_device(value)


class LoopInferOptions(InferOptions):
    """What the app's own batch inference and uncertainty scoring add to an inference request."""

    save_label: bool = internal(False)  # save the result in the datastore (under label_tag)
    label_tag: Name = internal("original")
    loop_source: Literal["infer", "batch", "scoring"] = internal("infer")
    output: Literal["json", "image", "all"] | None = internal()

    @field_validator("label_tag")
    @classmethod
    def _not_final(cls, value: str) -> str:
        if value == "final":
            raise ValueError("the model's labels are saved as `original` (or another tag), never `final`")
        return value


def served_choice(value: str | None, info: ValidationInfo, key: str, problem: str) -> str | None:
    """``value`` if the server's ``key`` (the parse's context) lists it, or if the context has no such list."""
    allowed = (info.context or {}).get(key)
    if value is not None and allowed is not None and value not in allowed:
        raise ValueError(f"{problem} {', '.join(allowed) or 'none'}")
    return value


def check_device(value: str | None) -> str | None:
    """cpu, cuda or cuda:N, and a CUDA device only where there is one (monailabel would silently use the CPU)."""
    if value is None:
        return value
    if not re.fullmatch(r"cpu|cuda(:\d{1,2})?", value):
        raise ValueError("must be cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        index = int(value.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ValueError(f"this server has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} "
                             f"CUDA device(s)")
    return value


def public_schema(kind: type[Options], ref: str = "#/components/schemas/{model}") -> tuple[dict, dict]:
    """(the JSON schema of what a client may send as ``kind``, the schemas it refers to): the server-set fields
    left out."""
    schema = kind.model_json_schema(ref_template=ref)
    definitions = schema.pop("$defs", {})
    internal_fields = set(kind.model_fields) - set(public_fields(kind))
    for name in internal_fields:
        schema["properties"].pop(name, None)
    schema["required"] = [r for r in schema.get("required", []) if r not in internal_fields]
    return schema, definitions


def client_infer_schema() -> dict:
    """The JSON schema of what a client may put in an inference request's `params`."""
    return public_schema(InferOptions, "#/$defs/{model}")[0]


# ---- training --------------------------------------------------------------------------------------------
class JobOptions(Options):
    """A job that monailabel runs in a process of its own; it adds `gpus` to every such request."""

    gpus: str = Field("all", pattern=r"^(all|\d{1,2}(,\d{1,2})*)$",
                      description="the GPUs the job's process sees (monailabel's; CUDA_VISIBLE_DEVICES)")


class TrainOptions(JobOptions):
    """The train task's options; their defaults are the task's config in /info (choices first)."""

    model: str = internal("delightsam")  # the route's trainer name
    local_rank: int = internal(0, ge=0)  # what monailabel's train process adds (its distributed rank)
    client_id: str | None = ClientId
    name: Name = Field("train_01", description="the run's folder (resumed if it exists)")
    max_epochs: int = Field(5, ge=1, le=10000)
    steps_per_epoch: int = Field(25, ge=1, le=100000)
    train_batch_size: int = Field(4, ge=1, le=256)
    lr: float = Field(5e-4, gt=0, le=1)
    trainable: Literal[TRAINABLE] = "modality"  # type: ignore[valid-type]
    teacher: Literal[("lite_medsam", "none", *[t for t in TEACHERS if t != "lite_medsam"])] = "lite_medsam"  # type: ignore[misc]
    val_split: float = Field(0.2, ge=0, lt=1)
    train_refiner: bool = Field(True, description="the second stage's queries and heads adapt too, for the "
                                                  "modalities served in two stages")
    embedding_cache: bool = True
    resume: bool = True
    tracking: Literal["tensorboard", "mlflow", "none"] = "tensorboard"
    seed: int = Field(0, ge=0, le=2**31 - 1, description="the run's random seed: its batches, augmentation and the "
                                                        "refiner's boxes (the same seed and labels, the same run)")
    TASK: ClassVar[str] = "model"

    @classmethod
    def config(cls) -> dict:
        """/info's config: each option's default, and a choice's values with the default first."""
        config = {}
        for name in public_fields(cls):
            field = cls.model_fields[name]
            if name in ("client_id", "gpus"):
                continue
            choices = getattr(field.annotation, "__args__", None)
            if choices and all(isinstance(c, str) for c in choices):
                config[name] = [field.default, *(c for c in choices if c != field.default)]
            else:
                config[name] = field.default
        return config


# ---- batch inference, scoring, Next Sample --------------------------------------------------------------
class BatchOptions(JobOptions):
    """POST /batch/infer/<model>: the images (its `images` field) and these options."""

    model: str = internal(...)
    images: Literal["all", "labeled", "unlabeled"] = internal("all")
    client_id: str | None = ClientId
    label_tag: Name = Field("original", description="the tag the labels are saved under")
    labels: list[str] | None = Field(None, description="with images labeled/unlabeled: the label tags counted")
    max_batch_size: int = Field(0, ge=0, description="at most this many images (0: all)")
    modality: str | None = Field(None, max_length=32, description="the modality of images that record none")
    save_label: Literal[True] = True
    logging: LOG_LEVELS = "INFO"
    # monailabel's defaults for its GPU batch: accepted as it sends them; this batch runs on the server's device,
    # one image after another
    device: str | None = Field(None, max_length=16)
    multi_gpu: bool = False
    max_workers: int = Field(1, ge=1, le=64)
    LISTS: ClassVar[frozenset[str]] = frozenset({"labels"})

    @field_validator("label_tag")
    @classmethod
    def _not_final(cls, value: str) -> str:
        return LoopInferOptions._not_final(value)


class ScoringOptions(JobOptions):
    method: str = internal(...)
    client_id: str | None = ClientId
    TASK: ClassVar[str] = "method"


class NextSampleOptions(Options):
    strategy: str = internal(...)
    client_id: str | None = ClientId
    label_tag: Name | None = None
    labels: list[str] | None = None
    LISTS: ClassVar[frozenset[str]] = frozenset({"labels"})


# ---- what a saved label and an image's info may say --------------------------------------------------------
class Segment(BaseModel):
    """One entry of label_info: Slicer's {name, idx} (idx: the voxel value, 1..255 in a uint8 label map), or
    monailabel's description of a DICOM SEG segment {name, description, color, model_name, segmentAttribute},
    which monailabel pairs with the label's values in ascending order (no idx)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=128)
    idx: int | None = Field(None, ge=1, le=255)
    color: list[float] | None = Field(None, min_length=3, max_length=4)
    description: str | None = Field(None, max_length=1024)
    model_name: str | None = Field(None, max_length=128)
    segmentAttribute: dict | None = None  # dcmqi's segment attributes, as monailabel's SEG writer takes them


def one_name_per_value(segments: list[Segment] | None) -> list[Segment] | None:
    seen: dict[int, str] = {}
    for segment in segments or []:
        if segment.idx is not None and seen.setdefault(segment.idx, segment.name) != segment.name:
            raise ValueError(f"value {segment.idx} is named twice ({seen[segment.idx]!r} and {segment.name!r})")
    return segments


Segments = Annotated[list[Segment], AfterValidator(one_name_per_value)]


class SavedLabelInfo(Options):
    """The `params` of PUT /datastore/label (Slicer sends label_info and client_id), or what the app records
    with a label the model made (its model and result)."""

    label_info: Segments | None = None
    client_id: str | None = ClientId
    user: str | None = Field(None, max_length=256)
    model: str | None = internal(max_length=64)  # a label the model made: which model...
    params: dict | None = internal()  # ...and its result
    LISTS: ClassVar[frozenset[str]] = frozenset({"label_info"})


class StrategyVisit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    ts: float = Field(ge=0)
    client_id: str | None = Field(None, max_length=256)


class ImageInfoUpdate(Options):
    """PUT /datastore/image/info's `info` (a user may set the modality), and what the app itself records."""

    modality: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]{0,31}$", description="a modality the model serves")
    client_id: str | None = ClientId
    user: str | None = Field(None, max_length=256)  # monailabel adds the user
    strategy: dict[str, StrategyVisit] | None = internal()  # monailabel's Next Sample: who was handed the image

    @field_validator("modality", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("modality")
    @classmethod
    def _served(cls, value: str | None, info: ValidationInfo) -> str | None:
        return served_choice(value, info, "modalities", "this server's model segments")


class LabelInfoUpdate(Options):
    """PUT /datastore/label/info: notes on a saved label; its segments change only by saving it again (they are
    checked against its voxels)."""

    client_id: str | None = ClientId
    user: str | None = Field(None, max_length=256)
    comment: str | None = Field(None, max_length=4096)


# ---- the options in the server's OpenAPI document ------------------------------------------------------------
# (path, method, form field or None for a JSON body) -> the options it carries
DOCUMENTED = {("/infer/{model}", "post", "params"): InferOptions,
              ("/train/{model}", "post", None): TrainOptions,
              ("/batch/infer/{model}", "post", None): BatchOptions,
              ("/scoring/{method}", "post", None): ScoringOptions,
              ("/activelearning/{strategy}", "post", None): NextSampleOptions,
              ("/datastore/label", "put", "params"): SavedLabelInfo,
              ("/datastore/image", "put", "params"): ImageInfoUpdate,
              ("/datastore/image/info", "put", "info"): ImageInfoUpdate}


def document(openapi: dict, tasks: dict[str, list[str]]) -> dict:
    """monailabel declares these options as an opaque JSON string (a form field) or any object (a body), and its
    task names as any string: its OpenAPI document gets the options' typed schemas (a form field declared as a
    JSON part) and the names of this server's tasks (``tasks``: path -> names), so that clients, and the fuzz
    test, know what each request can carry."""
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for path, names in tasks.items():
        for operation in openapi.get("paths", {}).get(path, {}).values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path":
                    parameter["schema"] = {"type": "string", "enum": list(names)}
    for (path, method, field), kind in DOCUMENTED.items():
        operation = openapi.get("paths", {}).get(path, {}).get(method)
        if operation is None or "requestBody" not in operation:
            continue
        schema, definitions = public_schema(kind)
        components.update(definitions)
        components[kind.__name__] = schema
        reference = {"$ref": f"#/components/schemas/{kind.__name__}"}
        content = operation["requestBody"]["content"]
        if field is None:
            content["application/json"] = {"schema": {"anyOf": [reference, {"type": "null"}]}}
            continue
        media, body = next(iter(content.items()))
        form = components[body["schema"]["$ref"].rsplit("/", 1)[-1]]
        summary = kind.__doc__.strip().split("\n")[0]
        if media == "multipart/form-data":  # a part that holds JSON
            form["properties"][field] = {**reference, "description": summary}
            body.setdefault("encoding", {})[field] = {"contentType": "application/json"}
        else:  # a url-encoded field can only hold the JSON text
            form["properties"][field]["description"] = f"{summary} As JSON: schema {kind.__name__}."
    return openapi
