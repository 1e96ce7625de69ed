"""A disk cache of teacher embeddings: the teacher is the expensive part of distillation, so each training
slice is embedded once and reused by every later run.

Keyed by a hash of the slice's content (the exact grey input the teacher sees), the teacher's identity
(name, input size, weights) and the student grid. Entries are written aside and renamed into place, so two
runs may share the cache, and a run killed mid-write leaves at most a stray temporary file, never a
half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class EmbeddingCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = self.misses = 0

    def key(self, teacher_id: str, grid: int, image: torch.Tensor) -> str:
        digest = hashlib.sha256(f"{teacher_id}|{grid}|{list(image.shape)}".encode())
        digest.update(image.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)).float()
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):  # an unreadable entry (disk trouble): recompute it
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, embedding: torch.Tensor) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, embedding.detach().cpu().to(torch.float16).numpy(), allow_pickle=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def embed(self, teacher, grey: torch.Tensor, grid: int) -> torch.Tensor:
        """Teacher embeddings of a batch [B, 3, S, S] -> [B, 256, grid, grid], computing only what is missing."""
        keys = [self.key(teacher.id, grid, image) for image in grey]
        found = {k: self.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, f in found.items() if f is None]  # a slice twice in a batch is embedded once
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = teacher(grey[[keys.index(k) for k in missing]], grid)
            for k, embedding in zip(missing, computed):
                self.put(k, embedding)
                found[k] = embedding.detach().cpu().half().float()  # exactly what a later run reads back
        return torch.stack([found[k].to(grey.device) for k in keys])
