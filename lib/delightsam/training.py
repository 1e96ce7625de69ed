"""Distillation fine-tuning (MDKD) with segmentation losses: one code path for the MONAI Label train task
and for ``delightsam train``.

Volumes with labels are cut into 2-D slices along their acquisition axis, fitted to the model's input as
inference does, and sampled with a preference for slices that hold foreground. Each step: the student's
forward, the teacher's embedding (from the disk cache when it has it), the losses, one optimiser step on the
trainable parameters. After each epoch: validation Dice per structure with the same whole-volume inference
as the app, and, when it beats the best so far, a published checkpoint. Data-parallel over processes with
DistributedDataParallel (torchrun; gloo on CPUs, nccl on GPUs): every process draws the same global batch
and trains on its share, and DDP averages the gradients, so N processes with batch B step like one process
with batch N*B.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from monai.metrics import compute_dice
from monai.transforms import MapLabelValue
from torch.nn.parallel import DistributedDataParallel

from .box_atlas import atlas_entry
from .checkpoint import save_model
from .embedding_cache import EmbeddingCache
from .files import atomic_path, write_text
from .losses import DeLightSAMLoss, LossWeights
from .model import DeLightSAM
from .normalization import get_normalization
from .pipeline import Pipeline
from .teachers import load_teacher
from .geometry import fit_to_square, fitted_size, grey_volume, model_input, orient
from .volume import READ_ERRORS, read_error, read_label, read_volume, structure_mask

logger = logging.getLogger(__name__)
TRAINABLE = ("controllers", "modality", "all")


@dataclass
class TrainItem:
    id: str
    image: str  # a volume file or a DICOM series folder
    label: str  # a label map on the image's grid
    modality: str
    # voxel value in the label file -> the modality's label id (other values are background); None: the file's
    # values are the modality's label ids
    values: dict[int, int] | None = None
    # the structures that the label speaks for (a structure a user did not send is unknown, not absent, and is
    # not trained); None: all of the modality's structures
    known: list[str] | None = None


def item_label(item: TrainItem, image) -> torch.Tensor:
    """An item's label on the image's grid, in the modality's label ids."""
    label = read_label(item.label, image).as_subclass(torch.Tensor).round().to(torch.int64).clamp_(min=0)
    return label if item.values is None else relabel(label, item.values)


def relabel(label: torch.Tensor, values: dict[int, int]) -> torch.Tensor:
    """A label map's values as label ids (int64): ``values`` maps each to its id; any other value is 0 (MONAI's
    MapLabelValue over the values present, so that no value, however large, sizes a table)."""
    present = torch.unique(label).tolist()
    mapping = MapLabelValue(orig_labels=present, target_labels=[values.get(int(v), 0) for v in present],
                            dtype=torch.int64)
    return mapping(label.as_subclass(torch.Tensor))


def known_structures(item: TrainItem, spec) -> torch.Tensor:
    """[S] whether the item's label speaks for each of the modality's structures."""
    return torch.tensor([item.known is None or s.name in item.known for s in spec.structures])


@dataclass
class TrainConfig:
    epochs: int = 5
    steps_per_epoch: int = 50
    batch_size: int = 4  # slices per step and process
    lr: float = 5e-4  # Adam, as released
    trainable: str = "modality"  # controllers | modality (controllers, queries, own heads) | all
    teacher: str | None = "lite_medsam"  # None: no distillation
    teacher_checkpoint: str | None = None
    teacher_dir: str = "models/teachers"
    cache_dir: str | None = None  # teacher-embedding cache; None: no cache
    loss: LossWeights = field(default_factory=LossWeights)
    foreground_fraction: float = 0.8  # share of sampled slices that hold some foreground
    # share of sampled slices that are augmented (scale and field of view, small rotations, intensity, noise:
    # ``augmentation``); the others are seen as inference sees them and are the ones distilled (their teacher
    # embeddings come from the cache)
    augment: float = 0.5
    seed: int = 0
    tracking: str = "tensorboard"  # tensorboard | mlflow | none
    device: str | None = None  # None: cuda (this process's GPU under torchrun) when available, else cpu
    # stop after this much CPU time of this process (all its threads, teacher included), ending the epoch
    # in progress as usual: a compute budget that other programs on the machine do not shorten
    max_cpu_seconds: float | None = None
    # stop after this much wall-clock time of the step loop (for a GPU, where CPU time says little), likewise
    max_wall_seconds: float | None = None
    pipeline: Pipeline = field(default_factory=Pipeline)
    # the refiner's queries and heads adapt too (refiner_training), for the modalities the pipeline refines
    train_refiner: bool = True

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        if isinstance(data.get("loss"), dict):
            data["loss"] = LossWeights(**data["loss"])
        if isinstance(data.get("pipeline"), dict):
            data["pipeline"] = Pipeline(**data["pipeline"])
        config = cls(**data)
        if config.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, got {config.trainable!r}")
        return config


# ---- the split ------------------------------------------------------------------------------------
def update_split(path: str | Path, ids: list[str], val_fraction: float = 0.2) -> dict[str, str]:
    """One train/validation split, kept in a file and extended as labels arrive, never reshuffled.
    A new id goes to validation when its hash falls under ``val_fraction``; the first two ids are one of
    each so that both sides exist as early as possible."""
    path = Path(path)
    split = json.loads(path.read_text()) if path.exists() else {}
    for image_id in sorted(ids):
        if image_id in split:
            continue
        if "train" not in split.values() or val_fraction <= 0:
            split[image_id] = "train"
        elif "val" not in split.values():
            split[image_id] = "val"
        else:
            h = int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            split[image_id] = "val" if h < val_fraction else "train"
    write_text(path, json.dumps(split, indent=1, sort_keys=True))
    return split


# ---- the data -------------------------------------------------------------------------------------
def oriented_label(item: TrainItem, spec):
    """A labelled volume read as inference reads it: (its ``Oriented`` geometry, the label map in the plane's
    layout, [S] whether the label speaks for each structure)."""
    image = read_volume(item.image)
    oriented = orient(image)
    return oriented, oriented.to_layout(item_label(item, image)), known_structures(item, spec)


def volume_atlas_entry(item_id: str, oriented, label: torch.Tensor, spec, known: torch.Tensor) -> dict:
    """A volume's box atlas entry (``box_atlas.atlas_entry``, with its id) from its label in the plane's layout:
    the structures its label speaks for."""
    masks = {s.name: structure_mask(label, s) for s, k in zip(spec.structures, known.tolist()) if k}
    return {"id": item_id, **atlas_entry(masks, oriented.spacing, oriented.plane)}


def atlas_entries(items: list[TrainItem], model: DeLightSAM) -> dict[str, list[dict]]:
    """Per modality, the box atlas entries of labelled volumes (what ``update_box_atlas`` takes), without cutting
    their slices for training. A volume that cannot be read is an error that names it."""
    entries: dict[str, list[dict]] = {}
    for item in items:
        spec = model.config.modality(item.modality)
        try:
            oriented, label, known = oriented_label(item, spec)
        except READ_ERRORS as e:
            raise ValueError(f"{item.id}: cannot be read: {read_error(e)}") from e
        entries.setdefault(item.modality, []).append(volume_atlas_entry(item.id, oriented, label, spec, known))
    return entries


class SliceData:
    """The training volumes as fitted grey slices and structure masks, with seeded sampling. With ``spill_dir``
    the slices live in memory-mapped files there (a datastore of hundreds of volumes trains in bounded memory;
    the pages a batch reads come back from the OS's file cache); without it, in memory."""

    def __init__(self, items: list[TrainItem], model: DeLightSAM, spill_dir: str | Path | None = None) -> None:
        self.size = model.config.img_size
        self.grey, self.fitted, self.masks, self.modality, self.foreground, self.known = [], [], [], [], [], []
        self.atlas: dict[str, list[dict]] = {}  # per modality, its volumes' box atlas entries (box_atlas)
        self.refused: dict[str, str] = {}  # volumes that could not be read, and why
        self.normalise = get_normalization(model)
        for item in items:
            try:
                grey, fitted, masks, entry, known = self._slices(item, model)
            except READ_ERRORS as e:  # an unreadable file, a label off the image's grid
                self.refused[item.id] = f"cannot be read for training: {read_error(e)}"
                logger.warning(f"not training on {item.id}: {self.refused[item.id]}")
                continue
            if spill_dir is not None:
                grey, masks = (_memory_mapped(Path(spill_dir) / f"{len(self.grey)}-{k}.npy", t)
                               for k, t in (("grey", grey), ("masks", masks)))
            self.grey.append(grey)
            self.fitted.append(fitted)
            self.masks.append(masks)
            self.modality.append(item.modality)
            self.atlas.setdefault(item.modality, []).append(entry)
            self.known.append(known)
            self.foreground.append(masks.flatten(1).any(1))
        if not self.grey:
            raise ValueError("no training volume could be read: " + "; ".join(f"{k}: {v}" for k, v in self.refused.items()))
        self.index = [(v, s) for v, g in enumerate(self.grey) for s in range(g.shape[0])]
        fg = torch.cat(self.foreground)
        self.fg_index = [i for i, f in zip(self.index, fg.tolist()) if f]
        self.bg_index = [i for i, f in zip(self.index, fg.tolist()) if not f]
        self.max_structures = max(m.shape[1] for m in self.masks)

    def _slices(self, item: TrainItem, model: DeLightSAM) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor, dict, torch.Tensor]:
        """A volume's slices as inference cuts them (``geometry``: its plane's layout, grey levels, NaN policy,
        fitting), the structure masks of its label on the same slices, its box atlas entry and which structures
        its label speaks for."""
        spec = model.config.modality(item.modality)
        oriented, label, known = oriented_label(item, spec)
        grey = grey_volume(oriented, spec)[0].movedim(2, 0)  # [Z, H, W]
        entry = volume_atlas_entry(item.id, oriented, label, spec, known)
        label = label.movedim(2, 0)
        masks = torch.stack([structure_mask(label, s) for s in spec.structures], dim=1).float()  # [Z, S, H, W]
        fitted = fitted_size(tuple(grey.shape[-2:]), self.size, oriented.spacing[:2], spec.pixel_mm)
        grey, fitted = fit_to_square(grey[:, None], self.size, fitted=fitted)
        masks, _ = fit_to_square(masks, self.size, mode="nearest", fitted=fitted)
        return grey.to(torch.float16), fitted, masks.bool(), entry, known

    def sample(self, epoch: int, step: int, n: int, seed: int, fg_fraction: float) -> list[tuple[int, int]]:
        """The same n slices on every process for a given (seed, epoch, step)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + step)
        picks = []
        for _ in range(n):
            pool = self.fg_index if (self.fg_index and (not self.bg_index or torch.rand(1, generator=g) < fg_fraction)) \
                else self.bg_index
            picks.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        return picks

    def batch(self, picks: list[tuple[int, int]], augmented: list[int] | None = None) -> \
            tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """(model input [B, 3, S, S], grey [B, 3, S, S] for the teacher, masks [B, S_max, S, S], modalities,
        known [B, S_max]: whether each mask is known), the model input made exactly as inference makes it.
        ``augmented``: per pick, a seed for ``augmentation`` or -1 for none."""
        greys, masks = [], torch.zeros(len(picks), self.max_structures, self.size, self.size)
        known = torch.zeros(len(picks), self.max_structures, dtype=torch.bool)
        for i, (v, s) in enumerate(picks):
            grey, mask = self.grey[v][s].float(), self.masks[v][s].float()
            if augmented and augmented[i] >= 0:
                grey, mask = augment_slice(grey, mask, augmented[i], self.modality[v])
                nh, nw = self.fitted[v]
                mask[:, nh:], mask[:, :, nw:] = 0, 0  # what moved into the padding is not shown to the model
            greys.append(grey)
            masks[i, : mask.shape[0]] = mask
            known[i, : self.masks[v].shape[1]] = self.known[v]
        inputs = torch.stack([model_input(g[None], self.fitted[v], self.normalise)[0] for g, (v, _) in zip(greys, picks)])
        return inputs, torch.stack(greys).expand(-1, 3, -1, -1), masks, [self.modality[v] for v, _ in picks], known

    def augmented(self, epoch: int, step: int, n: int, seed: int, share: float) -> list[int]:
        """Per pick of ``sample``'s (seed, epoch, step): an augmentation seed, or -1 (the same on every process)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + step + 7)
        return [int(torch.randint(2**31 - 1, (1,), generator=g)) if torch.rand(1, generator=g) < share else -1
                for _ in range(n)]


def _memory_mapped(path: Path, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` written to ``path`` and read back as a copy-on-write memory map (nothing stays in RAM)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tensor.numpy(), allow_pickle=False)
    return torch.from_numpy(np.load(path, mmap_mode="c"))


@functools.lru_cache(maxsize=4)
def augmentation(modality: str = "ct"):
    """MONAI dictionary transforms for a fitted slice (image [1, S, S] in 0..255, masks [S_str, S, S]): scale and
    field of view (zoom 0.65-1.35, shifts of 10%), rotations of up to 10 degrees, contrast, brightness and noise;
    what varies between scanners and patients, where one or two labelled volumes say nothing. MR adds what varies
    between MR scanners and protocols and not in CT: a smooth bias field (coil sensitivity) and blur (thicker or
    coarser acquisitions than the 1 mm training heads)."""
    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd, RandGaussianNoised,
                                  RandGaussianSmoothd, RandScaleIntensityd, RandShiftIntensityd)

    common = [
        RandAffined(keys=("image", "masks"), prob=0.9, rotate_range=(0.17,), scale_range=(0.35, 0.35),
                    translate_range=(0.1, 0.1), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=10.0, prob=0.5),
        RandGaussianNoised(keys="image", prob=0.3, std=6.0),
    ]
    mr = [RandBiasFieldd(keys="image", prob=0.5, coeff_range=(0.0, 0.3)),
          RandGaussianSmoothd(keys="image", prob=0.3, sigma_x=(0.25, 1.5), sigma_y=(0.25, 1.5))]
    return Compose(common + (mr if modality == "mr" else []))


def augment_slice(grey: torch.Tensor, masks: torch.Tensor, seed: int, modality: str = "ct") -> tuple[torch.Tensor, torch.Tensor]:
    """One fitted grey slice [1, S, S] of ``modality`` and its masks [S_str, S, S], augmented reproducibly from
    ``seed``."""
    transform = augmentation(modality)
    transform.set_random_state(seed=seed)
    size = grey.shape[-1]
    # translations are fractions of the slice: MONAI wants pixels
    transform.transforms[0].rand_affine.rand_affine_grid.translate_range = ((-0.1 * size, 0.1 * size),) * 2
    out = transform({"image": grey, "masks": masks})
    image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().clamp(0, 255)
    return image, (torch.as_tensor(out["masks"]).as_subclass(torch.Tensor) > 0.5).float()


# ---- what trains ----------------------------------------------------------------------------------
def select_trainable(model: DeLightSAM, modalities: list[str], mode: str) -> list[torch.nn.Parameter]:
    """Freezes everything, then unfreezes what ``mode`` trains for these modalities.

    controllers: their DC-Encoder controllers (the paper's domain-specific stage);
    modality: also their query groups and hypernetwork heads, for a new modality or new structures;
    all: every parameter.
    In the first two modes a modality that shares a controller or queries with others (as the released
    modalities do) first gets its own copies, so no other modality's output changes."""
    model.requires_grad_(mode == "all")
    if mode == "all":
        return [p for p in model.parameters()]
    for name in modalities:
        model.give_own_parts(name)
        spec = model.config.modality(name)
        model.encoder.controllers[spec.controller].requires_grad_(True)
        if mode == "modality":
            model.decoder.query_groups[spec.query_group].requires_grad_(True)
            model.decoder.group_heads[spec.query_group].requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ---- validation -----------------------------------------------------------------------------------
def validate(model: DeLightSAM, items: list[TrainItem], pipeline: Pipeline | None = None,
             refiner: DeLightSAM | None = None) -> dict:
    """Dice per structure (mean over volumes), with the app's whole-volume inference: the ``pipeline`` it
    serves, two stages with ``refiner`` for the modalities it refines (default: the first stage alone)."""
    scores: dict[str, list[float]] = {}
    skipped = {}
    for item in items:
        try:
            image = read_volume(item.image)
            truth = item_label(item, image)
            result = (pipeline or Pipeline()).segment(model, image, item.modality, refiner)
        except READ_ERRORS as e:
            skipped[item.id] = read_error(e)
            continue
        predicted = torch.from_numpy(result.labels.astype(np.int64))
        spec = model.config.modality(item.modality)
        for structure, known in zip(spec.structures, known_structures(item, spec).tolist()):
            if not known:
                continue
            p = structure_mask(predicted, structure)[None, None].float()
            t = structure_mask(truth, structure)[None, None].float()
            if t.sum() == 0 and p.sum() == 0:
                continue  # structure absent and not predicted: no evidence either way
            scores.setdefault(f"{item.modality}/{structure.name}", []).append(float(compute_dice(p, t, ignore_empty=False)))
    per_structure = {k: float(np.mean(v)) for k, v in sorted(scores.items())}
    return {"dice": per_structure, "mean_dice": float(np.mean(list(per_structure.values()))) if per_structure else 0.0,
            **({"skipped": skipped} if skipped else {})}


def _out_of_budget(config: TrainConfig, started: float, world: int, device: torch.device,
                   wall_started: float | None = None) -> bool:
    """Whether the CPU (or wall-clock) budget is spent; under DDP every process stops when any one has (no one
    waits alone)."""
    if config.max_cpu_seconds is None and config.max_wall_seconds is None:
        return False
    spent = ((config.max_cpu_seconds is not None and time.process_time() - started >= config.max_cpu_seconds)
             or (config.max_wall_seconds is not None and wall_started is not None
                 and time.perf_counter() - wall_started >= config.max_wall_seconds))
    if world > 1:
        flag = torch.tensor([float(spent)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        spent = bool(flag.item())
    return spent


# ---- the loop -------------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Tracker:
    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.writer = kind, None
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        elif kind == "mlflow":
            import mlflow

            mlflow.set_tracking_uri((folder / "mlruns").as_uri())
            mlflow.start_run()
            self.writer = mlflow

    def log(self, values: dict, step: int) -> None:
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        elif self.kind == "mlflow":
            self.writer.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "mlflow":
            self.writer.end_run()


def update_box_atlas(model: DeLightSAM, entries: dict[str, list[dict]]) -> None:
    """Adds the training volumes' box atlas entries to their modalities' (``box_atlas``): an entry of the same
    volume id is replaced, the others are kept (a site's labels join the ones the model shipped with)."""
    for name, new in entries.items():
        spec = model.config.modality(name)
        ids = {e["id"] for e in new}
        spec.box_atlas = [e for e in spec.box_atlas if e.get("id") not in ids] + new


def train(model: DeLightSAM, train_items: list[TrainItem], val_items: list[TrainItem], config: TrainConfig,
          output_dir: str | Path, publish: Callable[[DeLightSAM, dict], object] | None = None,
          log: Callable[[str], None] = logger.info, data_report: dict | None = None) -> dict:
    """Trains ``model`` in place; returns the run's statistics (also written to output_dir/train_stats.json).

    Resumes from output_dir/train_state.pt when it exists. ``publish(model, metrics)`` is called on the first
    process whenever the validation Dice beats the best so far (the starting model's included). ``data_report``
    (what the caller made of its data: volumes refused and why, segments that matched no structure) goes into
    the statistics as it is."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    rank, world = _world()
    device = torch.device(config.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                                            else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current GPU (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    torch.manual_seed(config.seed)
    served = {m.name for m in model.config.modalities}
    skipped = sorted({i.id for i in train_items + val_items if i.modality not in served})
    if skipped:
        log(f"skipping {len(skipped)} volume(s) of modalities this model does not serve: {skipped}")
    train_items = [i for i in train_items if i.modality in served]
    val_items = [i for i in val_items if i.modality in served]
    if not train_items:
        raise ValueError(f"no training volume of a modality this model serves ({', '.join(sorted(served))})")
    modalities = sorted({i.modality for i in train_items})
    params = select_trainable(model, modalities, config.trainable)
    model.to(device).eval()  # BatchNorm keeps its statistics (as released); the network has no dropout
    # DDP averages the gradients across processes; other modalities' parameters may go unused in a step
    network = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True) if world > 1 else model)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    spill = output / f".slices-{rank}"  # memory-mapped training slices, removed when the run ends
    data = SliceData(train_items, model, spill_dir=spill)
    update_box_atlas(model, data.atlas)
    loss_fn = DeLightSAMLoss(config.loss)
    teacher = load_teacher(config.teacher, config.teacher_checkpoint, config.teacher_dir).to(device) if config.teacher else None
    cache = EmbeddingCache(config.cache_dir) if (teacher and config.cache_dir) else None
    grid = model.config.embedding_size

    state_file = output / "train_state.pt"
    stats = {"start_ts": int(time.time()), "total_epochs": config.epochs, "epoch": 0, "published": [],
             "train_items": len(train_items), "val_items": len(val_items), "config": json.loads(json.dumps(asdict(config))),
             "data": data_report or {}}
    start_epoch = 0
    # (a wall-clock budget that is not set leaves the signature as it was before that option existed)
    signature = json.dumps({"config": {k: v for k, v in stats["config"].items()
                                       if k != "epochs" and not (k == "max_wall_seconds" and v is None)},
                            "modalities": modalities, "train": sorted(i.id for i in train_items),
                            "labels": {i.id: [i.label, sorted((i.values or {}).items()), i.known] for i in train_items}},
                           sort_keys=True)
    if state_file.exists():
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        # resume only an unfinished run of the same kind; anything else starts over from the given model
        if state.get("signature") == signature and int(state["epoch"]) < config.epochs:
            model.load_state_dict(state["model"])
            if state.get("refiner"):
                model.refiner_state = state["refiner"]
            optimizer.load_state_dict(state["optimizer"])
            start_epoch = int(state["epoch"])
            stats.update(json.loads(state["stats"]), total_epochs=config.epochs, data=data_report or {},
                         train_items=len(train_items), val_items=len(val_items))
            log(f"resumed from {state_file} at epoch {start_epoch}")
        else:
            log(f"not resuming {state_file}: that run finished or was of another kind; starting over")
    tracker = _Tracker(config.tracking if rank == 0 else "none", output)
    refiner = _refiner_trainer(model, modalities, config, device) if rank == 0 else None
    stats["pipeline"] = {**asdict(config.pipeline), "refiner_trained": refiner.modalities if refiner else []}
    if rank == 0 and start_epoch == 0:
        with torch.no_grad():
            stats["before"] = _validate(model, val_items, config)
        stats["best_metric"] = stats["before"]["mean_dice"]
        log(f"validation Dice before training: {stats['before']['mean_dice']:.4f} {stats['before']['dice']}")
    if world > 1:
        dist.barrier()  # the others wait here, not inside a collective, while the first process validates

    if config.steps_per_epoch < 1:
        raise ValueError("steps_per_epoch must be at least 1")
    cpu_start, stop = time.process_time() - stats.get("cpu_seconds", 0.0), False  # a resumed run's spending counts
    wall_start = time.perf_counter() - stats.get("wall_seconds", 0.0)
    stats["data"] = {**stats["data"], "refused": {**stats["data"].get("refused", {}), **data.refused}}
    stats["phase"] = "training"
    if rank == 0:  # the data is loaded and the steps begin: clients (and tests) can see it
        write_text(output / "train_stats.json", json.dumps(stats, indent=1))
    for epoch in range(start_epoch, config.epochs):
        began, losses = time.perf_counter(), []
        for step in range(config.steps_per_epoch):
            if losses and _out_of_budget(config, cpu_start, world, device, wall_start):
                stop = True
                break
            picks = data.sample(epoch, step, config.batch_size * world, config.seed, config.foreground_fraction)
            seeds = data.augmented(epoch, step, config.batch_size * world, config.seed, config.augment)
            mine = slice(rank * config.batch_size, (rank + 1) * config.batch_size)
            inputs, grey, masks, mods, known = data.batch(picks[mine], seeds[mine])
            inputs, grey, masks, known = inputs.to(device), grey.to(device), masks.to(device), known.to(device)
            out = network(inputs, mods)
            target, plain = None, torch.tensor([k < 0 for k in seeds[mine]], device=device)
            if teacher is not None and plain.any():  # distilled on the views inference sees (cached embeddings)
                target = cache.embed(teacher, grey[plain], grid) if cache else teacher(grey[plain], grid)
            terms = loss_fn(out, masks, target, known, plain)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            losses.append({k: float(v.detach()) for k, v in terms.items()})
            if refiner is not None:  # the second stage, on the same slices, boxed as inference boxes them
                losses[-1].update(refiner.step(grey, masks, out.mask_logits, [data.fitted[v] for v, _ in picks[mine]],
                                               mods, known) or {})
        seconds = time.perf_counter() - began
        # a step whose slices were all augmented has no distillation term
        mean_loss = {k: float(np.mean([l[k] for l in losses if k in l])) for k in dict.fromkeys(k for l in losses for k in l)}
        stats.update(epoch=epoch + 1, loss=mean_loss, slices_per_second=len(losses) * config.batch_size * world / seconds,
                     cpu_seconds=time.process_time() - cpu_start, wall_seconds=time.perf_counter() - wall_start,
                     steps=stats.get("steps", 0) + len(losses))
        if stop:
            stats["stopped"] = (f"CPU budget of {config.max_cpu_seconds:.0f} s spent" if config.max_wall_seconds is None
                                else f"budget spent (CPU {config.max_cpu_seconds} s, wall-clock {config.max_wall_seconds} s)")
        if cache:
            stats["cache"] = {"hits": cache.hits, "misses": cache.misses}
        if rank == 0:
            if refiner is not None:  # published with the model, and validated as the pipeline serves it
                model.refiner_state = refiner.state()
            with torch.no_grad():
                metrics = _validate(model, val_items, config)
            stats["val"] = metrics
            tracker.log({**{f"loss/{k}": v for k, v in mean_loss.items()}, "val/mean_dice": metrics["mean_dice"],
                         **{f"val/dice/{k}": v for k, v in metrics["dice"].items()}}, epoch + 1)
            log(f"epoch {epoch + 1}/{config.epochs}: loss {mean_loss['total']:.4f}, "
                f"{stats['slices_per_second']:.2f} slices/s, validation Dice {metrics['mean_dice']:.4f} {metrics['dice']}")
            if publish and not val_items:  # nothing to validate on yet: publish what was trained
                _publish(publish, model, {"epoch": epoch + 1, "loss": mean_loss["total"]}, stats, log)
            elif publish and metrics["mean_dice"] > stats["best_metric"]:
                if _publish(publish, model, {"epoch": epoch + 1, **metrics}, stats, log):
                    stats["best_metric"] = metrics["mean_dice"]
            # a run stopped by its budget is finished: the next request starts a new one, not a resumption
            try:
                _save_state(state_file, model, optimizer, config.epochs if stop else epoch + 1, stats, signature)
            except OSError as e:  # a full disk: the previous state stays (written aside); say so, go on
                stats["errors"] = [*stats.get("errors", []), f"epoch {epoch + 1}: the training state was not saved: {e}"]
            write_text(output / "train_stats.json", json.dumps(stats, indent=1))
        if world > 1:
            dist.barrier()
        if stop:
            break
    tracker.close()
    stats["phase"] = "finished"
    del data
    shutil.rmtree(spill, ignore_errors=True)
    if rank == 0:
        write_text(output / "train_stats.json", json.dumps(stats, indent=1))
    return stats


def _publish(publish, model, metrics: dict, stats: dict, log) -> bool:
    """Publishes, or records in the statistics why it could not (a full disk): the served model stays as it was,
    since every file is written aside and renamed only when complete."""
    try:
        stats["published"].append(str(publish(model, metrics)))
        return True
    except OSError as e:
        why = f"epoch {metrics['epoch']}: the new model was not published, the served model is unchanged: {e}"
        stats["errors"] = [*stats.get("errors", []), why]
        log(why)
        return False


def _save_state(path: Path, model, optimizer, epoch: int, stats: dict, signature: str) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "stats": json.dumps(stats), "signature": signature,
                    "refiner": getattr(model, "refiner_state", {})}, tmp)


def _refiner_trainer(model: DeLightSAM, modalities: list[str], config: TrainConfig, device: torch.device):
    """The trainer of the second stage for the trained modalities that the pipeline refines (None: none, or not
    asked for). It runs on the first process only, on its share of each batch: the adapted part is small."""
    from .foundation import foundation_model
    from .refiner_training import RefinerTrainer, RefinerTraining, own_queries

    # a modality that shares its queries (a released model's) keeps the foundation's: adapting them would change
    # another modality's masks
    refined = [m for m in modalities if config.pipeline.refines(m) and own_queries(model, m)]
    if not (config.train_refiner and refined):
        return None
    size = config.pipeline.size
    return RefinerTrainer(config.pipeline.refiner(model), foundation_model(model, img_size=size, adapted=False).to(device),
                          refined, RefinerTraining(size=size), seed=config.seed)


def _validate(model: DeLightSAM, items: list[TrainItem], config: TrainConfig) -> dict:
    """``validate`` with the served pipeline: a refiner made afresh from the model (and the adaptation it carries)
    when the pipeline refines one of the items' modalities."""
    if not items:
        return {"mean_dice": 0.0, "dice": {}}
    two = any(config.pipeline.refines(i.modality) for i in items)
    return validate(model, items, config.pipeline, config.pipeline.refiner(model) if two else None)


def publish_version(model: DeLightSAM, metrics: dict, versions_dir: str | Path, served: str | Path | None = None,
                    base: str | None = None) -> Path:
    """Writes a new version (checkpoint plus metrics JSON) and, if ``served`` is given, replaces the served
    checkpoint with it. Both writes are atomic, so inference never reads half a file; old versions stay.
    ``base``: the configured checkpoint the model descends from, kept in its metadata (a server configured with
    another checkpoint does not serve it)."""
    versions = Path(versions_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"delightsam-{stamp}-{os.urandom(2).hex()}-e{metrics.get('epoch', 0)}"  # unique within a second
    model.config = model.config.replace(version=name)
    extra = {"base": base} if base else None
    path = save_model(model, versions / f"{name}.safetensors", extra=extra)
    write_text(versions / f"{name}.json", json.dumps(metrics, indent=1))
    if served:
        save_model(model, served, extra=extra)
    return path
