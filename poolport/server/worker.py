"""What runs inside a pool process: decode requests, call handlers, encode replies.

A worker is one long-lived loky task. It connects back to the dispatcher over
the link socket, then loops: receive a run of request frames, answer each one
(decode, resolve, call, encode, frame), and send the replies back in chunks.
A chunk is flushed at the end of the run or as soon as ``FLUSH_AFTER_S`` has
passed since the last one, so the dispatcher always knows which call is
running (for timeouts and crash blame) within a millisecond.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from typing import Any, Callable

from poolport.protocol import bert
from poolport.codec import etf, peek
from poolport.handlers import typed  # typed handlers, @poolport.handler, worker_init:
from poolport.handlers.handler import aliases, exposed_name, is_handler, run_worker_init, settings_of
from poolport.config import Config, smallest_timeout
from poolport.errors import ArgumentError, DecodeError, EncodeError, ProtocolError
from poolport.protocol.framing import HEADERS
from poolport.server.link import HEADER, SEQ, Buffer, MessageReader, send_message, tune
from poolport.server.memory import keep_freed_memory
from poolport.server.progress import Counters, Progress
from poolport.server.spin import spin
from poolport.server.stats import CallRecorder
from poolport.server.stream_worker import OpenStream, Receive, pump, start_reply
from poolport.protocol.streams import CONTROL, ITEM, STREAM, parse_stream_request
from poolport.protocol.callbacks import CALLBACK_COUNT, reply_target
from poolport import erlang
from poolport.codec.terms import Atom

FLUSH_AFTER_S = 0.001  # report progress at least this often while a run is being served
FLUSH_BYTES = 1 << 20  # ... and send replies on once this many bytes wait (bounds a chunk's size)
PARENT_CHECK_S = 0.5  # how often a worker checks that its dispatcher is still alive
INFO_MAX_ELEMENTS = 1024  # an {info, Command, Options} packet is a small hint
BUILTIN_MODULE = "$poolport"  # introspection calls answered by the worker itself
# the version byte and the head of {reply, Result} by atom_encoding: b"\x83h\x02d\x00\x05reply" (latin1),
# b"\x83h\x02w\x05reply" (utf8)
_REPLY_PREFIX = {e: etf.encode((bert.REPLY, 0), atom_encoding=e)[:-2] for e in etf.ATOM_ENCODINGS}

log = logging.getLogger("poolport.server.worker")
_clock = time.perf_counter


class _NoProgress:
    """Stands in for shared-memory progress when a Worker is used in-process (tests)."""

    def begin(self, timeout_ms: int = 0) -> None: ...

    def set_timeout(self, timeout_ms: int) -> None: ...

    def end(self) -> None: ...

    def resume(self, timeout_ms: int) -> None: ...

    def clock(self, timeout_ms: int) -> None: ...


class Handlers:
    """Resolves ``module:function`` names to callables, enforcing the allowlist.

    Only public names of allowlisted modules (or their submodules) resolve, and
    only to callables defined in such a module: a name a handler module merely
    imported (``os.system``) is not callable through a request.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._cache: dict[tuple[str, str], Callable[..., Any]] = {}
        self.timeouts: dict[tuple[str, str], int] = {}  # @poolport.handler(timeout_ms=...) by name

    def known(self, module: str, function: str) -> Callable[..., Any] | None:
        """The callable if an earlier request resolved it; never imports or looks anything up."""
        return self._cache.get((module, function))

    def resolve(self, module: str, function: str) -> Callable[..., Any] | tuple[int, str, str]:
        """The callable, or ``(server_code, class, detail)`` saying why not."""
        key = (module, function)
        fn = self._cache.get(key)
        if fn is not None:
            return fn
        if not self.config.allowed(module) or any(p.startswith("_") for p in module.split(".")):
            return (bert.NO_SUCH_MODULE, "ModuleNotAllowed", f"module {module!r} is not in the allowlist")
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is "no such module"
            return (bert.NO_SUCH_MODULE, type(exc).__name__, f"cannot import {module!r}: {exc}")
        fn = None
        if not function.startswith("_"):
            try:  # a module's own __getattr__ (or an odd object in it) may raise anything
                # -- @poolport.handler(name=...): an alias wins; a renamed function only answers to it
                fn = aliases(mod).get(function)
                if fn is None:
                    fn = getattr(mod, function, None)
                    if exposed_name(fn) not in (None, function):
                        fn = None
            except Exception as exc:  # noqa: BLE001
                return (
                    bert.NO_SUCH_FUNCTION,
                    "NoSuchFunction",
                    f"{module}.{function}: looking it up raised {type(exc).__name__}: {_safe_str(exc)}",
                )
        if fn is None or not is_handler(fn):
            what = "" if fn is None else f" (it is a {type(fn).__name__}: only functions can be called)"
            return (bert.NO_SUCH_FUNCTION, "NoSuchFunction", f"{module}.{function} is not a public function{what}")
        owner = getattr(fn, "__module__", None)  # safe: fn is a function, or marked by its author
        if not (isinstance(owner, str) and self.config.allowed(owner)):
            return (
                bert.NO_SUCH_FUNCTION,
                "NoSuchFunction",
                f"{module}.{function} is defined in {owner!r}, which is not allowlisted",
            )
        # -- typed arguments (poolport.handlers.typed): fn itself when it has no annotated parameters
        settings = settings_of(fn)
        if settings is not None and settings.timeout_ms is not None:
            self.timeouts[key] = settings.timeout_ms
        fn = typed.wrap(fn, self.config.none_atom)
        self._cache[key] = fn
        return fn


class Worker:
    """Turns one request payload into one reply payload; never raises.

    Whatever fails while a request is answered (decoding it, resolving or
    converting its arguments, the handler, encoding its result, running out of
    memory in any of these) becomes an error reply for that request: a
    request can never take its worker down (only a crash in native code or a
    kill can). The call's ``Progress`` record spans all of it, so the call's
    timeout covers decoding and encoding too.
    """

    def __init__(
        self,
        config: Config,
        info: dict[str, Any] | None = None,
        progress: Progress | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.config = config
        self.progress = progress or _NoProgress()
        self.counters = counters
        # the caller's timeout of the next call: from an {info, timeout, ...} packet, else the default
        self._caller_ms: int | None = config.caller_timeout_ms or None
        self._next_timeout = self._caller_ms
        self.handlers = Handlers(config)
        self.recorder = CallRecorder()  # per-function counts and handler times (poolport.server.stats)
        self.bare = config.protocol == "bare"
        info = dict(info or {}, worker_pid=os.getpid())
        self.info = {Atom(k): Atom(v) if isinstance(v, str) else v for k, v in info.items()}
        self._none = config.none_atom
        self._atom_encoding = config.atom_encoding
        self._dec = etf.term_codec(config.none_atom, config.atom_encoding)[0]
        self._write = etf.term_writer(config.none_atom, config.atom_encoding)
        self._reply_prefix = _REPLY_PREFIX[config.atom_encoding]
        self._depth = config.max_term_depth - 1  # the arguments sit one level inside the request
        self._elements = config.max_term_elements - 4  # ... after the 4 of {call, M, F, Args}
        self._fast: dict[bytes, tuple[Any, ...]] = {}  # request head bytes -> resolved handler
        self._last: tuple[bytes, tuple[Any, ...] | None] = (b"\x00", None)  # the latest (no term starts 0)
        self._noreply = self._encode(bert.noreply())
        self.opened: OpenStream | None = None  # a stream request just answered: serve_run pumps it
        self.flush: Callable[[], None] = _nothing  # sends what is ready before a callback waits
        # made now, while memory is plentiful: the reply when even an error reply cannot be made
        self._out_of_memory = self._error(
            bert.SERVER, bert.INTERNAL, "MemoryError", "the worker ran out of memory while answering this request"
        )

    def answer(self, data: bytes, start: int, end: int) -> bytes | None:
        """The reply to the request ``data[start:end]``; ``None`` for an ``info`` packet.

        Fast path: requests to the same function share their first bytes
        (``{call, M, F,``), so those bytes map straight to the resolved handler
        and only the arguments are decoded. Everything unusual (bare mode,
        errors, unknown functions) takes :meth:`handle`.
        """
        prefix, entry = self._last
        if data.startswith(prefix, start, end):  # the same function as the request before
            head = start + len(prefix)
        else:
            entry = None
            if not self.bare and end - start > 3 and data[start + 1] == peek.SMALL_TUPLE:
                head = peek.request_head_end(data, start, end)  # {call, M, F
                if head:
                    entry = self._fast.get(data[start:head]) or self._learn(data, start, head)
                    if entry:
                        self._last = (data[start:head], entry)
                elif data[start + 2] == 3 and bert.is_info(data, start, end):
                    self._take_info(data[start:end])
                    return None
        if not entry:
            return self.handle(data[start:end])
        fn, cast, timeout, module, function = entry
        info_ms, self._next_timeout = self._next_timeout, self._caller_ms
        self.progress.begin(smallest_timeout(info_ms, timeout))
        try:
            try:
                args, pos = self._dec(data, head, self._depth, [self._elements])
            except Exception:  # noqa: BLE001 - _answer() reports it properly
                pos = -1
            if pos == end and type(args) is list:
                return self._invoke(fn, cast, module, function, args)
            return self._answer(data[start:end], info_ms)
        except BaseException as exc:  # noqa: BLE001 - the last resort: never lose a request
            return self._internal_error(exc)
        finally:
            self.progress.end()

    def _learn(self, data: bytes, start: int, head: int) -> tuple[Any, ...] | None:
        """Remember the ``{call|cast, M, F,`` head of a function :meth:`handle` has resolved;
        None if unusual or not resolved yet: resolving may import a module, or run a module's
        ``__getattr__``, which must happen inside the call's Progress (its timeout)."""
        try:
            budget = [0]  # atoms only
            kind, pos = self._dec(data, start + 3, 1, budget)
            module, pos = self._dec(data, pos, 1, budget)
            function, pos = self._dec(data, pos, 1, budget)
            if not (
                kind in (bert.CALL, bert.CAST)
                and type(module) is Atom
                and type(function) is Atom
                and module != BUILTIN_MODULE
            ):
                return None
            fn = self.handlers.known(module, function)
            if fn is None:
                return None
            entry = (fn, kind == bert.CAST, self._timeout_for(module, function), str(module), str(function))
        except BaseException:  # noqa: BLE001 - the slow path answers it with the right error
            return None
        self._fast[data[start:head]] = entry
        return entry

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one request payload, or ``None`` for an ``info`` packet (no reply)."""
        if not self.bare and bert.is_info(payload):
            self._take_info(payload)
            return None
        info_ms, self._next_timeout = self._next_timeout, self._caller_ms
        self.progress.begin(smallest_timeout(info_ms, self.config.timeout_ms))  # until resolved
        try:
            return self._answer(payload, info_ms)
        except BaseException as exc:  # noqa: BLE001 - the last resort: never lose a request
            return self._internal_error(exc)
        finally:
            self.progress.end()

    def _take_info(self, payload: bytes) -> None:
        try:
            timeout = bert.info_timeout(
                etf.decode(
                    payload,
                    none_atom=self._none,
                    max_depth=8,
                    max_inflated=self.config.max_frame_bytes,
                    max_elements=INFO_MAX_ELEMENTS,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - an info packet is a hint: never fatal
            log.warning("ignoring an info packet that cannot be read: %s: %s", type(exc).__name__, _safe_str(exc))
            return
        if timeout is not None:
            self._next_timeout = timeout

    def _answer(self, payload: bytes, timeout: int | None) -> bytes:
        try:
            term = etf.decode(
                payload,
                none_atom=self._none,
                max_depth=self.config.max_term_depth,
                max_inflated=self.config.max_frame_bytes,
                max_elements=self.config.max_term_elements,
            )
        except DecodeError as exc:
            return self._error(bert.PROTOCOL, bert.BAD_REQUEST, "DecodeError", str(exc))
        except Exception as exc:  # noqa: BLE001 - MemoryError under max_worker_memory_mb, ...
            return self._error(
                bert.PROTOCOL,
                bert.BAD_REQUEST,
                type(exc).__name__,
                f"the request could not be decoded: {_safe_str(exc)}",
            )
        if not self.bare and type(term) is tuple and term and term[0] == STREAM:
            return self._open_stream(term, timeout)
        try:
            request = bert.parse_bare_request(term) if self.bare else bert.parse_request(term)
        except ProtocolError as exc:
            return self._error(bert.PROTOCOL, bert.BAD_REQUEST, "BadRequest", str(exc))
        if request.module == BUILTIN_MODULE and request.function == "info":
            info = (
                self.info
                if self.counters is None
                else {**self.info, **{Atom(k): v for k, v in self.counters.read().items()}}
            )
            return self._encode_reply(info)
        module = self.config.bare_module if self.bare else request.module
        assert module is not None  # the config refuses protocol: bare without a bare_module
        fn = self.handlers.resolve(module, request.function)
        if isinstance(fn, tuple):
            return self._error(bert.SERVER, *fn)
        self.progress.set_timeout(smallest_timeout(timeout, self._timeout_for(module, request.function)))
        return self._invoke(
            fn,
            request.kind == "cast",
            module,
            request.function,
            request.args,
        )

    def _open_stream(self, term: Any, timeout: int | None) -> bytes:
        """Call a stream's handler and keep its iterator in ``opened``; the start reply is
        written by :func:`serve_run`, which knows the stream's number."""
        try:
            request = parse_stream_request(term)
        except ProtocolError as exc:
            return self._error(bert.PROTOCOL, bert.BAD_REQUEST, "BadRequest", str(exc))
        module, function = request.module, request.function
        fn = self.handlers.resolve(module, function)
        if isinstance(fn, tuple):
            return self._error(bert.SERVER, *fn)
        item_ms = smallest_timeout(timeout, self._timeout_for(module, function))
        self.progress.set_timeout(item_ms)
        try:
            source = fn(*request.args)
        except BaseException as exc:  # noqa: BLE001 - as for a call
            return self._failure(exc, False, module, function)
        try:
            items = iter(source)
        except Exception:  # noqa: BLE001 - no iterator: not a stream
            return self._error(
                bert.SERVER,
                bert.WRONG_KIND,
                "NotAStream",
                f"{module}.{function} returned a {type(source).__name__}, which gives no items: "
                "call it with call, or return an iterable",
            )
        self.opened = OpenStream(items, source, request.window, request.idle_ms, item_ms, module, function)
        return b""

    def encode_term(self, term: Any) -> bytes:
        return self._encode(term)

    def error_term(self, kind: Any, code: int, cls: str, detail: str) -> Any:
        """``{Type, Code, Class, Detail, []}``: a stream's error, without the ``error`` wrapper."""
        return bert.error(kind, code, cls, detail)[1]

    def failure_term(self, exc: BaseException, module: str, function: str) -> Any:
        """The error term of a handler's exception (as :meth:`_failure`), for a stream."""
        return etf.decode(self._failure(exc, False, module, function), none_atom=self._none)[1]

    def encode_item(self, tag: bytes, sid: int, item: Any, header: Any, limit: int) -> bytes:
        """The frame of ``{stream_item, Sid, Item}``; raises with a readable message if it cannot be."""
        term = (ITEM, sid, item)
        try:
            payload = self._encode(term)
        except EncodeError:
            payload = self._encode((ITEM, sid, typed.to_term(item)))  # Structs, dataclasses, Enums
        if len(payload) >= limit:
            raise EncodeError(f"a stream item of {len(payload)} bytes is too big for its {{packet, N}} frame")
        framed_item: bytes = header.pack(len(payload) + len(tag)) + tag + payload
        return framed_item

    def _timeout_for(self, module: str, function: str) -> int:
        """The config's entry, then the decorator's, then the global one."""
        timeouts = self.handlers.timeouts
        handler_ms = timeouts.get((module, function)) if timeouts else None
        return self.config.timeout_for(module, function, handler_ms)

    def _invoke(self, fn: Callable[..., Any], cast: bool, module: str, function: str, args: list[Any]) -> bytes:
        """Call the handler (timed, for poolport.server.stats) and encode what comes of it."""
        began = _clock()
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt, SystemExit too: a handler's end
            self.recorder.record(module, function, _clock() - began, True)
            return self._failure(exc, cast, module, function)
        self.recorder.record(module, function, _clock() - began, False)
        if cast:
            return self._noreply
        if self.bare:
            return self._encode_reply(result)
        try:
            return self._write(self._reply_prefix, result)
        except Exception:  # noqa: BLE001 - the slow path converts or explains
            return self._encode_reply(result)

    def _failure(self, exc: BaseException, cast: bool, module: str, function: str) -> bytes:
        if isinstance(exc, ArgumentError):  # typed arguments did not fit: no traceback from the wrapper
            cls, trace = "ArgumentError", [f"ArgumentError: {exc}"]
        else:
            tb = exc.__traceback__.tb_next if exc.__traceback__ else None  # skip _invoke's frame
            cls = type(exc).__name__
            try:
                trace = "".join(traceback.format_exception(type(exc), exc, tb)).splitlines()
            except Exception:  # noqa: BLE001 - a hostile exception object
                trace = [f"{cls}: {_safe_str(exc)}"]
        if cast:
            log.warning("cast %s.%s raised %s", module, function, "\n".join(trace))
            return self._noreply
        return self._error(bert.USER, bert.USER_ERROR, cls, _safe_str(exc), trace)

    def _encode_reply(self, result: Any) -> bytes:
        try:
            try:
                return self._encode(result if self.bare else bert.reply(result))
            except EncodeError as exc:
                error: Exception = exc
            try:  # -- Structs, dataclasses, Enums (poolport.handlers.typed.to_term), if plain encoding failed
                term = typed.to_term(result)
                return self._encode(term if self.bare else bert.reply(term))
            except EncodeError as exc:
                error = exc
        except (MemoryError, RecursionError) as exc:
            return self._error(
                bert.USER, bert.USER_ERROR, type(exc).__name__, f"the result could not be encoded: {_safe_str(exc)}"
            )
        if not self.bare and _is_iterator(result):
            _close_quietly(result)
            return self._error(
                bert.SERVER,
                bert.WRONG_KIND,
                "IsStream",
                f"the handler returned a {type(result).__name__}: call it with stream to get its items",
            )
        return self._error(bert.USER, bert.USER_ERROR, "EncodeError", f"the result cannot be sent: {error}")

    def _internal_error(self, exc: BaseException) -> bytes:
        """poolport itself failed on this request: say so in its reply, keep serving."""
        try:
            log.error("poolport failed while answering a request: %s: %s", type(exc).__name__, _safe_str(exc))
            return self._error(bert.SERVER, bert.INTERNAL, type(exc).__name__, _safe_str(exc))
        except BaseException:  # noqa: BLE001 - out of memory even for this
            return self._out_of_memory

    def too_big(self, size: int, packet: int) -> bytes:
        """The error sent instead of a reply that cannot fit the port's length header."""
        return self._error(
            bert.USER, bert.USER_ERROR, "EncodeError", f"the reply is {size} bytes, too big for {{packet,{packet}}}"
        )

    def _encode(self, term: Any) -> bytes:
        return etf.encode(term, none_atom=self._none, atom_encoding=self._atom_encoding)

    def _error(self, kind: Any, code: int, cls: str, detail: str, trace: list[str] | None = None) -> bytes:
        return self._encode(bert.error(kind, code, cls, detail, trace, bare=self.bare))


def serve_run(
    worker: Worker,
    run: bytes,
    packet: int,
    send: Callable[[int, Sequence[Buffer]], None],
    start: int = 0,
    first: int | None = None,
    base: int | None = None,
    receive: Receive | None = None,
) -> None:
    """Answer every frame of ``run[start:]``; ``send(count, framed_replies)`` is called as
    progress is made. With ``first`` (the sequence number of the run's first request) every
    reply frame is tagged with its request's sequence number (``reply_tags``). ``base`` is
    that number when replies are not tagged; a stream (see :mod:`poolport.protocol.streams`) is named
    by it. A stream's items are sent after its start reply, taking credit from ``receive``
    (without it, a stream is closed once started)."""
    out: list[bytes] = []
    size = 0

    def flush() -> None:
        """Send the replies made so far (before a handler waits for a callback's answer)."""
        if out:
            send(len(out) // 2, out)
            out.clear()

    worker.flush = flush
    header = HEADERS[packet]
    tag = SEQ.pack if first is not None else None
    limit = (1 << (8 * packet)) - (SEQ.size if tag else 0)
    seq = first if first is not None else base or 0
    pos, n = start, len(run)
    last = time.perf_counter()
    while pos < n:
        begin = pos + packet
        pos = begin + header.unpack_from(run, pos)[0]
        answer = worker.answer(run, begin, pos)
        if answer is None:
            continue
        opened = worker.opened
        if opened is not None:
            answer = start_reply(seq, worker.config.atom_encoding)
        if len(answer) >= limit:
            answer = worker.too_big(len(answer), packet)
        if tag:
            out.append(header.pack(len(answer) + SEQ.size) + tag(seq))
        else:
            out.append(header.pack(len(answer)))
        out.append(answer)
        size += len(answer)
        seq += 1
        if opened is not None:
            worker.opened = None
            send(len(out) // 2, out)
            out.clear()
            size = 0
            pump(worker, opened, seq - 1, packet, tag is not None, send, receive or _no_credit)
            worker.flush = flush
            last = time.perf_counter()
            continue
        now = time.perf_counter()
        if now - last >= FLUSH_AFTER_S or size >= FLUSH_BYTES:
            send(len(out) // 2, out)
            out.clear()
            size, last = 0, now
    if out:
        send(len(out) // 2, out)


def _nothing() -> None:
    pass


def _no_credit(_timeout_s: float) -> None:
    """The ``receive`` of a worker with no link (in-process use): the stream ends at once."""
    return None


def _is_iterator(obj: Any) -> bool:
    try:
        return hasattr(type(obj), "__next__") and hasattr(type(obj), "__iter__")
    except Exception:  # noqa: BLE001
        return False


def _close_quietly(obj: Any) -> None:
    """Close a generator a call returned (its ``finally`` blocks run), whatever that raises."""
    try:
        close = getattr(obj, "close", None)
        if close is not None:
            close()
    except BaseException:  # noqa: BLE001
        pass


def _safe_str(obj: Any) -> str:
    """``str(obj)``, or a placeholder when that raises (a hostile ``__str__``, a huge int)."""
    try:
        return str(obj)
    except BaseException:  # noqa: BLE001
        return f"<{type(obj).__name__} object: str() failed>"


def _limit_memory(megabytes: int) -> None:
    """Cap this worker's address space: a runaway handler gets MemoryError, not the OOM killer."""
    if megabytes:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))


def _isolate_stdout() -> None:
    """Point fd 1 at stderr so a handler's print() can never reach the port."""
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def import_handlers(config: Config) -> list[tuple[str, str]]:
    """Put ``python_path`` first on ``sys.path`` and import every allowlisted module, as a
    worker does before it serves; ``(module, traceback)`` for each that failed."""
    for path in reversed(config.python_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    failed = []
    for module in config.modules:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - SystemExit at import time too: report, go on
            failed.append((module, _import_traceback(exc)))
    return failed


def _import_traceback(exc: BaseException) -> str:
    """The traceback of a failed import without the frames of importlib and poolport: what is
    left is the user's code (and the syntax error's line)."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not (f.filename.startswith("<frozen importlib") or f.filename in (__file__, importlib.__file__))
    ]
    return "".join(
        ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
        + traceback.format_exception_only(type(exc), exc)
    )


def probe_handlers(config: Config) -> str | None:
    """Run in a fresh process before a reload touches any worker: import the handler modules
    and run ``worker_init`` as a new worker will. ``None``, or what failed with its traceback."""
    _isolate_stdout()
    _limit_memory(config.max_worker_memory_mb)
    problems = [f"cannot import allowlisted module {m!r}:\n{tb}" for m, tb in import_handlers(config)]
    if config.worker_init and not problems:
        try:
            run_worker_init(config.worker_init, config.worker_init_args)
        except BaseException:  # noqa: BLE001 - report whatever worker_init raises
            problems.append(f"worker_init {config.worker_init!r} failed:\n{traceback.format_exc()}")
    return "\n".join(problems) or None


def worker_main(
    address: str,
    progress_path: str,
    counters_path: str,
    slot: int,
    config: Config,
    info: dict[str, Any],
    strict: bool = False,
) -> None:
    """Entry point of a pool process (submitted once to its loky executor). A ``strict`` worker
    (one started by a reload) refuses to serve if a handler module does not import."""
    _isolate_stdout()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the dispatcher's to handle
    keep_freed_memory()
    _limit_memory(config.max_worker_memory_mb)
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s poolport[{config.name + ' ' if config.name else ''}worker {slot} "
        f"pid {os.getpid()}] %(levelname)s %(message)s",
    )
    worker = Worker(config, info, Progress(progress_path), Counters(counters_path))
    init_failed = False
    for module, error in import_handlers(config):  # warm up; failures are reported per call
        log.warning("cannot import allowlisted module %r: %s", module, error.splitlines()[-1])
        init_failed = strict
    # -- worker_init (poolport.handler): once per worker, before serving
    if config.worker_init:
        try:
            run_worker_init(config.worker_init, config.worker_init_args)
        except BaseException:  # noqa: BLE001 - any failure stops start-up, loudly
            log.critical("worker_init %r failed:\n%s", config.worker_init, traceback.format_exc())
            init_failed = True
    _exit_with_parent(os.getppid())
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        tune(sock)
        if init_failed:  # hello with pid 0: the dispatcher stops `poolport serve` (exit status 3),
            sock.sendall(HEADER.pack(slot, 0))  # or fails the reload that started this worker
            os._exit(78)
        sock.sendall(HEADER.pack(slot, os.getpid()))
        recorder = worker.recorder

        def send(count: int, replies: Sequence[Buffer]) -> None:
            """The replies, after the report counting their calls (so a reply is never out
            before its call is counted)."""
            send_message(sock, count, replies, recorder.take() if recorder else None)

        reader = MessageReader()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        spin_s = config.idle_spin_us / 1e6
        poll_now = functools.partial(poller.poll, 0)
        inbox = Inbox(sock, reader)
        erlang.install(
            erlang.Link(
                os.getpid(),
                send,
                inbox.read,
                inbox.replies,
                config.packet,
                config.reply_tags,
                worker.encode_term,
                erlang.decoder(config.none_atom, config.max_frame_bytes),
                lambda: worker.flush(),
            )
        )
        runs = inbox.runs
        while True:
            if spin_s:
                spin(poll_now, spin_s)
            messages = reader.read_from(sock)
            if messages is None:
                break
            inbox.sort(messages)
            while runs:
                run = runs.popleft()
                base = SEQ.unpack_from(run)[0]
                first = base if config.reply_tags else None
                serve_run(worker, run, config.packet, send, SEQ.size, first, base, inbox.controls_within)
    except OSError as exc:
        log.info("link to the dispatcher lost: %s", exc)
    finally:
        # Never return to loky: the dispatcher is gone or done with us, and a
        # worker idling on loky's task queue would outlive it.
        os._exit(0)


class Inbox:
    """What the dispatcher sent this worker, sorted as it is read: runs, stream controls
    (credit, cancel) and callback replies. Read in the serving loop, and within a stream or
    a callback, which wait for their own messages and keep the others for later."""

    def __init__(self, sock: socket.socket, reader: MessageReader) -> None:
        self.sock, self.reader = sock, reader
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)
        self.runs: deque[bytes] = deque()
        self.controls: list[tuple[int, int]] = []
        self.replies: dict[int, bytes] = {}  # callback counter -> reply payload

    def sort(self, messages: list[tuple[int, Any]]) -> None:
        for count, data in messages:
            if count == 0:
                self.controls.append(CONTROL.unpack_from(data))
            elif count == CALLBACK_COUNT:
                data = bytes(data)
                target = reply_target(data, 0, len(data))
                if target is not None:
                    self.replies[target[1]] = data
            else:
                self.runs.append(data if type(data) is bytes else bytes(data))

    def read(self, timeout_s: float | None) -> bool:
        """Take what arrives within ``timeout_s`` (None: wait for something); False once the
        dispatcher is gone."""
        wait = None if timeout_s is None else math.ceil(max(0.0, timeout_s) * 1000)
        while self.poller.poll(wait):
            messages = self.reader.read_from(self.sock)
            if messages is None:
                return False
            self.sort(messages)
            wait = 0
        return True

    def controls_within(self, timeout_s: float) -> list[tuple[int, int]] | None:
        """A stream's ``receive``: the controls that arrived within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.controls:
            left = deadline - time.monotonic()
            if not self.read(left):
                return None
            if left <= 0:
                break
        controls, self.controls = self.controls, []
        return controls


def _exit_with_parent(parent: int) -> None:
    """Leave as soon as the dispatcher dies, even in the middle of a long call."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="poolport-parent-watch", daemon=True).start()
