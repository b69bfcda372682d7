"""What a worker is doing right now, in a few bytes of shared memory.

The worker bumps ``started`` before each call and ``finished`` after its reply
is encoded; the dispatcher reads them without any message passing. That tells
it exactly which call a dead worker was running (so only that call is blamed
and the others are re-run), and since when (so timeouts are enforced per call,
not per batch). Memory writes cost far less than a syscall per call.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import NamedTuple

_LAYOUT = struct.Struct("=QQdQ")  # started, finished, started_at (CLOCK_MONOTONIC s), timeout_ms
_STARTED = struct.Struct("=Q")
_STARTED_AT_TIMEOUT = struct.Struct("=dQ")
_FINISHED_OFFSET, _STARTED_AT_OFFSET, _TIMEOUT_OFFSET = 8, 16, 24


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
        self._started = self._finished = 0

    def begin(self) -> None:
        """A call starts now (its timeout is not known yet)."""
        self._started += 1
        _STARTED_AT_TIMEOUT.pack_into(self._map, _STARTED_AT_OFFSET, time.monotonic(), 0)
        _STARTED.pack_into(self._map, 0, self._started)  # last: readers trust started_at once they see it

    def set_timeout(self, timeout_ms: int) -> None:
        _STARTED.pack_into(self._map, _TIMEOUT_OFFSET, timeout_ms)

    def end(self) -> None:
        self._finished += 1
        _STARTED.pack_into(self._map, _FINISHED_OFFSET, self._finished)

    def read(self) -> Snapshot:
        return Snapshot(*_LAYOUT.unpack_from(self._map))

    def close(self) -> None:
        self._map.close()
