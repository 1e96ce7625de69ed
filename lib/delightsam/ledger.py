"""The annotation loop's record: what each model version said of each image, how unsure it was, and how far
that was from the label a user then saved. ``delightsam report`` reads it.

Kept in a folder (the app's ``<model_dir>/loop``), one small file per fact, each written atomically, so that the
server, its scoring and batch subprocesses and a report never see half a file and never overwrite each other:

  predictions/<image>/<version>.nii.gz   the label map the version made (on the image's grid)
  predictions/<image>/<version>.json     its modality, structures, uncertainty, time and source
  agreement/<image>.json                 every stored version's label against the user's final label
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from .config import Structure
from .files import write_bytes, write_text


def safe_name(text: str) -> str:
    """A version or image id as a file name, one to one: where the id is not a plain name as it is, a hash of
    it is added, so that "a b" and "a_b" never share a file, and "." or ".." never names a folder."""
    text = str(text)
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100]
    if clean == text and text.strip(".") and not text.startswith("."):
        return text
    return f"{clean.lstrip('.')}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


class Ledger:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._summary: tuple | None = None

    # ---- predictions -----------------------------------------------------------------------------
    def record_prediction(self, image_id: str, version: str, modality: str, structures: list[Structure],
                          labels: np.ndarray, affine: np.ndarray, doubt: dict | None, source: str) -> Path:
        folder = self.folder / "predictions" / safe_name(image_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{safe_name(version)}.nii.gz"
        image = nib.Nifti1Image(np.asarray(labels, np.uint8), np.asarray(affine, np.float64))
        write_bytes(path, gzip.compress(image.to_bytes(), compresslevel=1))
        write_text(path.with_name(path.name.removesuffix(".nii.gz") + ".json"), json.dumps({
            "image": image_id, "version": version, "modality": modality, "ts": time.time(), "source": source,
            "structures": [[s.name, s.label, list(s.parts)] for s in structures], "doubt": doubt}, indent=1))
        return path

    def predictions(self, image_id: str) -> dict[str, dict]:
        """version -> its record (with ``path``, the label map) for one image."""
        folder = self.folder / "predictions" / safe_name(image_id)
        records = {}
        for meta in sorted(folder.glob("*.json")):
            record = _read(meta)
            label = meta.with_suffix(".nii.gz")
            if record and record.get("image") == image_id and label.is_file():
                records[record["version"]] = {**record, "path": str(label)}
        return records

    def doubt(self, version: str) -> dict[str, dict]:
        """image id -> the uncertainty ``version`` measured on it (images it scored)."""
        found = {}
        for meta in (self.folder / "predictions").glob(f"*/{safe_name(version)}.json"):
            record = _read(meta)
            if record and record.get("doubt") and record.get("version") == version:
                found[record["image"]] = {**record["doubt"], "modality": record["modality"], "ts": record["ts"]}
        return found

    # ---- agreement with the users' labels --------------------------------------------------------------
    def record_agreement(self, image_id: str, final_label: str, label_names: dict[int, str],
                         known: list[str], modality: str) -> dict:
        """Scores every stored prediction of the image against the user's final label (read onto the
        prediction's grid whatever its voxel order; its values name structures by ``label_names``, brought to
        each version's own label ids), on the structures the user's label names (``known``)."""
        from .evaluation import score
        from .geometry import spacing_of
        from .label_maps import relabel
        from .reading import read_label, read_volume

        entry = {"image": image_id, "modality": modality, "saved_ts": time.time(), "structures": known, "versions": {}}
        user = None  # the user's label on the predictions' grid (every version segmented the same image): read once
        for version, record in self.predictions(image_id).items():
            if record["modality"] != modality:
                continue
            predicted = read_volume(record["path"])
            if user is None:
                user = read_label(final_label, predicted).as_subclass(torch.Tensor).round().to(torch.int64).clamp_(min=0)
            ids = {n: i for n, i, _ in record["structures"]}  # this version's label ids
            reference = relabel(user, {v: ids[n] for v, n in label_names.items() if n in ids}).numpy()
            structures = [Structure(n, i, 0, list(parts)) for n, i, parts in record["structures"] if n in known]
            scores = score(np.asarray(predicted).astype(np.uint8), reference.astype(np.uint8), structures,
                           spacing_of(predicted))
            dice = [s["dice"] for s in scores.values() if s["dice"] is not None]
            entry["versions"][version] = {"structures": scores, "mean_dice": float(np.mean(dice)) if dice else None,
                                          "predicted_ts": record["ts"], "source": record["source"]}
        write_text(self.folder / "agreement" / f"{safe_name(image_id)}.json", json.dumps(entry, indent=1))
        return entry

    def agreements(self) -> list[dict]:
        return [e for e in (_read(p) for p in sorted((self.folder / "agreement").glob("*.json"))) if e]

    # ---- the report ----------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Every version that made a prediction, oldest first (by its first prediction)."""
        first = {}
        for meta in (self.folder / "predictions").glob("*/*.json"):
            record = _read(meta)
            if record:
                first[record["version"]] = min(first.get(record["version"], record["ts"]), record["ts"])
        return sorted(first, key=first.get)

    def summary(self) -> dict[str, dict]:
        """version -> {"images": n, "mean_dice": mean over images, "structures": {name: mean Dice}}: how far each
        version's auto-segmentations were from what users saved. Kept until a record is added or replaced (every
        write is a rename, which changes its folder's time), since /info asks for it on every poll."""
        key = self._stamp()
        if self._summary is None or self._summary[0] != key:
            self._summary = (key, self._summarise())
        return self._summary[1]

    def _stamp(self) -> tuple:
        folders = [self.folder / "agreement", self.folder / "predictions"]
        if folders[1].is_dir():
            folders += sorted(p for p in folders[1].iterdir() if p.is_dir())
        return tuple(f.stat().st_mtime_ns if f.is_dir() else 0 for f in folders)

    def _summarise(self) -> dict[str, dict]:
        out = {}
        agreements = self.agreements()
        for version in self.versions():
            per_structure, means, images = {}, [], []
            for entry in agreements:
                scored = entry["versions"].get(version)
                if not scored:
                    continue
                images.append(entry["image"])
                if scored["mean_dice"] is not None:
                    means.append(scored["mean_dice"])
                for name, s in scored["structures"].items():
                    if s["dice"] is not None:
                        per_structure.setdefault(name, []).append(s["dice"])
            if images:
                out[version] = {"images": len(images), "image_ids": images,
                                "mean_dice": float(np.mean(means)) if means else None,
                                "structures": {n: float(np.mean(v)) for n, v in per_structure.items()}}
        return out


def report_markdown(ledger: Ledger) -> str:
    """Per version, its Dice against the users' saved labels (by structure), and per image and version."""
    summary, agreements = ledger.summary(), ledger.agreements()
    if not summary:
        return "No user has saved a final label for an image a model version segmented yet.\n"
    names = sorted({n for s in summary.values() for n in s["structures"]})
    lines = ["## Dice of each model version against the labels users saved", "",
             "| version | images | " + " | ".join(names) + " | mean |", "|---|---|" + "---|" * (len(names) + 1)]
    for version, s in summary.items():
        cells = [_fmt(s["structures"].get(n)) for n in names]
        lines.append(f"| {version} | {s['images']} | " + " | ".join(cells) + f" | {_fmt(s['mean_dice'])} |")
    versions = list(summary)
    lines += ["", "## Mean Dice per image and version (the same image under each version that segmented it)", "",
              "| image | " + " | ".join(versions) + " |", "|---|" + "---|" * len(versions)]
    for entry in agreements:
        cells = [_fmt(entry["versions"].get(v, {}).get("mean_dice")) for v in versions]
        lines.append(f"| {entry['image']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_plot(ledger: Ledger, path: str | Path) -> Path | None:
    """A PNG: mean Dice against the users' labels per version, per structure and overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = ledger.summary()
    if not summary:
        return None
    versions = list(summary)
    names = sorted({n for s in summary.values() for n in s["structures"]})
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(versions) + 3), 4), dpi=100)
    x = np.arange(len(versions))
    for name in names:
        axis.plot(x, [summary[v]["structures"].get(name, np.nan) for v in versions], marker="o", label=name)
    axis.plot(x, [np.nan if summary[v]["mean_dice"] is None else summary[v]["mean_dice"] for v in versions],
              marker="s", color="black", linewidth=2,
              label="mean")
    axis.set_xticks(x, [f"{v}\n({summary[v]['images']} images)" for v in versions], fontsize=7)
    axis.set_ylim(0, 1)
    axis.set_ylabel("Dice against the users' final labels")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a file being replaced right now is complete before and after, never half
        return None
