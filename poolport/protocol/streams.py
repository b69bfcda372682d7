"""Streams: the terms, frames and link messages of a call whose result is a series of items. Sans-IO.

::

    Erlang                         dispatcher                              worker
    {stream, M, F, Args, Opts} ─▶  a run of its own, to an idle worker ─▶  fn(*args) -> iterator
    {stream, Sid}  ◀─ in its place in the reply order ◀──────────────────  start reply (a chunk)
    {stream_item, Sid, Item} ◀─ held until the start is out, then as is ◀─ stream message (count 0)
    {stream_end, Sid} | {stream_error, Sid, Error} ◀───────────────────── the last stream message
    {stream_credit, Sid, N} ─▶  control message (count 0) ─────────────▶  N more items may be sent
    {stream_cancel, Sid}    ─▶  control message (count 0) ─────────────▶  generator closed, stream_end

``Sid`` is the stream request's sequence number (the one its reply is tagged with).
Items travel outside the reply order: a long stream never holds up other calls' replies.
The worker sends an item only while it has credit (``window`` at the start, then what the
client grants), so a fast generator never floods the port, and a stream's memory on either
side is bounded by its window. While a stream is open its worker serves nothing else.
"""

from __future__ import annotations

import struct
from typing import Any

from poolport.errors import ProtocolError
from poolport.codec import peek
from poolport.protocol.framing import last_frame
from poolport.codec.terms import Atom

STREAM, ITEM, END, FAIL = (Atom(a) for a in ("stream", "stream_item", "stream_end", "stream_error"))
CREDIT, CANCEL = Atom("stream_credit"), Atom("stream_cancel")

DEFAULT_WINDOW = 64  # items a client may have in flight (sent, not yet consumed)
MAX_WINDOW = 1 << 20
DEFAULT_IDLE_MS = 60_000  # a stream with no credit this long is closed: a consumer that never pulls
IDLE_MARGIN_MS = 5_000  # the dispatcher kills a worker waiting for credit this much past its idle limit

# -- link messages with count 0 (runs and reply chunks always count one frame or more)
STREAM_HEAD = struct.Struct(">QB")  # worker -> dispatcher: stream id, 1 if this message is its last
CONTROL = struct.Struct(">QI")  # dispatcher -> worker: stream id, credit to add (or CANCEL_CREDIT)
CANCEL_CREDIT = 0xFFFFFFFF


_STREAM_HEADS = peek.tuple_heads((4, 5), "stream")
_CREDIT_HEADS = peek.tuple_heads(3, "stream_credit")
_CANCEL_HEADS = peek.tuple_heads(2, "stream_cancel")
_CONTROL_HEADS = _CREDIT_HEADS + _CANCEL_HEADS
_HINT = b"stream"  # in every stream request and control frame: rules out most runs in one find()


def is_stream_request(data: bytes, start: int, end: int) -> bool:
    """Byte-level test for ``{stream, M, F, Args[, Opts]}`` at ``data[start:end]`` (payload only)."""
    return end - start > 9 and data.startswith(_STREAM_HEADS, start)


def is_control(data: bytes, start: int, end: int) -> bool:
    """Byte-level test for ``{stream_credit, Sid, N}`` or ``{stream_cancel, Sid}`` (payload only).

    A control frame is no request: it gets no reply and takes no sequence number. It must
    not be compressed (a compressed one is read as a request, and answered ``BadRequest``).
    """
    return end - start > 16 and data.startswith(_CONTROL_HEADS, start)


def may_hold_streams(data: bytes, start: int, end: int) -> bool:
    """False if no frame in ``data[start:end]`` can be a stream request or a control frame."""
    return data.find(_HINT, start, end) != -1


def item_kinds(data: bytes, bounds: list[int], i: int, j: int, packet: int, test: Any) -> list[int]:
    """Indexes ``k`` in ``i .. j - 1`` whose item's last frame passes ``test(data, start, end)``.

    An item is a frame plus the ``{info, ...}`` frames before it (see ``framing.Segment``).
    """
    found = []
    for k in range(i, j):
        if test(data, *last_frame(data, packet, bounds[k], bounds[k + 1])):
            found.append(k)
    return found


def parse_control(term: Any) -> tuple[int, int] | None:
    """``(sid, credit)`` of a decoded control term (credit ``CANCEL_CREDIT`` for a cancel)."""
    if type(term) is tuple and len(term) == 3 and term[0] == CREDIT:
        sid, n = term[1], term[2]
        if type(sid) is int and type(n) is int and 0 <= sid < 1 << 64 and 0 < n < CANCEL_CREDIT:
            return sid, n
    elif type(term) is tuple and len(term) == 2 and term[0] == CANCEL:
        if type(term[1]) is int and 0 <= term[1] < 1 << 64:
            return term[1], CANCEL_CREDIT
    return None


class StreamRequest:
    """A decoded ``{stream, M, F, Args[, Opts]}``: ``Opts`` a proplist of ``window``, ``idle_ms``."""

    __slots__ = ("module", "function", "args", "window", "idle_ms")

    def __init__(self, module: str, function: str, args: list[Any], window: int, idle_ms: int) -> None:
        self.module, self.function, self.args = module, function, args
        self.window, self.idle_ms = window, idle_ms


def parse_stream_request(term: Any) -> StreamRequest:
    if not (type(term) is tuple and len(term) in (4, 5) and term[0] == STREAM):
        raise ProtocolError("expected {stream, Module, Function, Args, Options}")
    module, function, args = term[1], term[2], term[3]
    if not isinstance(module, Atom) or not isinstance(function, Atom):
        raise ProtocolError("Module and Function of a stream must be atoms")
    if type(args) is not list:
        raise ProtocolError("Args of a stream must be a proper list")
    window, idle_ms = DEFAULT_WINDOW, DEFAULT_IDLE_MS
    options = term[4] if len(term) == 5 else []
    if type(options) is not list:
        raise ProtocolError("Options of a stream must be a list of {Key, Value}")
    for option in options:
        if not (type(option) is tuple and len(option) == 2 and type(option[1]) is int):
            raise ProtocolError("Options of a stream must be a list of {Key, Integer}")
        key, value = option
        if key == "window" and 1 <= value <= MAX_WINDOW:
            window = value
        elif key == "idle_ms" and 1 <= value < 1 << 32:
            idle_ms = value
        else:
            raise ProtocolError(f"bad stream option {key}: {value} (window 1..{MAX_WINDOW}, idle_ms 1..2^32-1)")
    return StreamRequest(str(module), str(function), args, window, idle_ms)


class Held:
    """Frames of streams whose start reply has not left yet (the dispatcher's side).

    An item may be ready before its stream's start reply is released (calls before it are
    still running): it waits here, so a client never sees an item before the stream's start.
    """

    def __init__(self) -> None:
        self._frames: dict[int, list[Any]] = {}
        self.size = 0  # bytes held

    def __bool__(self) -> bool:
        return bool(self._frames)

    def add(self, sid: int, data: Any) -> None:
        self._frames.setdefault(sid, []).append(data)
        self.size += len(data)

    def ready(self, released: int) -> list[Any]:
        """Frames of every stream whose start has been released (``sid < released``), in order."""
        out = []
        for sid in sorted(s for s in self._frames if s < released):
            for data in self._frames.pop(sid):
                self.size -= len(data)
                out.append(data)
        return out
