"""How unsure the model is of a volume, per structure: the score that active learning ranks images by.

Measured from the per-voxel structure probabilities as inference makes them, slice batch by slice batch (no
whole-volume buffer), two ways:

- ``entropy``: the mean binary entropy (bits) of the structure's probability over its zone, the voxels where
  the model gives it at least ``ZONE`` probability. A sure organ has a thin rim of doubt around a certain
  core (low); a structure the model half sees, or sees in scattered places, is mostly doubt (high).
- ``soft_dice_gap``: 1 - the soft Dice between the probabilities and the mask they threshold to: how much of
  the probability mass the drawn mask would lose or gain at another threshold.

An image's score is the mean ``entropy`` over the modality's structures (a structure with no zone is sure it is
absent and counts 0). ``scripts/annotation_loop.py`` reports how each measure tracks the Dice users' labels give.
"""

from __future__ import annotations

import math

import torch

ZONE = 0.05  # the least probability at which a voxel counts towards a structure's zone


class DoubtMeter:
    """Accumulates per-structure sums over slice batches of probabilities [b, S, rows, columns]."""

    def __init__(self, names: list[str], threshold: float = 0.5) -> None:
        self.names, self.threshold = names, threshold
        count = len(names)
        self.entropy = torch.zeros(count, dtype=torch.float64)
        self.zone = torch.zeros(count, dtype=torch.float64)
        self.overlap = torch.zeros(count, dtype=torch.float64)  # sum of p over the drawn mask
        self.mass = torch.zeros(count, dtype=torch.float64)  # sum of p
        self.drawn = torch.zeros(count, dtype=torch.float64)  # voxels of the drawn mask

    def add(self, probabilities: torch.Tensor) -> None:
        p = probabilities.transpose(0, 1).reshape(len(self.names), -1).double().clamp(1e-7, 1 - 1e-7)
        zone = p >= ZONE
        bits = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
        drawn = p > self.threshold
        self.entropy += (bits * zone).sum(1)
        self.zone += zone.sum(1)
        self.overlap += (p * drawn).sum(1)
        self.mass += (p * zone).sum(1)
        self.drawn += drawn.sum(1)

    def summary(self) -> dict:
        """{"score": the image's score, "structures": {name: {"entropy", "soft_dice_gap", "voxels"}}}."""
        structures = {}
        for i, name in enumerate(self.names):
            zone, total = float(self.zone[i]), float(self.mass[i] + self.drawn[i])
            structures[name] = {
                "entropy": float(self.entropy[i]) / zone if zone else 0.0,
                "soft_dice_gap": 1.0 - 2.0 * float(self.overlap[i]) / total if total else 0.0,
                "voxels": int(self.drawn[i]),
            }
        entropies = [s["entropy"] for s in structures.values()]
        score = sum(entropies) / len(entropies) if entropies else 0.0
        return {"score": score if math.isfinite(score) else 1.0, "structures": structures}
