"""Distillation fine-tuning (MDKD) with segmentation losses: one code path for the MONAI Label train task
and for ``delightsam train``.

Volumes with labels are cut into 2-D slices along their acquisition axis, fitted to the model's input as
inference does, and sampled with a preference for slices that hold foreground (``training_data``). Each step: the
student's forward, the teacher's embedding (from the disk cache when it has it), the losses, one optimiser step on
the trainable parameters, and the refiner's own step where the pipeline refines (``refiner_training``). After each
epoch: validation Dice per structure with the served pipeline, and, when it beats the best so far, a published
checkpoint (``versions``). Data-parallel over processes with DistributedDataParallel (torchrun; gloo on CPUs, nccl
on GPUs): every process draws the same global batch and trains on its share, and DDP averages the gradients, so N
processes with batch B step like one process with batch N*B.
"""

from __future__ import annotations

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
from torch.nn.parallel import DistributedDataParallel

from .box_atlas import update_box_atlas
from .embedding_cache import EmbeddingCache
from .files import atomic_path, write_text
from .foundation import foundation_model
from .label_maps import structure_mask
from .losses import DeLightSAMLoss, LossWeights
from .model import DeLightSAM
from .pipeline import Pipeline
from .reading import READ_ERRORS, read_error, read_volume
from .refiner_training import RefinerTrainer, RefinerTraining, own_queries
from .teachers import load_teacher
from .tracking import Tracker
from .training_data import SliceData, TrainItem, item_label, known_structures

logger = logging.getLogger(__name__)
TRAINABLE = ("controllers", "modality", "all")


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


def train(model: DeLightSAM, train_items: list[TrainItem], val_items: list[TrainItem], config: TrainConfig,
          output_dir: str | Path, publish: Callable[[DeLightSAM, dict], object] | None = None,
          log: Callable[[str], None] = logger.info, data_report: dict | None = None) -> dict:
    """Trains ``model`` in place; returns the run's statistics (also written to output_dir/train_stats.json).

    Resumes from output_dir/train_state.pt when it exists. ``publish(model, metrics)`` is called on the first
    process whenever the validation Dice beats the best so far (the starting model's included). ``data_report``
    (what the caller made of its data: volumes refused and why, segments that matched no structure) goes into
    the statistics as it is."""
    run = Trainer(model, train_items, val_items, config, Path(output_dir), log, data_report)
    run.resume()
    run.begin()
    for epoch in range(run.start_epoch, config.epochs):
        stopped = run.epoch(epoch)
        run.validate_and_publish(epoch, stopped, publish)
        if stopped:
            break
    return run.finish()


class Trainer:
    """One run of ``train``: set up here (device, trainable parameters, data, teacher, statistics); then ``resume``,
    ``begin`` (the refiner's trainer, the starting model's validation), an ``epoch`` of steps at a time, each followed
    by ``validate_and_publish``, and ``finish``."""

    def __init__(self, model: DeLightSAM, train_items: list[TrainItem], val_items: list[TrainItem],
                 config: TrainConfig, output: Path, log: Callable[[str], None], data_report: dict | None) -> None:
        if config.steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be at least 1")
        self.model, self.config, self.output, self.log = model, config, output, log
        output.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = _world()
        self.device = _device(config)
        torch.manual_seed(config.seed)
        self.train_items, self.val_items = self._served_items(train_items, val_items)
        self.modalities = sorted({i.modality for i in self.train_items})
        params = select_trainable(model, self.modalities, config.trainable)
        model.to(self.device).eval()  # BatchNorm keeps its statistics (as released); the network has no dropout
        # DDP averages the gradients across processes; other modalities' parameters may go unused in a step
        self.network = (DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                                find_unused_parameters=True) if self.world > 1 else model)
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.spill = output / f".slices-{self.rank}"  # memory-mapped training slices, removed when the run ends
        self.data = SliceData(self.train_items, model, spill_dir=self.spill)
        update_box_atlas(model, self.data.atlas)
        self.loss = DeLightSAMLoss(config.loss)
        self.teacher = (load_teacher(config.teacher, config.teacher_checkpoint, config.teacher_dir).to(self.device)
                        if config.teacher else None)
        self.cache = EmbeddingCache(config.cache_dir) if (self.teacher and config.cache_dir) else None
        self.state_file = output / "train_state.pt"
        self.data_report = data_report or {}
        self.stats = {"start_ts": int(time.time()), "total_epochs": config.epochs, "epoch": 0, "published": [],
                      "train_items": len(self.train_items), "val_items": len(self.val_items),
                      "config": json.loads(json.dumps(asdict(config))), "data": self.data_report}
        self.signature = self._signature()
        self.start_epoch = 0
        self.tracker: Tracker | None = None
        self.refiner: RefinerTrainer | None = None

    def _served_items(self, train_items: list[TrainItem], val_items: list[TrainItem]) -> tuple[list, list]:
        """The items of modalities the model serves (the others are logged and left out)."""
        served = {m.name for m in self.model.config.modalities}
        skipped = sorted({i.id for i in train_items + val_items if i.modality not in served})
        if skipped:
            self.log(f"skipping {len(skipped)} volume(s) of modalities this model does not serve: {skipped}")
        train_items = [i for i in train_items if i.modality in served]
        if not train_items:
            raise ValueError(f"no training volume of a modality this model serves ({', '.join(sorted(served))})")
        return train_items, [i for i in val_items if i.modality in served]

    def _signature(self) -> str:
        """What a run is: a saved state of another signature is not resumed. (A wall-clock budget that is not set
        leaves the signature as it was before that option existed.)"""
        config = {k: v for k, v in self.stats["config"].items()
                  if k != "epochs" and not (k == "max_wall_seconds" and v is None)}
        return json.dumps({"config": config, "modalities": self.modalities,
                           "train": sorted(i.id for i in self.train_items),
                           "labels": {i.id: [i.label, sorted((i.values or {}).items()), i.known] for i in self.train_items}},
                          sort_keys=True)

    def resume(self) -> None:
        """Resumes an unfinished run of the same kind from its saved state; anything else starts over from the given
        model."""
        if not self.state_file.exists():
            return
        state = torch.load(self.state_file, map_location="cpu", weights_only=True)
        if state.get("signature") != self.signature or int(state["epoch"]) >= self.config.epochs:
            self.log(f"not resuming {self.state_file}: that run finished or was of another kind; starting over")
            return
        self.model.load_state_dict(state["model"])
        if state.get("refiner"):
            self.model.refiner_state = state["refiner"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        self.stats.update(json.loads(state["stats"]), total_epochs=self.config.epochs, data=self.data_report,
                          train_items=len(self.train_items), val_items=len(self.val_items))
        self.log(f"resumed from {self.state_file} at epoch {self.start_epoch}")

    def begin(self) -> None:
        """The tracker, the refiner's trainer and, for a new run, the starting model's validation Dice (the mark a
        published model must beat); then the budget's clocks start."""
        self.tracker = Tracker(self.config.tracking if self.rank == 0 else "none", self.output)
        self.refiner = _refiner_trainer(self.model, self.modalities, self.config, self.device) if self.rank == 0 else None
        self.stats["pipeline"] = {**asdict(self.config.pipeline),
                                  "refiner_trained": self.refiner.modalities if self.refiner else []}
        if self.rank == 0 and self.start_epoch == 0:
            with torch.no_grad():
                self.stats["before"] = _validate(self.model, self.val_items, self.config)
            self.stats["best_metric"] = self.stats["before"]["mean_dice"]
            self.log(f"validation Dice before training: {self.stats['before']['mean_dice']:.4f} "
                     f"{self.stats['before']['dice']}")
        if self.world > 1:
            dist.barrier()  # the others wait here, not inside a collective, while the first process validates
        # a resumed run's spending counts
        self.cpu_start = time.process_time() - self.stats.get("cpu_seconds", 0.0)
        self.wall_start = time.perf_counter() - self.stats.get("wall_seconds", 0.0)
        self.stats["data"] = {**self.stats["data"], "refused": {**self.stats["data"].get("refused", {}),
                                                                **self.data.refused}}
        self.stats["phase"] = "training"
        if self.rank == 0:  # the data is loaded and the steps begin: clients (and tests) can see it
            self._write_stats()

    def epoch(self, epoch: int) -> bool:
        """One epoch of steps (fewer when the budget runs out: then True); its figures go into the statistics."""
        config, stop, losses, began = self.config, False, [], time.perf_counter()
        for step in range(config.steps_per_epoch):
            if losses and _out_of_budget(config, self.cpu_start, self.world, self.device, self.wall_start):
                stop = True
                break
            losses.append(self._step(epoch, step))
        seconds = time.perf_counter() - began
        # a step whose slices were all augmented has no distillation term
        mean_loss = {k: float(np.mean([l[k] for l in losses if k in l])) for k in dict.fromkeys(k for l in losses for k in l)}
        self.stats.update(epoch=epoch + 1, loss=mean_loss,
                          slices_per_second=len(losses) * config.batch_size * self.world / seconds,
                          cpu_seconds=time.process_time() - self.cpu_start, wall_seconds=time.perf_counter() - self.wall_start,
                          steps=self.stats.get("steps", 0) + len(losses))
        if stop:
            self.stats["stopped"] = (f"CPU budget of {config.max_cpu_seconds:.0f} s spent" if config.max_wall_seconds is None
                                     else f"budget spent (CPU {config.max_cpu_seconds} s, wall-clock {config.max_wall_seconds} s)")
        if self.cache:
            self.stats["cache"] = {"hits": self.cache.hits, "misses": self.cache.misses}
        return stop

    def _step(self, epoch: int, step: int) -> dict[str, float]:
        """One optimiser step on this process's share of the step's global batch (and the refiner's on the same
        slices, boxed as inference boxes them); returns its loss terms."""
        config, data, device = self.config, self.data, self.device
        picks = data.sample(epoch, step, config.batch_size * self.world, config.seed, config.foreground_fraction)
        seeds = data.augmented(epoch, step, config.batch_size * self.world, config.seed, config.augment)
        mine = slice(self.rank * config.batch_size, (self.rank + 1) * config.batch_size)
        inputs, grey, masks, mods, known = data.batch(picks[mine], seeds[mine])
        inputs, grey, masks, known = inputs.to(device), grey.to(device), masks.to(device), known.to(device)
        out = self.network(inputs, mods)
        target, plain = None, torch.tensor([k < 0 for k in seeds[mine]], device=device)
        if self.teacher is not None and plain.any():  # distilled on the views inference sees (cached embeddings)
            grid = self.model.config.embedding_size
            target = (self.cache.embed(self.teacher, grey[plain], grid) if self.cache
                      else self.teacher(grey[plain], grid))
        terms = self.loss(out, masks, target, known, plain)
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.optimizer.step()
        losses = {k: float(v.detach()) for k, v in terms.items()}
        if self.refiner is not None:
            losses.update(self.refiner.step(grey, masks, out.mask_logits, [data.fitted[v] for v, _ in picks[mine]],
                                            mods, known) or {})
        return losses

    def validate_and_publish(self, epoch: int, stopped: bool, publish: Callable | None) -> None:
        """On the first process: the served pipeline's validation Dice of the model as it now is (its refiner's
        adaptation included), published when it beats the best so far (or when there is nothing to validate on), and
        the state saved to resume from."""
        if self.rank == 0:
            config, stats, model = self.config, self.stats, self.model
            if self.refiner is not None:  # published with the model, and validated as the pipeline serves it
                model.refiner_state = self.refiner.state()
            with torch.no_grad():
                metrics = _validate(model, self.val_items, config)
            stats["val"] = metrics
            mean_loss = stats["loss"]
            self.tracker.log({**{f"loss/{k}": v for k, v in mean_loss.items()}, "val/mean_dice": metrics["mean_dice"],
                              **{f"val/dice/{k}": v for k, v in metrics["dice"].items()}}, epoch + 1)
            self.log(f"epoch {epoch + 1}/{config.epochs}: loss {mean_loss['total']:.4f}, "
                     f"{stats['slices_per_second']:.2f} slices/s, validation Dice {metrics['mean_dice']:.4f} {metrics['dice']}")
            if publish and not self.val_items:  # nothing to validate on yet: publish what was trained
                _publish(publish, model, {"epoch": epoch + 1, "loss": mean_loss["total"]}, stats, self.log)
            elif publish and metrics["mean_dice"] > stats["best_metric"]:
                if _publish(publish, model, {"epoch": epoch + 1, **metrics}, stats, self.log):
                    stats["best_metric"] = metrics["mean_dice"]
            # a run stopped by its budget is finished: the next request starts a new one, not a resumption
            try:
                _save_state(self.state_file, model, self.optimizer, config.epochs if stopped else epoch + 1, stats,
                            self.signature)
            except OSError as e:  # a full disk: the previous state stays (written aside); say so, go on
                stats["errors"] = [*stats.get("errors", []), f"epoch {epoch + 1}: the training state was not saved: {e}"]
            self._write_stats()
        if self.world > 1:
            dist.barrier()

    def finish(self) -> dict:
        """Closes the tracker and removes the spilled slices; returns the run's statistics."""
        self.tracker.close()
        self.stats["phase"] = "finished"
        del self.data
        shutil.rmtree(self.spill, ignore_errors=True)
        if self.rank == 0:
            self._write_stats()
        return self.stats

    def _write_stats(self) -> None:
        write_text(self.output / "train_stats.json", json.dumps(self.stats, indent=1))


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


def _refiner_trainer(model: DeLightSAM, modalities: list[str], config: TrainConfig,
                     device: torch.device) -> RefinerTrainer | None:
    """The trainer of the second stage for the trained modalities that the pipeline refines (None: none, or not
    asked for). It runs on the first process only, on its share of each batch: the adapted part is small."""
    # a modality that shares its queries (a released model's) keeps the foundation's: adapting them would change
    # another modality's masks
    refined = [m for m in modalities if config.pipeline.refines(m) and own_queries(model, m)]
    if not (config.train_refiner and refined):
        return None
    size = config.pipeline.size
    return RefinerTrainer(config.pipeline.build_refiner(model),
                          foundation_model(model, img_size=size, adapted=False).to(device),
                          refined, RefinerTraining(size=size), seed=config.seed)


# ---- validation -----------------------------------------------------------------------------------
def validate(model: DeLightSAM, items: list[TrainItem], pipeline: Pipeline | None = None) -> dict:
    """Dice per structure (mean over volumes), with the app's whole-volume inference: the ``pipeline`` it serves
    (default: the first stage alone), two stages with the model's refiner for the modalities it refines."""
    scores: dict[str, list[float]] = {}
    skipped = {}
    for item in items:
        try:
            image = read_volume(item.image)
            truth = item_label(item, image)
            result = (pipeline or Pipeline()).segment(model, image, item.modality)
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


def _validate(model: DeLightSAM, items: list[TrainItem], config: TrainConfig) -> dict:
    """``validate`` with the served pipeline (its refiner built from the model and the adaptation it now carries)."""
    if not items:
        return {"mean_dice": 0.0, "dice": {}}
    return validate(model, items, config.pipeline)


# ---- the run's machinery ------------------------------------------------------------------------------
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(config: TrainConfig) -> torch.device:
    """The configured device, else this process's GPU (under torchrun) when there is one, else the CPU."""
    device = torch.device(config.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                                            else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current GPU (set_device needs an index)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


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
                    "stats": json.dumps(stats), "signature": signature, "refiner": model.refiner_state}, tmp)
