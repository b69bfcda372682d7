"""The worker's side of a stream: pull items from the handler's iterator as credit allows.

The worker answering a ``{stream, ...}`` request has sent its start reply; it then stays in
:func:`pump` until the stream ends, serving nothing else (the dispatcher sends it no run
meanwhile). Items go to the dispatcher in stream messages (link count 0), batched like reply
chunks. The call's ``Progress`` record stays open for the whole stream, its clock restarted
for every item (the call's timeout is per item) and, while the worker waits for credit, set
to the stream's idle limit plus a margin: the dispatcher's backstop if this process stops.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from poolport.protocol import bert
from poolport.codec import etf
from poolport.protocol.framing import HEADERS
from poolport.server.link import SEQ, Buffer
from poolport.protocol.streams import CANCEL_CREDIT, END, FAIL, IDLE_MARGIN_MS, STREAM, STREAM_HEAD

log = logging.getLogger("poolport.server.worker")

FLUSH_AFTER_S = 0.001  # send items on at least this often
FLUSH_BYTES = 1 << 20  # ... or once this many bytes wait

Send = Callable[[int, list[Buffer]], None]
"""``send(count, parts)``: one link message (count 0: a stream message)."""
Receive = Callable[[float], "list[tuple[int, int]] | None"]
"""``receive(timeout_s)``: control messages ``(sid, credit)`` that arrived within ``timeout_s``
(0: only those already there); None once the dispatcher is gone."""


class OpenStream:
    """A stream whose start reply is being sent: its iterator, options and per-item timeout."""

    __slots__ = ("items", "source", "window", "idle_ms", "timeout_ms", "module", "function")

    def __init__(
        self, items: Any, source: Any, window: int, idle_ms: int, timeout_ms: int, module: str, function: str
    ) -> None:
        self.items, self.source = items, source
        self.window, self.idle_ms, self.timeout_ms = window, idle_ms, timeout_ms
        self.module, self.function = module, function


def pump(worker: Any, stream: OpenStream, sid: int, packet: int, tags: bool, send: Send, receive: Receive) -> None:
    """Send the stream's items as credit allows, then its end (or error); always one last message.

    ``worker`` is the :class:`~poolport.server.worker.Worker` (its encoder and progress record).
    """
    progress = worker.progress
    header = HEADERS[packet]
    limit = (1 << (8 * packet)) - (SEQ.size if tags else 0)  # the largest payload a frame holds
    tag = SEQ.pack(sid) if tags else b""
    head = STREAM_HEAD.pack(sid, 0)
    out: list[Buffer] = []
    size = 0
    credit = stream.window
    last = time.perf_counter()
    terminal: Any = None
    next_item = stream.items.__next__

    def framed(term: Any) -> bytes:
        payload = worker.encode_term(term)
        framed_term: bytes = header.pack(len(payload) + len(tag)) + tag + payload
        return framed_term

    def flush() -> None:
        if out:
            send(0, [head, *out])
            out.clear()

    worker.flush = flush
    progress.resume(stream.timeout_ms)
    try:
        while terminal is None:
            controls = receive(0)
            if credit <= 0 and controls == []:
                if out:
                    send(0, [head, *out])
                    out.clear()
                    size = 0
                progress.clock(stream.idle_ms + IDLE_MARGIN_MS)
                controls = receive(stream.idle_ms / 1000)
                if controls == []:
                    terminal = (
                        FAIL,
                        sid,
                        worker.error_term(
                            bert.SERVER,
                            bert.TIMEOUT,
                            "Timeout",
                            f"the stream's consumer took no item for {stream.idle_ms} ms (idle_ms): closed",
                        ),
                    )
                    break
            if controls is None:
                return  # the dispatcher is gone: nobody to tell
            cancelled = False
            for csid, n in controls:
                if csid != sid:
                    continue  # for a stream that has ended: it was sent before the client knew
                if n == CANCEL_CREDIT:
                    cancelled = True
                else:
                    credit += n
            if cancelled:
                terminal = (END, sid)
                break
            if credit <= 0:
                continue
            progress.clock(stream.timeout_ms)
            try:
                item = next_item()
            except StopIteration:
                terminal = (END, sid)
                break
            except BaseException as exc:  # noqa: BLE001 - the handler's failure ends its stream only
                terminal = (FAIL, sid, worker.failure_term(exc, stream.module, stream.function))
                break
            try:
                out.append(worker.encode_item(tag, sid, item, header, limit))
            except BaseException as exc:  # noqa: BLE001 - an item with no ETF mapping ends the stream
                terminal = (FAIL, sid, worker.error_term(bert.USER, bert.USER_ERROR, "EncodeError", str(exc)))
                break
            credit -= 1
            size += len(out[-1])
            now = time.perf_counter()
            if now - last >= FLUSH_AFTER_S or size >= FLUSH_BYTES:
                send(0, [head, *out])
                out.clear()
                size, last = 0, now
    finally:
        _close(stream)
        progress.end()
    out.append(framed(terminal))
    send(0, [STREAM_HEAD.pack(sid, 1), *out])


def _close(stream: OpenStream) -> None:
    """Close a generator (its ``finally`` blocks run); a close that raises is only logged."""
    close = getattr(stream.source, "close", None) or getattr(stream.items, "close", None)
    if close is None:
        return
    try:
        close()
    except BaseException as exc:  # noqa: BLE001
        log.warning("closing stream %s.%s raised %s: %s", stream.module, stream.function, type(exc).__name__, exc)


def start_reply(sid: int, atom_encoding: etf.AtomEncoding) -> bytes:
    """The payload of a stream's start reply, ``{stream, Sid}``: also how the dispatcher knows it."""
    return etf.encode((STREAM, sid), atom_encoding=atom_encoding)
