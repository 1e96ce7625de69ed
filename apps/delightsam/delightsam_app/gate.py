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
import json
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from delightsam.files import write_text


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


class OverBudget(Exception):
    """One inference whose memory estimate alone exceeds the whole budget: it cannot run on this server."""

    def __init__(self, estimate_mb: float, budget_mb: float) -> None:
        super().__init__(f"needs about {estimate_mb:,.0f} MB, and this server's inference memory budget is "
                         f"{budget_mb:,.0f} MB (--conf memory_budget_mb)")
        self.estimate_mb, self.budget_mb = estimate_mb, budget_mb


class MemoryBudget:
    """Inference memory admitted by estimate across the app's processes (the server's threads, batch and scoring
    processes): an inference holds its estimate (``Pipeline.memory_mb``, from the volume's header) while it runs,
    and one that would take the held total past ``budget_mb`` waits for others to finish, so that several users
    with large volumes queue instead of exhausting the machine's memory together. The holdings are a small JSON
    file in the model folder, replaced whole under a file lock; a dead process's holding is dropped. Memory is
    taken before a work slot (``WorkGate``), never while holding one, so the two cannot wait on each other. Waiting
    is bounded by the server's admission queue (``edge.Admission``), not ordered: a large request may wait while
    smaller ones keep fitting."""

    def __init__(self, folder: str | Path, budget_mb: float, poll_s: float = 0.2) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self._lock = folder / "memory.json", FileLock(folder / "memory.lock")
        self.budget_mb, self.poll_s = float(budget_mb), poll_s
        self._released = threading.Condition()
        self.waiting = 0  # this process's inferences waiting for memory (for /info)

    def check(self, estimate_mb: float) -> None:
        """OverBudget if ``estimate_mb`` alone exceeds the budget (it would wait for ever)."""
        if estimate_mb > self.budget_mb:
            raise OverBudget(estimate_mb, self.budget_mb)

    @contextmanager
    def __call__(self, estimate_mb: float):
        self.check(estimate_mb)
        token = f"{_process()}-{uuid.uuid4().hex}"
        if not self._hold(token, estimate_mb):
            with self._released:
                self.waiting += 1  # waiting: it did not fit when it came
                self._released.notify_all()  # (those who watch the count)
            try:
                while not self._hold(token, estimate_mb):
                    with self._released:  # woken at once by a release in this process; polls for the others'
                        self._released.wait(self.poll_s)
            finally:
                with self._released:
                    self.waiting -= 1
        try:
            yield
        finally:
            with self._lock:
                self._write({k: v for k, v in self._read().items() if k != token})
            with self._released:
                self._released.notify_all()

    def held_mb(self) -> float:
        with self._lock:
            return sum(v for v in self._read().values())

    def _hold(self, token: str, estimate_mb: float) -> bool:
        with self._lock:
            held = self._read()
            if sum(held.values()) + estimate_mb > self.budget_mb:
                return False
            self._write({**held, token: estimate_mb})
            return True

    def _read(self) -> dict[str, float]:
        """The holdings of live processes."""
        try:
            held = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(held, dict):
            return {}
        return {k: float(v) for k, v in held.items() if _alive(k.rsplit("-", 1)[0])}

    def _write(self, held: dict[str, float]) -> None:
        write_text(self.path, json.dumps(held))  # whole or not at all: a crash mid-write loses no holding


def _process(pid: int | None = None) -> str:
    """A process by its pid and start time (a pid reused after a crash is another process)."""
    pid = pid or os.getpid()
    try:
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{pid}:{started}"


def _alive(process: str) -> bool:
    pid = int(process.split(":")[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return _process(pid) == process
