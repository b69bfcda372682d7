"""What a worker is doing right now, in a few bytes of shared memory.

The worker bumps ``started`` before each call and ``finished`` after its reply
is encoded; the dispatcher reads them without any message passing. That tells
it exactly which call a dead worker was running (so only that call is blamed
and the others are re-run), and since when (so timeouts are enforced per call,
not per batch). A memory write costs far less than a syscall per call.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import NamedTuple

_LAYOUT = struct.Struct("=QQdQ")  # started, finished, started_at (CLOCK_MONOTONIC s), timeout_ms
_STARTED, _FINISHED, _STARTED_AT, _TIMEOUT = 0, 1, 2, 3  # slot indexes (8 bytes each)
LOOK_AGAIN_S = 0.05  # how soon to check an idle-looking worker that was sent a run
MAX_TIMEOUT_MS = (1 << 32) - 1  # longer timeouts (any size may arrive) mean this: about 50 days


class Snapshot(NamedTuple):
    started: int
    finished: int
    started_at: float
    timeout_ms: int

    @property
    def running(self) -> bool:
        return self.started > self.finished


class Progress:
    """A shared-memory progress record backed by a file in the dispatcher's private directory."""

    def __init__(self, path: str, create: bool = False) -> None:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, _LAYOUT.size)
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)
        self._ints = memoryview(self._map).cast("Q")  # item writes: no struct packing per call
        self._floats = memoryview(self._map).cast("d")
        self._started = self._finished = 0

    def begin(self, timeout_ms: int = 0) -> None:
        """A call starts now; ``started`` is written last so readers can trust the rest."""
        self._started += 1
        self._floats[_STARTED_AT] = time.monotonic()
        self._ints[_TIMEOUT] = min(timeout_ms, MAX_TIMEOUT_MS)
        self._ints[_STARTED] = self._started

    def set_timeout(self, timeout_ms: int) -> None:
        self._ints[_TIMEOUT] = min(timeout_ms, MAX_TIMEOUT_MS)

    def resume(self, timeout_ms: int) -> None:
        """The call that just ended runs again (a stream serving its items after its start
        reply): ``finished`` is written last, once the clock is set."""
        self.clock(timeout_ms)
        self._finished -= 1
        self._ints[_FINISHED] = self._finished

    def clock(self, timeout_ms: int) -> None:
        """Restart the running call's clock with this timeout (a stream's next item). The
        timeout is 0 (none) while the start moves, so no reader pairs the old start with the
        new timeout, whatever order it reads them in."""
        ints = self._ints
        ints[_TIMEOUT] = 0
        self._floats[_STARTED_AT] = time.monotonic()
        ints[_TIMEOUT] = min(timeout_ms, MAX_TIMEOUT_MS)

    def end(self) -> None:
        self._finished += 1
        self._ints[_FINISHED] = self._finished

    @property
    def finished(self) -> int:
        """Calls this worker has answered (its replies are encoded, maybe not yet sent)."""
        return self._ints[_FINISHED]

    def wake_at(self, now: float) -> float:
        """When a reader should look again: the running call's deadline, else ``LOOK_AGAIN_S``
        from ``now``: no call may be running yet, or the running one may learn its timeout
        later (``set_timeout`` once its function is resolved)."""
        ints = self._ints
        timeout = ints[_TIMEOUT]
        if timeout and ints[_STARTED] > ints[_FINISHED]:
            return self._floats[_STARTED_AT] + timeout / 1000
        return now + LOOK_AGAIN_S

    def read(self) -> Snapshot:
        return Snapshot(*_LAYOUT.unpack_from(self._map))

    def close(self) -> None:
        self._ints.release()
        self._floats.release()
        self._map.close()


class Counters:
    """Pool-wide event counts the dispatcher keeps and any worker reads (``'$poolport':info()``)."""

    NAMES = ("worker_deaths", "timeouts", "reruns", "abandoned")

    def __init__(self, path: str, create: bool = False) -> None:
        size = 8 * len(self.NAMES)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._cells = memoryview(self._map).cast("Q")

    def add(self, name: str, n: int = 1) -> None:
        self._cells[self.NAMES.index(name)] += n

    def set(self, name: str, value: int) -> None:
        self._cells[self.NAMES.index(name)] = value

    def read(self) -> dict[str, int]:
        return dict(zip(self.NAMES, self._cells.tolist()))

    def close(self) -> None:
        self._cells.release()
        self._map.close()
