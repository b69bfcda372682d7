"""The private dispatcher <-> worker link: a Unix socket carrying runs of frames.

Every message is ``HEADER`` (payload bytes, frame count) followed by that many
bytes of ``{packet,N}`` frames, exactly as they travel on the Erlang port:

* dispatcher -> worker: a *run* of consecutive request frames, preceded by
  ``SEQ``, the sequence number of its first request;
* worker -> dispatcher: a *chunk* of reply frames answering the next ``count``
  requests of the runs it was given, in order (a run may be answered in
  several chunks so slow calls report progress); an *empty* chunk means the
  worker wrote those ``count`` replies to the port itself (its turn had come);
* worker -> dispatcher: a message with the count REPORT_COUNT is a statistics report
  (``poolport.server.stats``), sent just before the chunk whose calls it counts;
* worker -> dispatcher, once on connect: ``HEADER(slot, pid)`` as a hello
  (pid 0: the worker cannot serve, its handlers did not import or ``worker_init`` failed).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

HEADER = struct.Struct(">II")
REPORT_COUNT = 0xFFFFFFFE  # a worker's statistics report (0: stream messages, 0xFFFFFFFF: callbacks)
SEQ = struct.Struct(">Q")
SMALL_MESSAGE = 64 * 1024  # below this, header and payload are joined into one send
BIG_MESSAGE = 256 << 10  # from this size on, a payload is received in place, not re-assembled
READ_SIZE = 64 << 10  # bytes asked per read: asking for more costs a big allocation every time
SOCKET_BUFFER = 4 << 20  # kernel buffer per direction: fewer wake-ups for big payloads

Buffer = bytes | bytearray | memoryview


def tune(sock: socket.socket) -> None:
    """Give a link socket big kernel buffers (best effort: the kernel may cap them)."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def send_message(
    sock: socket.socket, count: int, payload: Buffer | Sequence[Buffer], report: bytes | None = None
) -> None:
    """Send one message; ``payload`` may be a list of parts, sent without joining big ones.
    A ``report`` goes first, as a message of its own with the count ``REPORT_COUNT`` (in the
    same send)."""
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    size = sum(len(p) for p in parts)
    header = HEADER.pack(size, count)
    lead = [HEADER.pack(len(report), REPORT_COUNT), report] if report else []
    if size < SMALL_MESSAGE:
        sock.sendall(b"".join([*lead, header, *parts]))  # one syscall; the copy is cheap
        return
    sock.sendall(b"".join([*lead, header]))
    for part in parts:
        sock.sendall(part)  # no copy of a big payload


class MessageReader:
    """Reassembles messages from a stream socket.

    Small messages are cut out of a receive buffer; a big one gets a buffer of
    its exact size that the kernel fills directly (``recv_into``), so a 10 MB
    payload is copied once, not once per read.
    """

    def __init__(self) -> None:
        self._buf = b""  # the start of a message not complete yet
        self._big: bytearray | None = None
        self._view = memoryview(b"")
        self._got = 0
        self._count = 0

    def read_from(self, sock: socket.socket) -> list[tuple[int, Buffer]] | None:
        """Messages completed by one read, as ``(count, payload)``; ``None`` once the peer closed."""
        if self._big is not None:
            n = sock.recv_into(self._view[self._got :])
            if not n:
                return None
            self._got += n
            if self._got < len(self._big):
                return []
            message = (self._count, self._big)
            self._big, self._view = None, memoryview(b"")
            return [message]
        data = sock.recv(READ_SIZE)
        if not data:
            return None
        return self._split(data)

    def _split(self, data: bytes) -> list[tuple[int, Buffer]]:
        if self._buf:
            data = self._buf + data
        pos, n, h = 0, len(data), HEADER.size
        if n >= h:  # the usual case: exactly one whole message
            size, count = HEADER.unpack_from(data)
            if h + size == n:
                self._buf = b""
                return [(count, data[h:])]
        out: list[tuple[int, Buffer]] = []
        while n - pos >= h:
            size, count = HEADER.unpack_from(data, pos)
            end = pos + h + size
            if end > n:
                if size >= BIG_MESSAGE:
                    big = bytearray(size)
                    have = n - pos - h
                    big[:have] = data[pos + h : n]
                    self._big, self._view, self._got, self._count = big, memoryview(big), have, count
                    pos = n
                break
            out.append((count, data[pos + h : end]))
            pos = end
        self._buf = data[pos:] if pos < n else b""
        return out
