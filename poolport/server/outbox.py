"""Bytes waiting for a non-blocking descriptor, written as fast as the peer takes them.

The dispatcher never blocks on a peer: a worker that does not read its link
socket, or an Erlang VM that does not read the port, only makes an outbox
grow (within the limits the dispatcher enforces), while the loop goes on
reading, accepting, checking timeouts and noticing stdin EOF and signals.
Parts are written with one gather-write (``writev``/``sendmsg``) and never
joined, so a 10 MB reply is not copied on its way out.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Callable, Sequence

from poolport.server.reorder import Buffer

IOV_MAX = 512  # parts per gather-write (Linux allows 1024)

Write = Callable[[Sequence[Buffer]], int]
"""A non-blocking gather-write, e.g. ``functools.partial(os.writev, fd)`` or ``sock.sendmsg``:
returns the bytes written, raises ``BlockingIOError`` when the peer takes none."""


class Outbox:
    """A FIFO of byte parts for one descriptor."""

    __slots__ = ("_parts", "size")

    def __init__(self) -> None:
        self._parts: deque[memoryview] = deque()
        self.size = 0  # bytes waiting

    def __bool__(self) -> bool:
        return self.size > 0

    def push(self, *parts: Buffer) -> None:
        for part in parts:
            if len(part):
                self._parts.append(memoryview(part).cast("B"))
                self.size += len(part)

    def write_now(self, data: Buffer, write: Callable[[Buffer], int]) -> bool:
        """The usual case, one buffer and nothing waiting: one plain write, no gather list.
        What the peer does not take waits here; True once everything is out. ``OSError``
        other than ``BlockingIOError`` propagates (the peer is gone)."""
        if self:
            self.push(data)
            return False
        try:
            n = write(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            self.push(memoryview(data)[n:])
            return False
        return True

    def flush(self, write: Write) -> bool:
        """Write what the peer takes now; True once everything is out. ``OSError`` other than
        ``BlockingIOError`` propagates (the peer is gone)."""
        parts = self._parts
        while parts:
            batch = list(islice(parts, IOV_MAX))
            try:
                n = write(batch)
            except (BlockingIOError, InterruptedError):
                return False
            self.size -= n
            left = n
            while left:
                first = parts[0]
                if left >= len(first):
                    left -= len(first)
                    parts.popleft()
                else:
                    parts[0] = first[left:]
                    left = 0
            if n < sum(map(len, batch)):
                return False  # a short write: the peer's buffer is full
        return True

    def clear(self) -> None:
        self._parts.clear()
        self.size = 0
