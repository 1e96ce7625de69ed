"""Evaluation against reference labels: Dice and 95% Hausdorff distance per structure and volume, time per
volume, overlay montages, and one report with several methods side by side.

Every method segments whole volumes through ``first_stage.segment_with`` (the app's path: grey levels, slices
along the acquisition axis, fit to the input, overlap rule), so they differ only in the 2-D network.
A structure absent from the reference and not predicted is not scored; absent but predicted scores Dice 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from tqdm import tqdm

from .config import DeLightSAMConfig, Modality, Structure
from .first_stage import FittedSliceNetwork, segment_with
from .geometry import grey_volume, orient, spacing_of
from .label_maps import structure_mask
from .model import DeLightSAM
from .pipeline import segment_volume
from .reading import read_label, read_volume


@dataclass
class Case:
    id: str
    image: str  # a volume file or a DICOM series folder
    label: str  # a label map on the image's grid, in the model's label ids
    modality: str


class DeLightSAMMethod:
    """De-LightSAM prompt-free; with a ``refiner``, two-stage (its own coarse masks become box prompts)."""

    def __init__(self, name: str, model: DeLightSAM, batch_size: int = 4, refiner: DeLightSAM | None = None,
                 prompts: str = "3d", modalities: tuple[str, ...] | None = None, every_mm: float | None = None) -> None:
        self.name, self.model, self.batch_size, self.refiner, self.prompts = name, model, batch_size, refiner, prompts
        self.config, self.every_mm = model.config, every_mm
        self.modalities = modalities  # the modalities it is run on (None: all); the report leaves the others out

    def segment(self, image, label: np.ndarray, modality: str) -> np.ndarray:
        return segment_volume(self.model, image, modality, batch_size=self.batch_size, refiner=self.refiner,
                              prompts=self.prompts, refine_every_mm=self.every_mm).labels


class UNetMethod:
    def __init__(self, name: str, net, meta: dict, config: DeLightSAMConfig) -> None:
        self.name, self.net, self.meta, self.config = name, net, meta, config
        self.modalities = None  # every modality

    def segment(self, image, label: np.ndarray, modality: str) -> np.ndarray:
        from .baselines import UNetSliceNetwork

        spec = self.config.modality(modality)
        network = UNetSliceNetwork(self.net, self.meta["offsets"][modality], len(spec.structures), self.meta["img_size"],
                                   spec.pixel_mm)
        return segment_with(network, image, spec, batch_size=4).labels


class GuidedMethod:
    """A prompted method: its network sees the reference label map as a second channel (for boxes)."""

    def __init__(self, name: str, config: DeLightSAMConfig, factory: Callable[[Modality], FittedSliceNetwork],
                 modalities: tuple[str, ...] | None = None) -> None:
        self.name, self.config, self.factory, self.networks = name, config, factory, {}
        self.modalities = modalities

    def segment(self, image, label: np.ndarray, modality: str) -> np.ndarray:
        spec = self.config.modality(modality)
        if modality not in self.networks:
            self.networks[modality] = self.factory(spec)
        return segment_with(self.networks[modality], image, spec, batch_size=4, guide=label).labels


def score(predicted: np.ndarray, reference: np.ndarray, structures: list[Structure], spacing) -> dict:
    """Per structure: Dice, HD95 in mm (None where a mask is empty), and both voxel counts."""
    out = {}
    for s in structures:
        p = torch.from_numpy(structure_mask(predicted, s))[None, None].float()
        r = torch.from_numpy(structure_mask(reference, s))[None, None].float()
        n_p, n_r = int(p.sum()), int(r.sum())
        entry = {"reference_voxels": n_r, "predicted_voxels": n_p, "dice": None, "hd95_mm": None}
        if n_p or n_r:
            entry["dice"] = float(compute_dice(p, r, ignore_empty=False))
        if n_p and n_r:
            entry["hd95_mm"] = float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing)))
        out[s.name] = entry
    return out


# ---- overlays -------------------------------------------------------------------------------------
COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230]], dtype=np.float32) / 255


def _rgb(grey: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    rgb = np.repeat(grey[..., None] / 255.0, 3, axis=-1)
    if labels is not None:
        colour = COLOURS[labels.astype(np.int64) % len(COLOURS)]
        mask = (labels > 0)[..., None]
        rgb = np.where(mask, 0.45 * rgb + 0.55 * colour, rgb)
    return rgb


def overlay(image, reference: np.ndarray, predictions: dict[str, np.ndarray], spec: Modality, path: Path,
            columns: int = 5) -> Path:
    """A PNG montage: a row for the image, one for the reference, one per method; a column per slice
    (evenly spread over the slices that hold reference foreground). The slices are those the model sees
    (``geometry.orient``), which are laid out as a radiologist reads them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oriented = orient(image)
    grey = grey_volume(oriented, spec)[0].numpy()
    reference = oriented.to_layout(reference).numpy()
    fg = np.nonzero(reference.reshape(-1, reference.shape[2]).any(0))[0]
    pool = fg if len(fg) else np.arange(reference.shape[2])
    picks = np.unique(pool[np.linspace(0, len(pool) - 1, min(columns, len(pool))).round().astype(int)])
    rows = [("image", None), ("reference", reference),
            *((name, oriented.to_layout(labels).numpy()) for name, labels in predictions.items())]
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(2.4 * len(picks), 2.4 * len(rows)), squeeze=False)
    aspect = oriented.spacing[0] / oriented.spacing[1]  # mm per row over mm per column
    for r, (title, labels) in enumerate(rows):
        for c, z in enumerate(picks):
            ax = axes[r, c]
            ax.imshow(_rgb(grey[..., z], None if labels is None else labels[..., z]), aspect=aspect)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title if len(title) < 28 else title[:26] + "…", fontsize=7)
            if r == 0:
                ax.set_title(f"{oriented.plane} slice {z}", fontsize=7)
    legend = ", ".join(f"{s.label}={s.name}" for s in spec.structures)
    fig.suptitle(f"{path.stem}  (labels: {legend})", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---- the report -----------------------------------------------------------------------------------
def evaluate(methods: list, sets: dict[str, list[Case]], output: str | Path, context: dict | None = None,
             progress: bool = True) -> dict:
    """Runs every method on every case of every set; writes report.json, report.md and figures/ under
    ``output``; returns the results."""
    output = Path(output)
    (output / "figures").mkdir(parents=True, exist_ok=True)
    config = methods[0].config
    results = {"sets": {}, "methods": [m.name for m in methods], "context": context or {}}
    total = sum(len(cases) for cases in sets.values()) * len(methods)
    bar = tqdm(total=total, desc="evaluating", unit="run", disable=not progress)
    for set_name, cases in sets.items():
        entries = []
        for case in cases:
            image = read_volume(case.image)
            reference = np.asarray(read_label(case.label, image).as_subclass(torch.Tensor).round().to(torch.int64))
            spec = config.modality(case.modality)
            entry = {"case": case.id, "modality": case.modality, "shape": list(image.shape),
                     "spacing_mm": [round(s, 4) for s in spacing_of(image)], "methods": {}}
            predictions = {}
            for method in methods:
                if method.modalities is not None and case.modality not in method.modalities:
                    bar.update()
                    continue
                bar.set_postfix_str(f"{case.id}: {method.name[:30]}")
                began = time.perf_counter()
                labels = method.segment(image, reference, case.modality)
                seconds = time.perf_counter() - began
                predictions[method.name] = labels
                entry["methods"][method.name] = {"seconds": seconds, "structures": score(labels, reference,
                                                                                         spec.structures, spacing_of(image))}
                bar.update()
            figure = overlay(image, reference, predictions, spec, output / "figures" / f"{_slug(set_name)}_{case.id}.png")
            entry["figure"] = str(figure.relative_to(output))
            entries.append(entry)
        results["sets"][set_name] = entries
    bar.close()
    (output / "report.json").write_text(json.dumps(results, indent=1))
    (output / "report.md").write_text(markdown(results, config))
    return results


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def summary(entries: list[dict], method: str) -> dict[str, dict]:
    """Per structure over a set's volumes: mean Dice and mean HD95 (over the volumes where defined)."""
    per: dict[str, dict[str, list]] = {}
    for e in entries:
        for name, s in e["methods"][method]["structures"].items():
            d = per.setdefault(name, {"dice": [], "hd95_mm": []})
            for k in ("dice", "hd95_mm"):
                if s[k] is not None:
                    d[k].append(s[k])
    return {n: {k: (float(np.mean(v)) if v else None) for k, v in d.items()} for n, d in per.items()}


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict, config: DeLightSAMConfig) -> str:
    lines = ["# Evaluation report", "",
             "Dice (higher is better) and, in brackets, the 95% Hausdorff distance in mm (lower is better), per "
             "structure as the mean over the set's volumes; – where the structure is absent from the reference and "
             "not predicted (Dice) or a mask is empty (HD95). Every method runs the same volume path as the app "
             "(`delightsam.first_stage.segment_with`).", ""]
    if results["context"].get("recipe"):
        lines += [f"Made by `{results['context']['recipe']}`.", ""]
    for set_name, entries in results["sets"].items():
        modalities = sorted({e["modality"] for e in entries})
        lines += [f"## {set_name}", ""]
        for modality in modalities:
            chosen = [e for e in entries if e["modality"] == modality]
            names = [s.name for s in config.modality(modality).structures]
            lines += [f"### {modality}: {', '.join(e['case'] for e in chosen)}", "",
                      "| method | " + " | ".join(names) + " | mean Dice | s / volume |",
                      "|---|" + "---|" * (len(names) + 2)]
            run = [m for m in results["methods"] if all(m in e["methods"] for e in chosen)]
            for method in run:
                s = summary(chosen, method)
                dice = [s[n]["dice"] for n in names if s[n]["dice"] is not None]
                seconds = np.mean([e["methods"][method]["seconds"] for e in chosen])
                cells = [f"{_fmt(s[n]['dice'])} ({_fmt(s[n]['hd95_mm'], 1)})" for n in names]
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(np.mean(dice) if dice else None)} | {seconds:.1f} |")
            lines += [""] + _verdicts(chosen, run, names) + [""]
        lines += ["Per volume:", ""]
        for e in entries:
            lines += [f"- **{e['case']}** ({e['modality']}, {'x'.join(map(str, e['shape']))} voxels, spacing "
                      f"{e['spacing_mm']} mm): ![{e['case']}]({e['figure']})"]
            for method, m in e["methods"].items():
                parts = [f"{n} {_fmt(v['dice'])}" + (f" (reference empty, {v['predicted_voxels']} voxels predicted)"
                                                     if v["reference_voxels"] == 0 and v["predicted_voxels"] else "")
                         for n, v in m["structures"].items()]
                lines.append(f"  - {method}: {'; '.join(parts)}; {m['seconds']:.1f} s")
        lines.append("")
    return "\n".join(lines) + "\n"


def _verdicts(entries: list[dict], methods: list[str], names: list[str]) -> list[str]:
    """Plain sentences: where the first method (the model under test) loses to another, per structure."""
    first, others = methods[0], methods[1:]
    mine = summary(entries, first)
    out = []
    for other in others:
        theirs = summary(entries, other)
        lost = [n for n in names if mine[n]["dice"] is not None and theirs[n]["dice"] is not None
                and theirs[n]["dice"] > mine[n]["dice"]]
        if lost:
            out.append(f"- {first} **loses** to {other} on: " + ", ".join(
                f"{n} ({mine[n]['dice']:.3f} vs {theirs[n]['dice']:.3f})" for n in lost) + ".")
        else:
            out.append(f"- {first} is at least as good as {other} on every scored structure.")
    return out
