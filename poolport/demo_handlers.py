"""Handlers for ``poolport demo`` and the benchmark (allowlisted as ``poolport.demo_handlers``)."""

from __future__ import annotations

from collections.abc import Iterator

import os
import time


def burn(steps: int) -> int:
    """Pure-Python CPU work: the kind of call poolport spreads over cores."""
    acc = 0
    for i in range(steps):
        acc = (acc * 31 + i) % 1000003
    return acc


def whoami(sleep_ms: int = 0) -> int:
    """The worker's OS pid (after an optional pause, so calls spread over workers)."""
    time.sleep(sleep_ms / 1000)
    return os.getpid()


def echo(x: object) -> object:
    return x


def chunks(count: int, size: int) -> Iterator[bytes]:  # a generator: the benchmark's stream
    """``count`` binaries of ``size`` bytes, as a stream."""
    blob = bytes(size)
    for _ in range(count):
        yield blob
