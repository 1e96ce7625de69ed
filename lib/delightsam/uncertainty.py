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
        self.mass = torch.zeros(count, dtype=torch.float64)  # sum of p over the zone
        self.drawn = torch.zeros(count, dtype=torch.float64)  # voxels of the drawn mask

    def add(self, probabilities: torch.Tensor) -> None:
        """One slice batch; one structure at a time, in float32, so that the extra memory is a few copies of
        one structure's probabilities (sums are kept in float64)."""
        for i in range(len(self.names)):
            p = probabilities[:, i].float().clamp(1e-7, 1 - 1e-7)
            zone = p >= ZONE
            inside = p[zone]
            bits = -(inside * torch.log2(inside) + (1 - inside) * torch.log2(1 - inside))
            drawn = p > self.threshold
            self.entropy[i] += bits.double().sum()
            self.zone[i] += inside.numel()
            self.overlap[i] += p[drawn].double().sum()
            self.mass[i] += inside.double().sum()  # the probability mass of the zone (below it: rounding)
            self.drawn[i] += drawn.sum()

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
