"""Sans-IO ``{packet, N}`` framing: a big-endian length prefix of 1, 2 or 4 bytes.

``FrameBuffer`` collects bytes from any source and hands out complete frames.
It never buffers an oversized frame: a frame longer than ``max_frame`` is
reported as soon as its header is seen and its body is then skipped as it
arrives, so the stream stays in sync and memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FrameError

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


class FrameBuffer:
    """Accumulate bytes with :meth:`feed`; take every complete frame with :meth:`drain`.

    Frames are returned *with* their length header, exactly as they were on
    the wire, so a run of them can be forwarded by concatenation; a frame over
    ``max_frame`` comes out as :class:`Oversized` once its body has been skipped.
    """

    def __init__(self, packet: int = 4, max_frame: int = 64 * 1024 * 1024) -> None:
        if packet not in PACKET_SIZES:
            raise FrameError(f"packet must be one of {PACKET_SIZES}, got {packet!r}")
        self.packet = packet
        self.max_frame = max_frame
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized frame still to discard
        self._skipped = 0  # declared size of the oversized frame being discarded

    def __len__(self) -> int:
        return len(self._buf)

    def wanted(self) -> int:
        """Bytes still missing for the frame in progress (0 if unknown): lets readers size reads."""
        p, buf = self.packet, self._buf
        if self._skip or len(buf) < p:
            return self._skip
        return max(0, p + int.from_bytes(buf[:p], "big") - len(buf))

    def feed(self, data: bytes) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data

    def drain(self) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        if self._skip:
            return out
        if self._skipped:
            out.append(Oversized(self._skipped))
            self._skipped = 0
        p, limit, buf = self.packet, self.max_frame, self._buf
        n, pos = len(buf), 0
        while n - pos >= p:
            size = int.from_bytes(buf[pos : pos + p], "big")
            end = pos + p + size
            if size > limit:
                if end > n:
                    self._skip, self._skipped, pos = end - n, size, n
                    break
                out.append(Oversized(size))
            elif end > n:
                break
            else:
                out.append(bytes(buf[pos:end]))
            pos = end
        del buf[:pos]
        return out


def split_frames(data: bytes | memoryview, packet: int = 4) -> list[memoryview]:
    """Payloads of a byte string made of complete frames only (what a worker receives)."""
    view = memoryview(data)
    out = []
    pos, n = 0, len(view)
    while pos < n:
        size = int.from_bytes(view[pos : pos + packet], "big")
        start = pos + packet
        pos = start + size
        if pos > n:
            raise FrameError(f"frame at offset {start - packet} claims {size} bytes, {n - start} left")
        out.append(view[start:pos])
    return out
