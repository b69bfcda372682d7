"""The reserved ``'$poolport'`` requests the dispatcher answers itself (sans-IO).

``'$poolport'`` is no Python module name, so these never shadow a handler.
``info`` is answered by a worker (proof that one is up); the operations below
change or read the pool as a whole, which only the dispatcher sees:

* ``stats()``: per-function statistics, queue depth, worker restarts by cause;
* ``resize(N)``: the pool's worker count;
* ``reload()``: start a rolling restart of the workers; answers a *ticket* at
  once (the reply keeps its place in request order and must not wait for the
  reload, or every later reply would wait with it);
* ``reload_status(Ticket)``: ``running``, ``ok`` or ``{error, Text}``;
* ``reload_config()``: re-read the configuration file.

The dispatcher does not decode requests. A segment is searched once for the
bytes ``$poolport`` (a C-speed scan); only where they occur are items read
(:func:`find`), and a control item is answered in its place in the sequence
while the items around it go to the workers as usual (:func:`split`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from poolport.protocol import bert
from poolport.codec import etf
from poolport.protocol.framing import Segment, last_frame
from poolport.protocol.bert import request_name

MODULE = "$poolport"
MARKER = MODULE.encode()
FUNCTIONS = frozenset(("stats", "resize", "reload", "reload_status", "reload_config"))
MAX_CONTROL_BYTES = 4096  # a control request is tiny; a bigger one is refused, not decoded
KEPT_RESULTS = 64  # finished reloads whose outcome reload_status still tells


@dataclass(frozen=True)
class Control:
    """A control request: ``kind`` ``"call"`` or ``"cast"``; ``args`` ``None`` if unreadable."""

    kind: str
    function: str
    args: list[Any] | None


def find(segment: Segment, packet: int) -> list[int]:
    """Indexes of the segment's items that are control requests (usually none, found fast)."""
    bounds, data = segment.bounds, segment.data
    if data.find(MARKER, bounds[0], bounds[-1]) < 0:
        return []
    hits = []
    for k in range(len(bounds) - 1):
        start, end = bounds[k], bounds[k + 1]
        if data.find(MARKER, start, end) < 0:
            continue
        name = request_name(data, packet, start, end)
        if name is not None and name[0] == MODULE and name[1] in FUNCTIONS:
            hits.append(k)
    return hits


def split(segment: Segment, hits: list[int]) -> Iterator[Segment | bytes]:
    """The segment in order: runs of ordinary items as segments, each control item as bytes."""
    bounds, data = segment.bounds, segment.data
    start = 0
    for k in hits:
        if k > start:
            yield Segment(data, bounds[start : k + 1])
        yield data[bounds[k] : bounds[k + 1]]
        start = k + 1
    if start < len(bounds) - 1:
        yield Segment(data, bounds[start:])


def parse(item: bytes, packet: int) -> Control:
    """The control request in an item found by :func:`find` (its last frame)."""
    start, end = last_frame(item, packet)
    payload = item[start:end]
    name = request_name(item, packet)
    function = name[1] if name else ""
    kind = "call"
    if len(payload) > MAX_CONTROL_BYTES:
        return Control(kind, function, None)
    try:
        request = bert.parse_request(etf.decode(payload, max_depth=8, max_elements=64, max_inflated=MAX_CONTROL_BYTES))
    except Exception:  # noqa: BLE001 - any unreadable control request gets an error reply
        return Control(kind, function, None)
    return Control(request.kind, request.function, request.args)


class Tickets:
    """Reload requests and their outcomes.

    ``request()`` answers the generation that will serve the request: the next
    one to start. A request made while a reload runs is served by another one
    after it (the running one may have imported the code before the edit the
    caller made).
    """

    def __init__(self) -> None:
        self.started = 0  # generations started so far (the running one included)
        self.wanted = 0  # the highest generation asked for
        self.running = False
        self.results: dict[int, str | None] = {}  # generation -> None (ok) or the error text

    def request(self) -> int:
        self.wanted = self.started + 1
        return self.wanted

    def due(self) -> bool:
        """True if a reload should start now."""
        return not self.running and self.wanted > self.started

    def start(self) -> int:
        self.started += 1
        self.running = True
        return self.started

    def finish(self, error: str | None) -> None:
        self.running = False
        self.results[self.started] = error
        for old in [g for g in self.results if g <= self.started - KEPT_RESULTS]:
            del self.results[old]

    def status(self, ticket: int) -> str | tuple[str, str]:
        """``"running"`` (or not started yet), ``"ok"``, ``("error", text)``, or ``"unknown"``."""
        if ticket > self.started or (ticket == self.started and self.running):
            return "running" if ticket <= self.wanted else "unknown"
        if ticket in self.results:
            error = self.results[ticket]
            return "ok" if error is None else ("error", error)
        return "unknown"
