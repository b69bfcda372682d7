"""BERT-RPC conventions: request shapes, reply and error terms. Pure, no IO.

Requests (BERT-RPC):   ``{call, M, F, Args}``, ``{cast, M, F, Args}``, ``{info, Command, Options}``.
Bare mode (the seed):  ``{Name, Arg1, ...}`` calls ``bare_module.Name(Arg1, ...)``.

Errors are ``{error, {Type, Code, Class, Detail, Backtrace}}`` (bare mode:
``{error, {Type, Class, Detail}}``); the codes below are poolport's contract.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

from poolport.errors import ProtocolError
from poolport.codec.terms import Atom
from poolport.codec import peek
from poolport.protocol.framing import last_frame

PROTOCOL, SERVER, USER = Atom("protocol"), Atom("server"), Atom("user")
CALL, CAST, INFO, REPLY, NOREPLY, ERROR = (Atom(a) for a in ("call", "cast", "info", "reply", "noreply", "error"))

# protocol error codes
BAD_FRAME = 1  # frame over max_frame_bytes, or not a frame at all
BAD_REQUEST = 2  # not decodable ETF, or not a request of the configured protocol
# server error codes
NO_SUCH_MODULE = 1  # not in the allowlist, or not importable
NO_SUCH_FUNCTION = 2  # missing, private (leading underscore) or not callable
TIMEOUT = 3  # the call ran past its timeout; its worker was replaced
WORKER_CRASHED = 4  # the worker process died while running this call (or twice while holding it)
INTERNAL = 5  # poolport itself failed outside the handler (a bug, or out of memory): the worker goes on
WRONG_KIND = 6  # a generator called with `call`, or `stream` of something that gives no items
# user errors: the handler raised (or returned something unencodable)
USER_ERROR = 0
# made by the OTP client itself: a reply of the wrong shape for its request
UNEXPECTED_REPLY = 0

# Every error Class poolport names itself, with its Type and Code: the one table the Erlang
# client and the README are checked against (tests/test_error_codes.py). Other Classes are
# exception names: `server` 1 (the import failed), `server` 5, `user` 0.
ERRORS: dict[str, tuple[Atom, int]] = {
    "FrameTooLarge": (PROTOCOL, BAD_FRAME),
    "DecodeError": (PROTOCOL, BAD_REQUEST),
    "BadRequest": (PROTOCOL, BAD_REQUEST),
    "UnexpectedReply": (PROTOCOL, UNEXPECTED_REPLY),
    "ModuleNotAllowed": (SERVER, NO_SUCH_MODULE),
    "NoSuchFunction": (SERVER, NO_SUCH_FUNCTION),
    "Timeout": (SERVER, TIMEOUT),
    "WorkerCrashed": (SERVER, WORKER_CRASHED),
    "IsStream": (SERVER, WRONG_KIND),
    "NotAStream": (SERVER, WRONG_KIND),
    "ArgumentError": (USER, USER_ERROR),
    "EncodeError": (USER, USER_ERROR),
}


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded call: ``kind`` is ``"call"`` or ``"cast"``."""

    kind: str
    module: str
    function: str
    args: list[Any]


def parse_request(term: Any) -> Request:
    """Validate a BERT-RPC ``call``/``cast`` term."""
    if not (type(term) is tuple and len(term) == 4 and term[0] in (CALL, CAST)):
        raise ProtocolError(f"expected {{call|cast, Module, Function, Args}}, got {_show(term)}")
    kind, module, function, args = term
    if not isinstance(module, Atom):
        raise ProtocolError(f"Module must be an atom, got {_show(module)}")
    if not isinstance(function, Atom):
        raise ProtocolError(f"Function must be an atom, got {_show(function)}")
    if type(args) is not list:
        raise ProtocolError(f"Args must be a proper list, got {_show(args)}")
    return Request(str(kind), str(module), str(function), args)


def parse_bare_request(term: Any) -> Request:
    """Validate a seed-style ``{Name, Arg...}`` term."""
    if not (type(term) is tuple and term and isinstance(term[0], Atom)):
        raise ProtocolError(f"expected {{Name, Arg...}} with an atom Name, got {_show(term)}")
    return Request("call", "", str(term[0]), list(term[1:]))


def info_timeout(term: Any) -> int | None:
    """The timeout in ms carried by ``{info, timeout, [{ms, Ms}]}`` (or ``{info, timeout, Ms}``).

    Returns ``None`` for any other ``info`` packet: BERT-RPC says unknown ones are ignored.
    """
    if not (type(term) is tuple and len(term) == 3 and term[0] == INFO and term[1] == "timeout"):
        return None
    options = term[2]
    if type(options) is int and options >= 0:
        return options
    if type(options) is list:
        for option in options:
            if type(option) is tuple and len(option) == 2 and option[0] == "ms":
                if type(option[1]) is int and option[1] >= 0:
                    return option[1]
    return None


_INFO_HEADS = peek.tuple_heads(3, "info")
_INFO_TUPLES = peek.tuple_heads(3, "info", version=False)


def is_info(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Byte-level test for an ``{info, ...}`` packet at ``data[start:end]`` (payload, no header).

    Lets the dispatcher keep an info packet with the call it precedes without
    decoding anything: calls are 4-tuples, info packets the only 3-tuples.
    Cheap on the hot path: two byte reads rule out every call. A compressed
    term (``term_to_binary(T, [compressed])``) has only its first bytes inflated.
    """
    if len(data) <= start + 8:
        return False
    if data[start + 1] == peek.SMALL_TUPLE:
        return data.startswith(_INFO_TUPLES, start + 1)
    if data[start + 1] != peek.COMPRESSED:
        return False
    head = peek.head(data, start, len(data) if end is None else end, 16)
    return head is not None and head.startswith(_INFO_HEADS)


def reply(result: Any) -> tuple[Any, ...]:
    return (REPLY, result)


def noreply() -> tuple[Any, ...]:
    return (NOREPLY,)


def error(
    kind: Atom, code: int, cls: str, detail: str, backtrace: list[str] | None = None, bare: bool = False
) -> tuple[Any, ...]:
    """The BERT-RPC error term (or the bare-mode one); text goes out as UTF-8 binaries."""
    if bare:
        return (ERROR, (kind, cls.encode(), detail.encode()))
    return (ERROR, (kind, code, cls.encode(), detail.encode(), [line.encode() for line in backtrace or ()]))


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120


def _show(term: Any, limit: int = 120) -> str:
    """A short description of a hostile term: ``repr`` may raise (a 60,000-bit int) or be huge."""
    if type(term) is int and term.bit_length() > 256:
        return f"an integer of {term.bit_length()} bits"
    try:
        text = _REPR.repr(term)  # bounded: a 10-million-element list is not rendered whole
    except Exception:  # noqa: BLE001
        return f"a {type(term).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- which function a request calls, read from its first bytes (statistics, control requests)

HEAD_BYTES = 1024  # read of a request to find its module and function (atoms are at most 1020 bytes)


def request_name(data: bytes, packet: int, begin: int = 0, stop: int | None = None) -> tuple[str, str] | None:
    """``(module, function)`` of the ``{call|cast, M, F, Args}`` in the item ``data[begin:stop]``
    (its frames with their headers; ``{info, ...}`` frames first), read from the head bytes
    only (nothing big is copied); ``None`` if it is not such a request."""
    stop = len(data) if stop is None else stop
    if begin + packet > stop:
        return None
    start, end = last_frame(data, packet, begin, stop)
    head = peek.head(data, start, end, HEAD_BYTES)
    if head is None or head[1:3] != b"h\x04":
        return None
    atoms = peek.read_atoms(head, 3, 3)
    if atoms is None or atoms[0] not in ("call", "cast"):
        return None
    return atoms[1], atoms[2]
