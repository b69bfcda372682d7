"""Interop: every kind of reply ``poolport serve`` writes, read by independent ETF decoders.

Issue 19: a BERT-RPC client in another language (``bertrpc`` over ``bert`` / ``erlastic``)
failed on every reply, ``KeyError(119)``: poolport wrote every atom as
SMALL_ATOM_UTF8_EXT, which decoders written before UTF-8 atoms do not know.

Two decoders from PyPI, neither sharing code with poolport, read the raw reply bytes:

* ``erlang_py`` reads every tag, and tells which kind of tag carried each atom (a
  ``bytes`` name for ATOM_EXT/SMALL_ATOM_EXT, a ``str`` for the UTF-8 ones): it
  checks every reply in both ``atom_encoding`` settings, atom tags included.
* ``erlastic`` is the decoder under the ``bert`` package the issue's client uses. It
  knows neither maps nor UTF-8 atoms, so it reads, with the default ``latin1``
  setting, every reply that holds no map and no atom outside Latin-1: exactly the
  replies such a client can represent.

Both are declared in the ``test`` extra: a missing one fails this module, never skips it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import erlang  # erlang_py
import erlastic
import pytest

from poolport.codec import etf
from poolport.codec.terms import Atom
from portclient import HANDLERS, PortClient

import sys

sys.path.insert(0, HANDLERS)
from pp_interop import SAMPLES  # noqa: E402 - the handler module's own values

pytestmark = [pytest.mark.e2e]

MAX_FRAME = 4096
A = Atom


def call(function: str, *args: Any) -> tuple[Any, ...]:
    return (A("call"), A("pp_interop"), A(function), list(args))


# ---- what the independent decoders must read ------------------------------------------------


class Sym(NamedTuple):
    """An atom as erlang_py reads it: its name, and the family of tag that carried it."""

    name: str
    tag: str  # "latin1": ATOM_EXT / SMALL_ATOM_EXT; "utf8": SMALL_ATOM_UTF8_EXT / ATOM_UTF8_EXT


def from_erlang_py(x: Any) -> Any:
    """erlang_py's term as plain values: binaries as bytes, strings as lists, atoms as Sym."""
    if isinstance(x, erlang.OtpErlangAtom):
        if isinstance(x.value, bytes):
            return Sym(x.value.decode("latin-1"), "latin1")
        return Sym(x.value, "utf8")
    if isinstance(x, erlang.OtpErlangBinary):
        assert x.bits == 8
        return x.value
    if isinstance(x, bytes):  # STRING_EXT
        return list(x)
    if isinstance(x, list):
        return [from_erlang_py(v) for v in x]
    if isinstance(x, tuple):
        return tuple(from_erlang_py(v) for v in x)
    if isinstance(x, dict):
        return {from_erlang_py(k): from_erlang_py(v) for k, v in x.items()}
    assert x is None or type(x) in (bool, int, float), type(x)
    return x


def for_erlang_py(term: Any, atom_encoding: str) -> Any:
    """What from_erlang_py must give for a poolport ``term`` written with ``atom_encoding``."""
    if isinstance(term, Atom):
        if term in ("true", "false", "undefined"):  # erlang_py reads these as Python constants
            return {"true": True, "false": False, "undefined": None}[term]
        latin1 = atom_encoding == "latin1" and all(ord(c) < 256 for c in term)
        return Sym(str(term), "latin1" if latin1 else "utf8")
    if isinstance(term, str):
        return term.encode()
    if isinstance(term, list):
        return [for_erlang_py(v, atom_encoding) for v in term]
    if isinstance(term, tuple):
        return tuple(for_erlang_py(v, atom_encoding) for v in term)
    if isinstance(term, dict):
        return {for_erlang_py(k, atom_encoding): for_erlang_py(v, atom_encoding) for k, v in term.items()}
    return term


def erlastic_reads(term: Any) -> bool:
    """True if erlastic can decode this term: no map, no atom beyond Latin-1 (in latin1 mode)."""
    if isinstance(term, dict):
        return False
    if isinstance(term, Atom):
        return all(ord(c) < 256 for c in term)
    if isinstance(term, (list, tuple)):
        return all(map(erlastic_reads, term))
    return True


def for_erlastic(term: Any) -> Any:
    """What erlastic must give for a poolport ``term``: atoms as its Atom, strings as bytes."""
    if term is None:
        return erlastic.Atom("undefined")
    if isinstance(term, Atom):
        return {"true": True, "false": False}.get(term, erlastic.Atom(term))
    if isinstance(term, str):
        return term.encode()
    if isinstance(term, list):
        if term and all(type(v) is int and 0 <= v <= 255 for v in term):
            return bytes(term)  # STRING_EXT: erlastic gives bytes
        return [for_erlastic(v) for v in term]
    if isinstance(term, tuple):
        return tuple(for_erlastic(v) for v in term)
    return term


def assert_reads(raw: bytes, term: Any, atom_encoding: str) -> None:
    """Both decoders read ``raw`` as poolport's ``term``, down to types and atom tags."""
    # repr: type-exact (1 vs 1.0 vs True) and order-exact (map entries)
    assert repr(from_erlang_py(erlang.binary_to_term(raw))) == repr(for_erlang_py(term, atom_encoding))
    if atom_encoding == "latin1" and erlastic_reads(term):
        assert repr(erlastic.decode(raw)) == repr(for_erlastic(term))


# ---- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=etf.ATOM_ENCODINGS)
def atom_encoding(request: pytest.FixtureRequest) -> str:
    return request.param


def serve(atom_encoding: str, *flags: str) -> PortClient:
    return PortClient(
        "--workers",
        "1",
        "-m",
        "pp_interop",
        "--atom-encoding",
        atom_encoding,
        "--max-frame-bytes",
        str(MAX_FRAME),
        *flags,
    )


@pytest.fixture(scope="module")
def bert_server(atom_encoding: str):
    with serve(atom_encoding) as client:
        yield client


@pytest.fixture(scope="module")
def bare_server(atom_encoding: str):
    with serve(atom_encoding, "--protocol", "bare", "--bare-module", "pp_interop") as client:
        yield client


# ---- BERT-RPC replies -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_results_of_every_mapped_type(bert_server: PortClient, atom_encoding: str, name: str) -> None:
    raw = bert_server.request_frame(call("value", name.encode()))
    assert raw.startswith(b"\x83h\x02" + (b"d\x00\x05" if atom_encoding == "latin1" else b"w\x05") + b"reply")
    assert_reads(raw, (A("reply"), SAMPLES[name]), atom_encoding)


def test_erlastic_reads_every_result_it_can_represent() -> None:
    """Only maps and atoms beyond Latin-1 are out of its reach (no test above is vacuous)."""
    out_of_reach = {name for name, term in SAMPLES.items() if not erlastic_reads(term)}
    assert out_of_reach == {"non_latin1_atom", "map", "nested"}


def test_cast_is_noreply(bert_server: PortClient, atom_encoding: str) -> None:
    raw = bert_server.request_frame((A("cast"), A("pp_interop"), A("value"), [b"atom"]))
    assert_reads(raw, (A("noreply"),), atom_encoding)


def read_error(raw: bytes, atom_encoding: str, kind: str, code: int, cls: bytes) -> bytes:
    """Check an ``{error, {Type, Code, Class, Detail, Backtrace}}`` reply; returns Detail."""
    term = etf.decode(raw)
    assert term[0] == A("error") and term[1][:3] == (A(kind), code, cls), term
    detail, backtrace = term[1][3:]
    assert type(detail) is bytes and type(backtrace) is list
    assert all(type(line) is bytes for line in backtrace)
    assert_reads(raw, term, atom_encoding)
    return detail


def test_protocol_errors(bert_server: PortClient, atom_encoding: str) -> None:
    bert_server.send_payload(b"\x83m" + bytes(MAX_FRAME))
    detail = read_error(bert_server.recv_frame(), atom_encoding, "protocol", 1, b"FrameTooLarge")
    assert b"max_frame_bytes" in detail
    bert_server.send_payload(b"\x83\xff")
    read_error(bert_server.recv_frame(), atom_encoding, "protocol", 2, b"DecodeError")
    raw = bert_server.request_frame((A("hello"), A("world")))
    read_error(raw, atom_encoding, "protocol", 2, b"BadRequest")


def test_server_errors(bert_server: PortClient, atom_encoding: str) -> None:
    raw = bert_server.request_frame((A("call"), A("os"), A("getcwd"), []))
    read_error(raw, atom_encoding, "server", 1, b"ModuleNotAllowed")
    read_error(bert_server.request_frame(call("nope")), atom_encoding, "server", 2, b"NoSuchFunction")
    read_error(bert_server.request_frame(call("slow")), atom_encoding, "server", 3, b"Timeout")
    read_error(bert_server.request_frame(call("die")), atom_encoding, "server", 4, b"WorkerCrashed")
    assert_reads(bert_server.request_frame(call("value", b"atom")), (A("reply"), A("ok")), atom_encoding)


def test_user_errors(bert_server: PortClient, atom_encoding: str) -> None:
    detail = read_error(
        bert_server.request_frame(call("fail", "no good, café".encode())), atom_encoding, "user", 0, b"ValueError"
    )
    assert detail == "no good, café".encode()
    read_error(bert_server.request_frame(call("unencodable")), atom_encoding, "user", 0, b"EncodeError")


# ---- bare mode (the 2017 seed's protocol) ---------------------------------------------------


@pytest.mark.parametrize("name", ["big_int", "str", "latin1_atom", "non_latin1_atom", "none", "nested"])
def test_bare_results(bare_server: PortClient, atom_encoding: str, name: str) -> None:
    raw = bare_server.request_frame((A("value"), name.encode()))
    assert_reads(raw, SAMPLES[name], atom_encoding)


def read_bare_error(raw: bytes, atom_encoding: str, kind: str, cls: bytes) -> None:
    """Check an ``{error, {Type, Class, Detail}}`` reply."""
    term = etf.decode(raw)
    assert term[0] == A("error") and term[1][:2] == (A(kind), cls) and type(term[1][2]) is bytes, term
    assert_reads(raw, term, atom_encoding)


def test_bare_errors(bare_server: PortClient, atom_encoding: str) -> None:
    bare_server.send_payload(b"\x83m" + bytes(MAX_FRAME))
    read_bare_error(bare_server.recv_frame(), atom_encoding, "protocol", b"FrameTooLarge")
    read_bare_error(bare_server.request_frame(5), atom_encoding, "protocol", b"BadRequest")
    read_bare_error(bare_server.request_frame((A("nope"),)), atom_encoding, "server", b"NoSuchFunction")
    read_bare_error(bare_server.request_frame((A("slow"),)), atom_encoding, "server", b"Timeout")
    read_bare_error(bare_server.request_frame((A("die"),)), atom_encoding, "server", b"WorkerCrashed")
    read_bare_error(bare_server.request_frame((A("fail"), b"bad")), atom_encoding, "user", b"ValueError")
