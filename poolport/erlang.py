"""Call the Erlang node from inside a handler: ``poolport.erlang.call`` and ``cast``.

::

    def lookup(key):
        return poolport.erlang.call("ets", "lookup", [poolport.Atom("prices"), key])

The pool runs ``Module:Function(Args...)`` in a process of its own, on the pool's node,
if its ``callbacks`` option allows it (see :mod:`poolport.protocol.callbacks` for the frames).
Outside a worker of ``poolport serve`` (a plain Python process, a test) there is no
Erlang node to call: :class:`~poolport.protocol.callbacks.ErlangError` is raised.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

from poolport.protocol import callbacks
from poolport.codec import etf
from poolport.protocol.callbacks import CALL, CAST, ErlangError
from poolport.protocol.framing import HEADERS
from poolport.server.link import SEQ

__all__ = ["call", "cast", "ErlangError"]


class Link:
    """A worker's way to the Erlang node: installed by ``worker_main``."""

    def __init__(
        self,
        pid: int,
        send: Callable[[int, list[bytes]], None],
        read: Callable[[float | None], bool],
        replies: dict[int, bytes],
        packet: int,
        tags: bool,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self.pid, self.send, self.read, self.replies = pid, send, read, replies
        self.header, self.tag = HEADERS[packet], SEQ.pack(0) if tags else b""
        self.limit = (1 << (8 * packet)) - len(self.tag)
        self.encode, self.decode, self.flush = encode, decode, flush
        self.counter = 0
        self.lock = threading.Lock()  # one callback at a time per worker, whatever thread asks

    def callback(self, kind: Any, module: str, function: str, args: Any, timeout: float | None) -> Any:
        with self.lock:
            return self._callback(kind, module, function, args, timeout)

    def _callback(self, kind: Any, module: str, function: str, args: Any, timeout: float | None) -> Any:
        timeout_ms = callbacks.DEFAULT_TIMEOUT_MS if timeout is None else max(1, round(timeout * 1000))
        self.counter = self.counter % callbacks.MAX_COUNTER + 1
        n = self.counter
        payload = self.encode(callbacks.request(self.pid, n, kind, module, function, args, timeout_ms))
        if len(payload) >= self.limit:
            raise ErlangError("error", f"the callback's arguments take {len(payload)} bytes: too big for a frame")
        self.replies.clear()  # late replies of callbacks given up on
        self.flush()  # the replies (or stream items) ready so far must not wait for this callback
        self.send(callbacks.CALLBACK_COUNT, [self.header.pack(len(payload) + len(self.tag)) + self.tag + payload])
        deadline = time.monotonic() + timeout_ms / 1000 + callbacks.REPLY_GRACE_S
        while n not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ErlangError("exit", f"no reply from the Erlang side within {timeout_ms} ms and a grace period")
            if not self.read(left):
                raise ErlangError("exit", "the link to the dispatcher is lost")
        return callbacks.result(self.decode(self.replies.pop(n)))


_link: Link | None = None


def install(link: Link | None) -> None:
    global _link
    _link = link


def call(module: str, function: str, args: list[Any], timeout: float | None = None) -> Any:
    """``Module:Function(Args...)`` on the pool's node: its result, decoded like a request's
    arguments. ``timeout`` in seconds (default 5): past it the Erlang process running it is
    killed and ErlangError ``exit: timeout`` raised. Raises ErlangError with the Erlang class,
    reason and stack trace (as text) if it fails or is not allowed."""
    return _require().callback(CALL, module, function, args, timeout)


def cast(module: str, function: str, args: list[Any], timeout: float | None = None) -> None:
    """Start ``Module:Function(Args...)`` on the pool's node and return once it has started
    (its result and errors stay there). Raises ErlangError if it is not allowed."""
    _require().callback(CAST, module, function, args, timeout)


def _require() -> Link:
    if _link is None:
        raise ErlangError("error", "no Erlang node to call: poolport.erlang works inside a handler of poolport serve")
    return _link


def decoder(none_atom: str | None, max_bytes: int) -> Callable[[bytes], Any]:
    """How a worker decodes callback replies: as requests, within the same limits."""

    def decode(data: bytes) -> Any:
        return etf.decode(data, none_atom=none_atom, max_inflated=max_bytes)

    return decode
