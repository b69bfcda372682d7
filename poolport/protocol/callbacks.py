"""Callbacks: a handler calling a function of the Erlang node, over the same port. Sans-IO.

::

    handler ─poolport.erlang.call─▶ worker ══link (count CALLBACK)══▶ dispatcher ─▶ stdout
      {callback, Pid, N, call | cast, Module, Function, Args, TimeoutMs}      (outside the reply order)
    handler ◀── result or ErlangError ◀══link (count CALLBACK)══ dispatcher ◀─ stdin
      {callback_reply, Pid, N, {ok, Result} | {error, Class, Reason, Stack} | ok}

``Pid`` (the worker's OS pid) and ``N`` (its callback counter) name the callback: the
dispatcher sends the reply to the worker process of that pid, or drops it if that process
is gone. A worker has at most one callback waiting (a cast waits for ``ok``, the Erlang
side's receipt), so callbacks add at most one frame per worker to what the port holds.
The Erlang side runs only what its ``callbacks`` pool option allows; a client that never
allows any answers every callback with an error, and one that never sees a handler call
back never sees these frames.
"""

from __future__ import annotations

from typing import Any

from poolport.errors import PoolportError
from poolport.codec import peek
from poolport.codec.terms import Atom

CALLBACK_COUNT = 0xFFFFFFFF  # link messages of callbacks carry this count (runs and chunks: 1 or more)
CALLBACK, CALLBACK_REPLY = Atom("callback"), Atom("callback_reply")
CALL, CAST, OK, ERROR = Atom("call"), Atom("cast"), Atom("ok"), Atom("error")
DEFAULT_TIMEOUT_MS = 5000  # a callback's time on the Erlang side, unless the handler says otherwise
REPLY_GRACE_S = 5.0  # a worker gives up waiting this long after the callback's own timeout
MAX_COUNTER = (1 << 31) - 1  # counters stay small integers: the dispatcher reads them without decoding


class ErlangError(PoolportError):
    """A callback failed on the Erlang side: ``erlang_class`` (``error``, ``exit``, ``throw``),
    ``reason`` and ``stacktrace`` as Erlang prints them; or it was refused (not in the pool's
    ``callbacks`` option), timed out, or the Erlang side did not answer."""

    def __init__(self, erlang_class: str, reason: str, stacktrace: str = "") -> None:
        super().__init__(f"{erlang_class}: {reason}")
        self.erlang_class, self.reason, self.stacktrace = erlang_class, reason, stacktrace


_REPLY_HEADS = peek.tuple_heads(4, "callback_reply")
HINT = b"callback_reply"


def is_reply(data: bytes, start: int, end: int) -> bool:
    """Byte-level test for ``{callback_reply, Pid, N, Result}`` at ``data[start:end]`` (payload)."""
    return end - start > 20 and data.startswith(_REPLY_HEADS, start)


def reply_target(data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """``(Pid, N)`` of a callback reply payload, read without decoding its result."""
    pos = peek.atom_end(data, start + 3, end)
    ints = peek.small_ints(data, pos, end, 2) if pos else None
    return (ints[0], ints[1]) if ints else None


def request(
    pid: int, counter: int, kind: Atom, module: str, function: str, args: list[Any], timeout_ms: int
) -> tuple[Any, ...]:
    """The ``{callback, ...}`` term a worker sends."""
    if not isinstance(module, str) or not isinstance(function, str):
        raise TypeError("module and function must be str (or poolport.Atom)")
    if not isinstance(args, (list, tuple)):
        raise TypeError("args must be a list")
    return (CALLBACK, pid, counter, kind, Atom(module), Atom(function), list(args), timeout_ms)


def result(term: Any) -> Any:
    """What ``poolport.erlang.call`` returns for a decoded reply; raises ErlangError for an error."""
    if not (type(term) is tuple and len(term) == 4 and term[0] == CALLBACK_REPLY):
        raise ErlangError("error", f"a callback reply of the wrong shape: {term!r}"[:300])
    answer = term[3]
    if answer == OK:
        return None
    if type(answer) is tuple and len(answer) == 2 and answer[0] == OK:
        return answer[1]
    if type(answer) is tuple and len(answer) == 4 and answer[0] == ERROR:
        raise ErlangError(*(_text(x) for x in answer[1:]))
    raise ErlangError("error", f"a callback reply of the wrong shape: {answer!r}"[:300])


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)
