"""A disk cache of teacher embeddings: the teacher is the expensive part of distillation, so each training
slice is embedded once and reused by every later run.

Keyed by a hash of the slice's content (the exact grey input the teacher sees), the teacher's identity
(name, input size, weights) and the student grid. Entries are written aside and renamed into place, so two
runs may share the cache, and a run killed mid-write leaves at most a stray temporary file, never a
half-written entry. The cache is capped (``max_bytes``): past the cap, the entries least recently written or
read are removed first (reads touch an entry's time).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .files import atomic_path


DEFAULT_MAX_BYTES = 4 * 1024**3


class EmbeddingCache:
    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.hits = self.misses = self.evicted = 0
        self._size: int | None = None  # bytes on disk, counted on the first write

    def _entries(self) -> list[Path]:
        return list(self.root.glob("*/*.npy"))

    def _evict(self) -> None:
        """Oldest entries out until the cache is at 90% of its cap."""
        entries = []
        for p in self._entries():
            try:
                st = p.stat()
            except FileNotFoundError:  # another run removed it
                continue
            entries.append((max(st.st_mtime, st.st_atime), st.st_size, p))
        self._size = sum(e[1] for e in entries)
        for _, size, p in sorted(entries):
            if self._size <= 0.9 * self.max_bytes:
                break
            p.unlink(missing_ok=True)
            self._size -= size
            self.evicted += 1

    def key(self, teacher_id: str, grid: int, image: torch.Tensor) -> str:
        digest = hashlib.sha256(f"{teacher_id}|{grid}|{list(image.shape)}".encode())
        digest.update(image.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        try:
            found = torch.from_numpy(np.load(path, allow_pickle=False)).float()
            os.utime(path)  # recently used: evicted last
            return found
        except FileNotFoundError:
            return None
        except (ValueError, OSError, EOFError):  # an unreadable entry (disk trouble): recompute it
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, embedding: torch.Tensor) -> None:
        path = self._path(key)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, embedding.detach().cpu().to(torch.float16).numpy(), allow_pickle=False)
        if self._size is None:
            self._size = sum(p.stat().st_size for p in self._entries() if p.exists())
        else:
            self._size += path.stat().st_size
        if self._size > self.max_bytes:
            self._evict()

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
