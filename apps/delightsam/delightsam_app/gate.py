"""One bound on the app's heavy CPU work across all its processes.

The server's inferences, and those of the batch and uncertainty-scoring processes that monailabel starts (each
runs the app's inference in a process of its own), and the scoring of saved labels, each hold one of
``infer_workers`` slots while they compute: lock files in the model folder, so that a batch run in the
background takes turns with the users' inferences instead of competing with them for the cores. Waiting is
bounded by the server's admission gate (``edge.Admission``: 503 beyond its queue); the background processes wait
for their turn. Training is not gated: it would hold a slot for minutes.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


class WorkGate:
    def __init__(self, folder: str | Path, slots: int) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.slots = [FileLock(folder / f"slot-{i}.lock") for i in range(max(slots, 1))]
        self._turn = itertools.count()

    @contextmanager
    def __call__(self):
        """Holds a free slot, or waits for one (in turn) while every slot is held."""
        slot = self._free()
        if slot is None:
            slot = self.slots[next(self._turn) % len(self.slots)]
            slot.acquire()
        try:
            yield
        finally:
            slot.release()

    def _free(self) -> FileLock | None:
        for slot in self.slots:
            try:
                slot.acquire(timeout=0)
                return slot
            except Timeout:
                continue
        return None
