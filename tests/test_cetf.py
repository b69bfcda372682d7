"""Differential tests: the C accelerator (poolport.codec._cetf) against the pure-Python codec.

The Python codec in poolport/codec/etf.py is the reference. For every input both
backends must give the same bytes, or equal terms of exactly the same types, or
the same exception type and message. Both backends are driven through etf's own
entry points (``term_codec``, ``decode``, ``encode``) with the module switched
between them, so the integration is tested too; the Python decoders are shared,
as in production, so the C decoder's Python fallback sees the same atom memo.
"""

from __future__ import annotations

import collections
import enum
import gc
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from etf_strategies import huge_ints, mutated, opaque_blobs, terms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolport.codec import etf
from poolport.codec.terms import Atom, BitString, ImproperList, MapKey, Pid

try:
    from poolport.codec import _cetf
except ImportError:  # no C compiler when the package was installed
    _cetf = None

A = Atom
NOT_BUILT = (
    "poolport.codec._cetf is not built (no C compiler when poolport was installed); "
    "the pure-Python codec is in use. CI installs gcc, so there it must be built"
)
needs_c = pytest.mark.skipif(_cetf is None, reason=NOT_BUILT)


def test_accelerator_is_built_when_required() -> None:
    """CI sets POOLPORT_REQUIRE_ACCEL=1 so the tests below can never be skipped silently."""
    if os.environ.get("POOLPORT_REQUIRE_ACCEL") == "1":
        assert _cetf is not None, NOT_BUILT


def test_accelerated_flag_follows_build_and_environment() -> None:
    wanted = os.environ.get("POOLPORT_PURE_PYTHON", "") in ("", "0")
    assert etf.ACCELERATED is (_cetf is not None and wanted)
    dec, enc = etf.term_codec()
    if etf.ACCELERATED:
        assert type(dec.__self__) is _cetf.Decoder
        assert type(enc.__self__) is _cetf.Encoder
    else:
        assert dec is etf._DECODERS["undefined"]
        assert enc is etf._ENCODERS[("undefined", "latin1")]


# ---- switching etf between the backends -------------------------------------------------

_ACTIVE: dict[bool, tuple[dict[Any, Any], ...]] = {
    accelerated: ({}, {}, {e: {} for e in etf.ATOM_ENCODINGS}) for accelerated in (False, True)
}


@contextmanager
def backend(accelerated: bool) -> Iterator[None]:
    """etf.decode/encode/term_codec on the C (True) or pure-Python (False) codec."""
    saved = etf.ACCELERATED, etf._ACTIVE_DECODERS, etf._ACTIVE_ENCODERS, etf._WRITERS
    etf.ACCELERATED = accelerated
    etf._ACTIVE_DECODERS, etf._ACTIVE_ENCODERS, etf._WRITERS = _ACTIVE[accelerated]
    try:
        yield
    finally:
        etf.ACCELERATED, etf._ACTIVE_DECODERS, etf._ACTIVE_ENCODERS, etf._WRITERS = saved


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # noqa: BLE001 - the type and message are what is compared
        return ("raised", type(exc), str(exc))


def same(a: Any, b: Any) -> bool:
    """Equal and of exactly the same types all the way down (Atom vs str, bool vs int, -0.0)."""
    todo = [(a, b)]
    while todo:  # a loop, not recursion: the deep-term tests nest hundreds of levels
        a, b = todo.pop()
        t = type(a)
        if t is not type(b):
            return False
        if t is float:
            if struct.pack(">d", a) != struct.pack(">d", b):
                return False
        elif t is list or t is tuple:
            if len(a) != len(b):
                return False
            todo.extend(zip(a, b))
        elif t is dict:
            if len(a) != len(b):
                return False
            todo.extend(zip(a, b))  # keys, in order
            todo.extend(zip(a.values(), b.values()))
        elif t is MapKey:
            todo.append((a.term, b.term))
        elif t is ImproperList:
            todo.append((a.items, b.items))
            todo.append((a.tail, b.tail))
        elif a != b:
            return False
    return True


def assert_same_outcome(py: tuple[Any, ...], c: tuple[Any, ...]) -> None:
    if py[0] == "ok" and c[0] == "ok":
        assert same(py[1], c[1]), (py, c)
    else:
        assert py == c


def check_decode(
    data: bytes, none_atom: str | None = "undefined", max_depth: int = 512, max_elements: int = etf.DEFAULT_MAX_ELEMENTS
) -> None:
    """decode() and the raw dec agree, on the term and on the element budget it leaves;
    Python runs first (see the module docstring)."""
    results = {}
    for accelerated in (False, True):
        with backend(accelerated):
            dec = etf._decoder(none_atom)  # term_codec() needs a str none_atom for its enc
            budget = [max_elements]
            results[accelerated] = (
                outcome(etf.decode, data, none_atom=none_atom, max_depth=max_depth, max_elements=max_elements),
                outcome(dec, data, 1, max_depth, budget),
                ("budget", budget),
            )
    for py, c in zip(results[False], results[True]):
        assert_same_outcome(py, c)


def elements_of(data: bytes) -> int:
    """The elements decoding ``data`` charges, as the pure-Python decoder counts them."""
    budget = [etf.DEFAULT_MAX_ELEMENTS]
    with backend(False):
        etf._decoder("undefined")(data, 1, 512, budget)
    return etf.DEFAULT_MAX_ELEMENTS - budget[0]


def check_encode(term: Any, none_atom: str = "undefined", atom_encoding: str = "latin1") -> bytes | None:
    """encode() and the raw enc agree; returns the encoding (None if it raised)."""
    results = {}
    for accelerated in (False, True):
        with backend(accelerated):
            _, enc = etf.term_codec(none_atom, atom_encoding)
            parts: list[bytes] = []
            raw = outcome(enc, term, parts.append)
            results[accelerated] = (
                outcome(etf.encode, term, none_atom=none_atom, atom_encoding=atom_encoding),
                outcome(etf.encode, term, none_atom=none_atom, atom_encoding=atom_encoding, compressed=6),
                raw if raw[0] == "raised" else ("ok", b"".join(parts)),
            )
    for py, c in zip(results[False], results[True]):
        assert_same_outcome(py, c)
    first = results[False][0]
    return first[1] if first[0] == "ok" else None


# ---- strategies ---------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 300


class Name(str):
    pass


class Blob(bytes):
    pass


class Point(NamedTuple):
    x: Any
    y: Any


class Unencodable:
    pass


def _odd_leaves() -> st.SearchStrategy[Any]:
    """What encode takes (or refuses) but decode never makes."""
    return st.one_of(
        st.text(max_size=10),
        st.sampled_from(
            [
                "\ud800",
                "a\udfffb",
                "é" * 3,
                A("\ud800"),
                A("a" * 255),
                A("a" * 256),
                A("é" * 200),
                A("é" * 255),
                A("ÿ" * 255),  # the longest ATOM_EXT (latin1)
                A("é" * 254 + "€"),  # not Latin-1: ATOM_UTF8_EXT either way
                A("\x00"),
                A("true"),
                A("undefined"),
                A(""),
                Name("n"),
                Blob(b"b"),
                bytearray(b"ba"),
                memoryview(b"mv"),
                Color.RED,
                float("nan"),
                float("inf"),
                -float("inf"),
                -0.0,
                2**63 - 1,
                2**63,
                -(2**63),
                -(2**63) - 1,
                2**64 - 1,
                2**64,
                -(2**64),
                Unencodable(),
                complex(1, 2),
                BitString(b"\xff", 8),
                BitString(b"\xff\xff", 3),
                Pid(b"X" + b"w\x01n" + bytes(12)),
            ]
        ),
        huge_ints,
        st.integers(),
        st.floats(),
    )


def _odd_containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    small = st.lists(children, max_size=4)
    return st.one_of(
        small,
        small.map(tuple),
        small.map(set_of_hashables),
        st.tuples(children, children).map(lambda kv: Point(*kv)),
        st.lists(st.tuples(children, children), max_size=3).map(dict_of_hashables),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda kvs: collections.OrderedDict(dict_of_hashables(kvs))
        ),
        st.builds(ImproperList, small, children),
        st.builds(MapKey, children),
        st.lists(st.integers(min_value=-1, max_value=256), max_size=6),  # charlist or not
        st.lists(st.booleans(), max_size=3),  # bools are not chars
    )


def set_of_hashables(items: list[Any]) -> frozenset[Any]:
    keep = set()
    for x in items:
        try:
            keep.add(x)
        except Exception:  # noqa: BLE001 - unhashable, or a MapKey of something unencodable
            pass
    return frozenset(keep)


def dict_of_hashables(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = {}
    for k, v in pairs:
        try:
            out[k] = v
        except Exception:  # noqa: BLE001 - as above
            pass
    return out


def encodable_or_not(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.one_of(_odd_leaves(), terms(max_leaves=3)),
        _odd_containers,
        max_leaves=max_leaves,
    )


_F15 = struct.pack(">d", 1.5)
TOKENS = [  # pieces of ETF: glued together at random they make plausible, often odd, terms
    b"a\x01",
    b"a\xff",
    b"b\xff\xff\xff\xfe",
    b"b\x7f\xff\xff\xff",
    b"n\x00\x00",
    b"n\x00\x01",
    b"n\x01\x01\x07",
    b"n\x08\x01" + b"\xff" * 8,
    b"n\x08\x00" + b"\xff" * 8,
    b"n\x08\x01" + bytes(7) + b"\x80",
    b"n\x09\x00" + bytes(8) + b"\x01",
    b"o\x00\x00\x00\x01\x00\x05",
    b"o\xff\xff\xff\xff\x00",
    b"F" + _F15,
    b"F\x80" + bytes(7),
    b"F\x7f\xf0" + bytes(6),
    b"F\x7f\xf8" + bytes(6),
    b"c1.50000000000000000000e+00" + bytes(5),
    b"w\x00",
    b"w\x01a",
    b"w\x01b",
    b"w\x04true",
    b"w\x05false",
    b"w\x09undefined",
    b"w\x03nil",
    b"w\x02\xc3\xa9",
    b"w\x02\xff\xfe",
    b"w\x03\xed\xa0\x80",
    b"w\x05ab",
    b"s\x01a",
    b"s\x04true",
    b"s\x01\xe9",
    b"s\x02\xc3\xa9",
    b"d\x00\x02\xc3\xa9",
    b"d\x00\x01a",
    b"d\x00\x04true",
    b"d\x01\x00" + b"a" * 256,
    b"v\x00\x01a",
    b"v\x01\x90" + "é".encode() * 200,
    b"v\x01\x01" + b"a" * 257,
    b"m\x00\x00\x00\x00",
    b"m\x00\x00\x00\x01x",
    b"m\x00\x00\x00\x05ab",
    b"m\xff\xff\xff\xff",
    b"k\x00\x00",
    b"k\x00\x02ab",
    b"k\x00\x05a",
    b"M\x00\x00\x00\x01\x03\xff",
    b"j",
    b"l\x00\x00\x00\x00",
    b"l\x00\x00\x00\x01",
    b"l\x00\x00\x00\x02",
    b"l\xff\xff\xff\xff",
    b"h\x00",
    b"h\x01",
    b"h\x02",
    b"h\xff",
    b"i\x00\x00\x00\x01",
    b"i\xff\xff\xff\xff",
    b"t\x00\x00\x00\x00",
    b"t\x00\x00\x00\x01",
    b"t\x00\x00\x00\x02",
    b"t\xff\xff\xff\xff",
    b"Xw\x01n" + bytes(12),
    b"q" + b"w\x01m" + b"w\x01f" + b"a\x01",
    b"P\x00\x00\x00\x01",
    b"R\x00",
    b"y",
    b"\x00",
    b"\xff",
]


@st.composite
def token_soup(draw: st.DrawFn) -> bytes:
    return b"\x83" + b"".join(draw(st.lists(st.sampled_from(TOKENS), max_size=14)))


none_atoms = st.sampled_from(["undefined", "nil", None, "true"])
atom_encodings = st.sampled_from(etf.ATOM_ENCODINGS)
depths = st.sampled_from([512, 0, 1, 2, 3, 5])
budgets = st.sampled_from([etf.DEFAULT_MAX_ELEMENTS, 0, 1, 2, 3, 5, 8, 20])  # max_elements

# ---- differential properties -------------------------------------------------------------


@needs_c
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(terms(), st.sampled_from(["undefined", "nil", "nïl", "ниль"]), atom_encodings)
def test_terms_encode_and_decode_the_same(term: Any, none_atom: str, atom_encoding: str) -> None:
    data = check_encode(term, none_atom, atom_encoding)
    assert data is not None
    check_decode(data, none_atom)
    check_decode(data, none_atom, max_depth=3)
    used = elements_of(data)
    for max_elements in {used, max(used - 1, 0), used // 2, 1, 0}:
        check_decode(data, none_atom, max_elements=max_elements)


@needs_c
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(huge_ints, opaque_blobs().map(etf.decode)), atom_encodings)
def test_huge_ints_and_opaque_terms(term: Any, atom_encoding: str) -> None:
    check_decode(check_encode(term, atom_encoding=atom_encoding) or b"")


@needs_c
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(encodable_or_not(), st.sampled_from(["undefined", "nil"]), atom_encodings)
def test_odd_and_unencodable_objects_encode_the_same(term: Any, none_atom: str, atom_encoding: str) -> None:
    data = check_encode(term, none_atom, atom_encoding)
    if data is not None:
        check_decode(data, none_atom)


@needs_c
@settings(max_examples=700)
@given(mutated(token_soup()), none_atoms, depths, budgets)
def test_mutated_bytes_decode_the_same(data: bytes, none_atom: str | None, depth: int, budget: int) -> None:
    check_decode(data, none_atom, depth, budget)


@needs_c
@settings(max_examples=700)
@given(token_soup(), none_atoms, depths, budgets)
def test_token_soup_decodes_the_same(data: bytes, none_atom: str | None, depth: int, budget: int) -> None:
    check_decode(data, none_atom, depth, budget)


@needs_c
@given(st.binary(max_size=100))
def test_random_bytes_decode_the_same(data: bytes) -> None:
    check_decode(data)
    check_decode(b"\x83" + data)


# ---- chosen cases ---------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize(
    "body",
    [
        b"t\x00\x00\x00\x02w\x01aa\x01w\x01aa\x02",  # duplicate atom keys
        b"t\x00\x00\x00\x02w\x04truea\x01a\x01a\x02",  # True and 1 merge in Python
        b"t\x00\x00\x00\x02F" + bytes(8) + b"a\x01F\x80" + bytes(7) + b"a\x02",  # 0.0, -0.0
        b"t\x00\x00\x00\x02a\x01a\x01F\x3f\xf0" + bytes(6) + b"a\x02",  # 1 and 1.0
        b"t\x00\x00\x00\x01ja\x01",  # list key
        b"t\x00\x00\x00\x01h\x01ja\x01",  # tuple holding a list
        b"t\x00\x00\x00\x02w\x01aa\x01t\x00\x00\x00\x00a\x02",  # map key after an atom
        b"t\x00\x00\x00\x02w\x01aa\x01w\x01aa\x02",
        b"t\x00\x00\x00\x03w\x01aa\x01w\x01aa\x02ja\x03",  # duplicate, then a list key
        b"l\x00\x00\x00\x01a\x01a\x02",  # improper
        b"l\x00\x00\x00\x01a\x01k\x00\x01\x02",  # STRING_EXT tail
        b"l\x00\x00\x00\x01a\x01l\x00\x00\x00\x01a\x02j",  # LIST_EXT tail
        b"l\x00\x00\x00\x00a\x01",  # no elements, just a tail
        b"l\x00\x00\x00\x01a\x01",  # truncated before the tail
        b"h\x02w\x05ab",  # truncated atom
        b"h\x02w\x00w\x05",  # truncated atom whose prefix is a known atom
        b"F\x7f\xf0" + bytes(6),  # inf
        b"n\x09\x01" + bytes(8) + b"\x01",
        b"n\x08\x01" + bytes(7) + b"\x80",  # -2**63
        b"n\x08\x01" + b"\xff" * 8,  # -(2**64 - 1)
        b"n\x00\x01",  # negative zero digits
        b"o\x00\x00\x00\x02\x01\x01\x01",
        b"v\x01\x90" + "é".encode() * 200,
        b"d\x01\x00" + b"a" * 256,
        b"w\x03\xed\xa0\x80",  # a surrogate in UTF-8
        b"s\x02\xe9\xe9",  # latin-1
        b"s\x02\xc3\xa9",  # latin-1 that is valid UTF-8 too: not "\xe9"
        b"h\x02d\x00\x02\xc3\xa9w\x02\xc3\xa9",  # the same bytes as latin-1 and UTF-8
        b"h\x01Xw\x01n" + bytes(12),
        b"h\x02M\x00\x00\x00\x01\x03\xffa\x01",
        b"m\xff\xff\xff\xff",
        b"l\xff\xff\xff\xff",
        b"t\x7f\xff\xff\xff",
        b"i\xff\xff\xff\xffj",
        # every leaf whole, so that every cut of it is checked below
        b"a\x05",
        b"b\x00\x00\x01\x00",
        b"F" + _F15,
        b"n\x03\x00abc",
        b"o\x00\x00\x00\x03\x01abc",
        b"m\x00\x00\x00\x03abc",
        b"k\x00\x03abc",
        b"w\x03abc",
        b"s\x03abc",
        b"d\x00\x03abc",
        b"v\x00\x03abc",
        b"h\x02a\x01a\x02",
        b"i\x00\x00\x00\x01a\x01",
        b"t\x00\x00\x00\x01a\x01a\x02",
    ],
)
@pytest.mark.parametrize("none_atom", ["undefined", None, "true"])
def test_chosen_bytes_decode_the_same(body: bytes, none_atom: str | None) -> None:
    for depth in (512, 1, 0):
        check_decode(b"\x83" + body, none_atom, depth)
        for cut in range(1, len(body)):
            check_decode(b"\x83" + body[:cut], none_atom, depth)


@needs_c
@pytest.mark.parametrize("n", [1, 255, 256, 65535, 65536])
def test_charlist_length_limit(n: int) -> None:
    for term in ([7] * n, [7] * (n - 1) + [256], [7] * (n - 1) + [True], list(range(256)) * (n // 256)):
        data = check_encode(term)
        assert data is not None
        check_decode(data)


@needs_c
def test_long_binaries_and_strings() -> None:
    """Long runs are spliced into the output rather than copied twice; the bytes must not tell."""
    for n in (4095, 4096, 4097, 70000):
        term = [
            b"x" * n,
            (A("a"), "y" * n, bytearray(b"z" * n)),  # ASCII str; bytearray takes the Python path
            {A("k"): "é" * n, b"k" * n: [1, b"", Pid(b"Xw\x01n" + bytes(12))]},
            memoryview(b"m" * n),
            "\ud800" * (n // 1000) if n == 4097 else b"",  # unencodable: both raise
        ]
        data = check_encode(term)
        if data is not None:
            check_decode(data)
    check_encode(b"q" * 5000)


def _nested(kind: str, levels: int) -> Any:
    term: Any = 1
    for _ in range(levels):
        term = {A("k"): term} if kind == "map" else [term] if kind == "list" else (term,)
    return term


@needs_c
@pytest.mark.parametrize("kind", ["list", "tuple", "map"])
def test_deep_terms_cross_from_c_into_python(kind: str) -> None:
    for levels in (199, 200, 201, 450):
        data = check_encode(_nested(kind, levels))
        assert data is not None
        for depth in (512, levels, levels - 1, 250):
            check_decode(data, max_depth=depth)


@needs_c
def test_cyclic_and_mutating_terms() -> None:
    loop: list[Any] = []
    loop.append(loop)
    check_encode(loop)
    with backend(True):
        with pytest.raises(etf.EncodeError, match="nested too deeply"):
            etf.encode({A("a"): (loop,)})

    class Shrinks(int):  # int() of it empties the list being encoded
        def __int__(self) -> int:
            victim.clear()
            return 7

    victim: list[Any] = []
    for accelerated in (False, True):
        victim[:] = [Shrinks(1), 2, 3]
        with backend(accelerated):
            got = outcome(etf.encode, victim)
        assert got == ("ok", b"\x83l\x00\x00\x00\x03a\x07j")

    class Grows(int):  # int() of it adds to the dict being encoded
        def __int__(self) -> int:
            target[A("new")] = 1
            return 7

    target: dict[Any, Any] = {}
    results = []
    for accelerated in (False, True):
        target.clear()
        target.update({A("a"): Grows(1), A("b"): 2})
        with backend(accelerated):
            results.append(outcome(etf.encode, target))
    assert results[0] == results[1]
    assert results[0][1] is RuntimeError


@needs_c
def test_c_encoder_calls_put_once_and_not_on_error() -> None:
    with backend(True):
        _, enc = etf.term_codec()
    parts: list[bytes] = []
    enc((A("reply"), (12345, b"abc"), [Pid(b"Xw\x01n" + bytes(12)), 2.5, "s", None]), parts.append)
    assert len(parts) == 1
    with backend(False):
        _, py_enc = etf.term_codec()
    expected: list[bytes] = []
    py_enc((A("reply"), (12345, b"abc"), [Pid(b"Xw\x01n" + bytes(12)), 2.5, "s", None]), expected.append)
    assert parts[0] == b"".join(expected)
    parts.clear()
    with pytest.raises(etf.EncodeError):
        enc([1, float("nan")], parts.append)
    assert parts == []


@needs_c
def test_decoder_with_unusual_arguments_defers_to_python() -> None:
    data = etf.encode([(1, b"abc")])
    with backend(True):
        dec, _ = etf.term_codec()
    assert dec(data, 1, 512, [9]) == ([(1, b"abc")], len(data))
    assert dec(bytearray(data), 1, 512, [9]) == ([(1, bytearray(b"abc"))], len(data))  # as Python
    assert type(dec(bytearray(data), 1, 512, [9])[0][0][1]) is bytearray
    assert dec(data, 1, 2.0, [9]) == ([(1, b"abc")], len(data))  # float depth, as Python
    huge = [10**30]  # more than a Py_ssize_t: Python decodes it
    assert dec(data, 1, 512, huge) == ([(1, b"abc")], len(data)) and huge == [10**30 - 3]
    for pos in (-1, len(data), 10**30):
        with backend(False):
            py = outcome(etf.term_codec()[0], data, pos, 512, [9])
        assert outcome(dec, data, pos, 512, [9]) == py
    with pytest.raises(TypeError):
        dec(data, 1, 512)
    with pytest.raises(TypeError):
        dec(data, 1, 512, (9,))  # Python's dec cannot lower a tuple's item


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@needs_c
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc to read RSS")
def test_no_leaks_over_many_calls() -> None:
    with backend(True):
        dec, enc = etf.term_codec()
        good = etf.encode([(12345, b"abc"), {A("k"): [1.5, None, True, "é"]}, 2**40, -(2**62)])
        wrapped = etf.encode({MapKey([1]): 2, 1: A("x")})  # a map restarted in Python
    improper = b"\x83l\x00\x00\x00\x01a\x01a\x02"  # a list restarted in Python
    bad = [good[:-3], b"\x83h\x02w\x01aF\x7f\xf0" + bytes(6), b"\x83t\x00\x00\x00\x02w\x01aa\x01w\x01aa\x02"]
    long = b"L" * 5000  # spliced in, not copied twice
    result = (
        A("reply"),
        (12345, b"abc"),
        {A("k"): [1.5, None, "é", 2**70, long, "é" * 3000]},
        Pid(b"Xw\x01n" + bytes(12)),
    )
    failing = [1, long, (b"x", float("nan"))]
    probe = [b"abc", A("reply"), result, long]

    def once() -> None:
        dec(good, 1, 512, [99])
        dec(wrapped, 1, 512, [99])
        dec(improper, 1, 512, [99])
        for blob in bad:
            try:
                dec(blob, 1, 512, [99])
            except (IndexError, etf.DecodeError):
                pass
        parts: list[bytes] = []
        enc(result, parts.append)
        try:
            enc(failing, parts.append)
        except etf.EncodeError:
            pass

    for _ in range(5000):
        once()
    gc.collect()
    refs = [sys.getrefcount(x) for x in (good, result, failing, *probe)]
    before = _rss()
    for _ in range(100_000):
        once()
    gc.collect()
    grown = _rss() - before
    assert [sys.getrefcount(x) for x in (good, result, failing, *probe)] == refs
    assert grown < 2 * 1024 * 1024, f"RSS grew by {grown} bytes over 100k calls"


# ---- the whole codec suite on the other backend --------------------------------------------


@pytest.mark.skipif(_cetf is None, reason=f"{NOT_BUILT} (tests/test_etf.py runs on the pure-Python codec)")
def test_codec_suite_passes_on_the_other_backend() -> None:
    """tests/test_etf.py runs in-process on the active backend; here on the other one."""
    env = dict(os.environ, POOLPORT_PURE_PYTHON="1" if etf.ACCELERATED else "0")
    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests / "test_etf.py")],
        cwd=tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
