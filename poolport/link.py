"""The private dispatcher <-> worker link: a Unix socket carrying runs of frames.

Every message is ``HEADER`` (payload bytes, frame count) followed by that many
bytes of ``{packet,N}`` frames, exactly as they travel on the Erlang port:

* dispatcher -> worker: a *run* of consecutive request frames;
* worker -> dispatcher: a *chunk* of reply frames answering the next ``count``
  requests of the runs it was given, in order (a run may be answered in
  several chunks so slow calls report progress);
* worker -> dispatcher, once on connect: ``HEADER(slot, pid)`` as a hello.
"""

from __future__ import annotations

import socket
import struct

HEADER = struct.Struct(">II")
SMALL_MESSAGE = 64 * 1024  # below this, header and payload are joined into one send


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Read exactly ``n`` bytes, or ``None`` if the peer closed first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            return None
        got += k
    return bytes(buf)


def send_message(sock: socket.socket, count: int, payload: bytes) -> None:
    header = HEADER.pack(len(payload), count)
    if len(payload) < SMALL_MESSAGE:
        sock.sendall(header + payload)  # one syscall; the copy is cheap
    else:
        sock.sendall(header)
        sock.sendall(payload)  # no copy of a big payload
