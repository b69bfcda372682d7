"""Sans-IO ``{packet, N}`` framing: a big-endian length prefix of 1, 2 or 4 bytes.

``FrameBuffer`` collects bytes from any source and hands out complete frames.
It never buffers an oversized frame: a frame longer than ``max_frame`` is
reported as soon as its header is seen and its body is then skipped as it
arrives, so the stream stays in sync and memory stays bounded.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from poolport.errors import FrameError

PACKET_SIZES = (1, 2, 4)


def frame(payload: bytes, packet: int = 4) -> bytes:
    """Prefix ``payload`` with its ``packet``-byte big-endian length."""
    n = len(payload)
    if n >= 1 << (8 * packet):
        raise FrameError(f"payload of {n} bytes does not fit a {{packet,{packet}}} header")
    return n.to_bytes(packet, "big") + payload


@dataclass(frozen=True)
class Oversized:
    """A frame that was larger than the limit; its body was discarded."""

    size: int


MAX_ATTACHED = 64 << 10  # info frames waiting for one call beyond this: only the latest is kept

HEADERS = {1: struct.Struct(">B"), 2: struct.Struct(">H"), 4: struct.Struct(">I")}

Attach = Callable[[bytes, int, int], bool]
"""``attach(data, payload_start, payload_end)``: True if this frame belongs with the frame after it."""


def last_frame(data: bytes, packet: int, begin: int = 0, end: int | None = None) -> tuple[int, int]:
    """Payload bounds of the last frame of the item at ``data[begin:end]``: its request, after
    the ``{info, ...}`` frames that travel with it (the end is clipped to ``end``)."""
    unpack = HEADERS[packet].unpack_from
    end = len(data) if end is None else end
    pos = begin
    while True:
        start = pos + packet
        pos = start + unpack(data, pos)[0]
        if pos >= end or pos + packet > end:
            return start, min(pos, end)


class Segment:
    """Complete *items* sharing one buffer: item ``k`` is ``data[bounds[k]:bounds[k + 1]]``.

    An item is one frame, plus any frames ``attach`` said go with it (an
    ``{info, ...}`` packet travels with the call it precedes). Items are
    referenced, never copied, until a run of them is sent on.
    """

    __slots__ = ("data", "bounds")

    def __init__(self, data: bytes, bounds: list[int]) -> None:
        self.data = data
        self.bounds = bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def items(self) -> list[bytes]:
        b, d = self.bounds, self.data
        return [d[b[k] : b[k + 1]] for k in range(len(b) - 1)]


class FrameBuffer:
    """Accumulate bytes with :meth:`feed`; take complete items with :meth:`segments`.

    Frames keep their length header, exactly as they were on the wire, so a
    run of them is forwarded with one slice. A frame over ``max_frame`` comes
    out as :class:`Oversized` once its body has been skipped, and is never
    buffered. Bytes arriving for a big frame are joined once, when complete.
    """

    def __init__(self, packet: int = 4, max_frame: int = 64 * 1024 * 1024, attach: Attach | None = None) -> None:
        if packet not in PACKET_SIZES:
            raise FrameError(f"packet must be one of {PACKET_SIZES}, got {packet!r}")
        self.packet = packet
        self.max_frame = max_frame
        self.attach = attach
        self._header = HEADERS[packet]
        self._parts: list[bytes] = []
        self._have = 0  # bytes in _parts
        self._need = packet  # bytes needed before scanning can make progress
        self._skip = 0  # bytes of an oversized frame still to discard
        self._skipped = 0  # declared size of the oversized frame being discarded
        self._scan = 0  # bytes at the start of the buffer already scanned: info frames held for a call
        self.dropped = 0  # bytes of info frames dropped because too many waited for one call

    def __len__(self) -> int:
        return self._have

    @property
    def held(self) -> int:
        """Bytes of complete ``{info, ...}`` frames waiting for the call they precede."""
        return self._scan

    def wanted(self) -> int:
        """Bytes still missing before the next item can complete: lets readers size reads."""
        return self._skip or max(0, self._need - self._have)

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        if data:
            self._parts.append(bytes(data))
            self._have += len(data)

    def segments(self) -> list[Segment | Oversized]:
        out: list[Segment | Oversized] = []
        if self._skip:
            return out
        if self._skipped:
            out.append(Oversized(self._skipped))
            self._skipped = 0
        if self._have < self._need:
            return out
        buf = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        p, limit, attach, unpack = self.packet, self.max_frame, self.attach, self._header.unpack_from
        n = len(buf)
        if (
            not self._scan
            and n > p
            and p + unpack(buf)[0] == n
            and n - p <= limit
            and (attach is None or not attach(buf, p, n))
        ):  # the usual case in lock-step: one whole request
            self._parts, self._have, self._need = [], 0, p
            out.append(Segment(buf, [0, n]))
            return out
        item, pos = 0, self._scan  # start of the item in progress; scan position (never rescanned)
        bounds = [0]
        while n - pos >= p:
            size = unpack(buf, pos)[0]
            end = pos + p + size
            if size > limit:
                if len(bounds) > 1:
                    out.append(Segment(buf, bounds))
                if end > n:
                    self._skip, self._skipped, pos = end - n, size, n
                else:
                    out.append(Oversized(size))
                    pos = end
                item = pos  # info frames waiting for this call are dropped with it
                bounds = [pos]
                if self._skip:
                    break
                continue
            if end > n:
                break
            if attach is None or not attach(buf, pos + p, end):
                bounds.append(end)
                item = end
            elif end - item > MAX_ATTACHED and pos > item:  # a flood of info frames: keep the latest
                if len(bounds) > 1:
                    out.append(Segment(buf, bounds))
                self.dropped += pos - item
                item = pos
                bounds = [pos]
            pos = end
        if len(bounds) > 1:
            out.append(Segment(buf, bounds))
        rest = buf[item:] if item < n else b""
        self._parts = [rest] if rest else []
        self._have = len(rest)
        self._scan = pos - item
        if n - pos >= p:
            self._need = (pos - item) + p + unpack(buf, pos)[0]
        else:
            self._need = (pos - item) + p
        return out

    def drain(self) -> list[bytes | Oversized]:
        """Every complete item as one ``bytes`` (header included), or :class:`Oversized`."""
        out: list[bytes | Oversized] = []
        for seg in self.segments():
            if type(seg) is Oversized:
                out.append(seg)
            else:
                out.extend(seg.items())  # type: ignore[union-attr]
        return out
