"""The app's --conf keys, their defaults, and where the checkpoint comes from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monailabel.utils.others.generic import strtobool

from delightsam.headers import MB, Limits
from delightsam.pipeline import Pipeline
from delightsam.precision import resolve

REPO = Path(__file__).resolve().parents[3]
DEFAULT_MODEL = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"  # the starter bundle


@dataclass
class AppSettings:
    checkpoint: Path | None  # the checkpoint served by default; None when none was found
    # the modality of training images that neither the datastore's image info nor a DICOM tag names; None
    # (the default): such images are refused, never trained as a guessed modality
    modality: str | None
    device: str
    img_size: int | None  # None: the checkpoint's own input size
    batch_size: int  # slices per forward pass
    threads: int  # torch intra-op threads; 0 keeps torch's default
    cleanup: bool  # largest connected component and hole filling per structure
    # the served pipeline (``delightsam.pipeline.Pipeline``), one description for the infer tasks and the train task's
    # validation. --conf refine: the modalities segmented in two stages by default (a request's `refine` overrides):
    # true (all), false (none) or names (the default: "ct", the CT organs; far more accurate there, slower, and wrong
    # for brain tissue: the model card). --conf prompts: the second stage's automatic prompts, "slice" (each slice's
    # own box; the default: a whole scan's stray first-stage voxels do not widen every slice's box) or "3d". --conf
    # refine_size: the foundation's input for a whole slice (its own is 256; 96 keeps the held-out liver and spleen
    # within 0.013 and 0.001 of 256 at a fraction of the time). --conf refine_every_mm: the refiner decodes one slice
    # about every this many mm, those between interpolated (0: every slice). --conf first_every_mm: in two stages the
    # first stage likewise (it only places the boxes, so its cost follows the anatomy's extent, not the number of
    # slices: the model card measures the held-out CT and 100 against 600 slices). --conf precision: the networks'
    # matrix products, "auto" (bfloat16 on a CPU that computes it natively, else float32), "float32" or "bfloat16"
    pipeline: Pipeline
    model_dir: Path  # published models, their versions, training runs, the split, the embedding cache
    # the trust boundary (see guard.py): a request names datastore images, never server paths, unless allowed
    allow_server_paths: bool = False
    max_upload_mb: float = 2048.0  # one uploaded file (an image, a label, an archive)
    max_request_mb: float = 4096.0  # a request's whole body, counted as it arrives (before it is spooled)
    max_unpacked_mb: float = 4096.0  # everything an uploaded archive unpacks to
    max_unpack_ratio: float = 200.0  # unpacked bytes per archive byte (a zip bomb has thousands)
    max_batch_size: int = 32  # slices per forward pass a request may ask for
    infer_workers: int = 1  # inferences that run at once (each uses `threads` cores)
    infer_queue: int = 8  # inferences that may wait for a worker; beyond that: 503 with Retry-After
    handout_minutes: float = 30.0  # Next Sample (uncertain) skips images handed to another user this recently
    # volumes that lie (``delightsam.headers``): a volume is refused by its header beyond these (a 512 x 512 x 2,000
    # whole-body CT passes), and inferences hold their memory estimate within a budget shared by the app's processes
    max_megavoxels: float = 600.0  # voxels of one volume, in millions
    max_volume_mb: float = 4096.0  # bytes of one volume's voxels as its header declares them
    memory_budget_mb: float = 8192.0  # inference memory held at once (``gate.MemoryBudget``); beyond it, a wait

    @property
    def limits(self) -> Limits:
        return Limits(int(self.max_megavoxels * 1e6), int(self.max_volume_mb * MB))

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str | Path) -> "AppSettings":
        checkpoint = conf.get("checkpoint")
        path = resolve_checkpoint(checkpoint, Path(app_dir))
        return cls(
            checkpoint=path,
            modality=conf["modality"].lower() if conf.get("modality") else None,
            device=conf.get("device", "cpu"),
            img_size=int(conf["img_size"]) if conf.get("img_size") else None,
            batch_size=int(conf.get("batch_size", 4)),
            threads=int(conf.get("threads", 0)),
            cleanup=strtobool(conf.get("cleanup", "false")),
            pipeline=_pipeline(conf),
            model_dir=Path(conf.get("model_dir") or Path(app_dir) / "model").expanduser().resolve(),
            allow_server_paths=strtobool(conf.get("allow_server_paths", "false")),
            max_upload_mb=float(conf.get("max_upload_mb", 2048)),
            max_request_mb=float(conf.get("max_request_mb", 4096)),
            max_unpacked_mb=float(conf.get("max_unpacked_mb", 4096)),
            max_unpack_ratio=float(conf.get("max_unpack_ratio", 200)),
            max_batch_size=int(conf.get("max_batch_size", 32)),
            infer_workers=max(int(conf.get("infer_workers", 1)), 1),
            infer_queue=max(int(conf.get("infer_queue", 8)), 0),
            handout_minutes=float(conf.get("handout_minutes", 30)),
            max_megavoxels=_positive(conf, "max_megavoxels", 600),
            max_volume_mb=_positive(conf, "max_volume_mb", 4096),
            memory_budget_mb=_positive(conf, "memory_budget_mb", 8192),
        )


def _pipeline(conf: dict[str, str]) -> Pipeline:
    """--conf refine (default: CT), refine_size, prompts, refine_every_mm, first_every_mm, precision; the rest as
    ``Pipeline``'s defaults (what the model card measured)."""
    default = Pipeline()
    precision = str(conf.get("precision", default.precision)).lower()
    resolve(precision)  # a misspelt precision stops the server at start, naming the choices
    return Pipeline(sorted(_refined_modalities(conf.get("refine", "ct"))), _refine_size(conf.get("refine_size", default.size)),
                    conf.get("prompts", default.prompts), max(float(conf.get("refine_every_mm", default.refine_every_mm)), 0.0),
                    max(float(conf.get("first_every_mm", default.first_every_mm)), 0.0), precision)


def _positive(conf: dict[str, str], key: str, default: float) -> float:
    value = float(conf.get(key, default))
    if not 0 < value < float("inf"):
        raise ValueError(f"--conf {key} must be a positive, finite number, got {conf.get(key)!r}")
    return value


def _refined_modalities(value: str) -> frozenset[str]:
    """``--conf refine``: true/false for every modality or none, or modality names separated by commas."""
    words = [w.strip().lower() for w in str(value).split(",") if w.strip()]
    if words in (["true"], ["all"]):
        return frozenset({"*"})
    if words in ([], ["false"], ["none"]):
        return frozenset()
    return frozenset(words)


def _refine_size(value: str) -> int:
    size = int(value)
    if size < 64 or size > 1024 or size % 32:
        raise ValueError(f"refine_size must be a multiple of 32 from 64 to 1024, got {value}")
    return size


def resolve_checkpoint(value: str | None, app_dir: Path) -> Path | None:
    """An explicit path (absolute, or relative to the repository or the app), else the starter model, else
    the first ``*.safetensors`` under the repository's models/ folder."""
    if value:
        path = Path(value).expanduser()
        for candidate in (path, REPO / path, app_dir / path):
            if candidate.exists():
                return candidate.resolve()
        return path  # reported as missing by the infer task
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    found = sorted((REPO / "models").rglob("*.safetensors"))
    return found[0].resolve() if found else None
