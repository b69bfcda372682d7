"""Decoding is linear in the input for every term shape, on both codecs.

Regression tests for "Decoding is super-linear": the C decoder handed an improper
list (or a map with a key a dict cannot hold as is) back to Python, which decoded it
again from its first byte, inner levels included, so each nesting level re-decoded
all the levels inside it: a 3 KB compressed request, a 190 levels deep iolist, took
29 s. The pure-Python decoder had shapes of its own (keys nested in map keys, funs
nested in funs' free variables).

No timing assertions (the machines are shared and noisy): the tests count work that
does not depend on the machine (calls into the Python decoding code, seen by a profile
hook; the spans the C decoder hands to its Python fallback; bytes copied) and hold it
to a constant per nesting level, where the old code's grew with the depth.
"""

from __future__ import annotations

import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cetf import backend, check_decode, same
from test_etf_oracle import _escript, _read_blobs

from poolport.codec import etf
from poolport.errors import DecodeError
from poolport.codec.terms import Atom, Fun, ImproperList, MapKey

try:
    from poolport.codec import _cetf
except ImportError:  # no C compiler when the package was installed
    _cetf = None

A = Atom
LEVELS = (190, 2000)  # the request, and deeper than the C decoder's own nesting
PER_LEVEL = 16  # Python calls allowed per nesting level (2 to 13 are made); the old code's grew with depth
ACCELERATED = [False, True] if _cetf is not None else [False]
BACKENDS = [pytest.param(accelerated, id="c" if accelerated else "python") for accelerated in ACCELERATED]
needs_c = pytest.mark.skipif(_cetf is None, reason="poolport.codec._cetf is not built")


@pytest.fixture(autouse=True)
def deep_stack() -> Iterator[None]:
    """Room for 2000 nested levels in the Python decoder, encoder and canonical()."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def python_calls(run: Callable[[], Any], *functions: Callable[..., Any]) -> tuple[Any, int]:
    """``run()``'s result and how many times it entered any of ``functions`` (Python ones)."""
    codes = {f.__code__ for f in functions}
    calls = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call" and frame.f_code in codes:
            calls += 1

    sys.setprofile(profile)
    try:
        result = run()
    finally:
        sys.setprofile(None)
    return result, calls


def python_dec() -> etf.Dec:
    """The pure-Python ``dec``: what the C decoder falls back to."""
    etf._decoder("undefined")
    return etf._DECODERS["undefined"]


def decoding_work(data: bytes, accelerated: bool, max_depth: int) -> tuple[Any, int]:
    """decode(data) on one backend, and the calls it made into Python decoding code."""
    with backend(accelerated):
        return python_calls(
            lambda: etf.decode(data, max_depth=max_depth),
            python_dec(),
            etf._map_with_wrapped_keys,
            etf._canonical,
        )


# ---- shapes that nest a few containers per step ---------------------------------------------------


def iolist(levels: int, fill: int = 0) -> Any:
    """[[[<<"x">>, 1, ... | <<"y">>], 1, ... | <<"y">>] ...]: an iolist built by appending."""
    term: Any = b"x"
    for _ in range(levels):
        term = ImproperList([term, *[1] * fill], b"y")
    return term


def request(levels: int, fill: int = 0) -> tuple[Any, ...]:
    return (A("call"), A("pp_handlers"), A("echo"), [iolist(levels, fill)])


def improper_tails(levels: int) -> Any:
    """[1 | {[2 | {...}]}]: improper lists nested through their tails."""
    term: Any = A("end")
    for i in range(levels):
        term = ImproperList([i % 256, b"x"], (term,))
    return term


def string_tails(levels: int) -> Any:
    """[[... | "ab"] | "ab"]: each level's STRING_EXT tail joins its list."""
    term: Any = [7]
    for _ in range(levels):
        term = [term, 97, 98]
    return term


def keys_in_keys(levels: int) -> Any:
    """#{#{#{...} => v} => v}: unhashable keys, each wrapped in a MapKey."""
    term: Any = {}
    for i in range(levels):
        term = {MapKey(term): [i, b"v"], A("k"): i}
    return term


def clashing_keys(levels: int) -> Any:
    """#{1 => #{1 => ..., 1.0 => b}, 1.0 => b}: keys Python's == merges, nested in values."""
    term: Any = 1
    for _ in range(levels):
        term = {1: term, MapKey(1.0): b"b"}
    return term


def encoded_with_string_tails(levels: int) -> bytes:
    """The bytes of string_tails(levels) as term_to_binary writes them: [Inner | "ab"]."""
    out = b"k\x00\x01\x07"
    for _ in range(levels):
        out = b"l\x00\x00\x00\x01" + out + b"k\x00\x02ab"
    return b"\x83" + out


def encoded_continued(levels: int) -> bytes:
    """[I | [Inner | <<>>]] nested in Inner: a LIST_EXT whose tail is another LIST_EXT, i.e.
    the same list going on (Erlang never writes this, but reads it)."""
    out = b"m\x00\x00\x00\x01z"
    for i in range(levels):
        out = b"l\x00\x00\x00\x01a" + bytes([i % 256]) + b"l\x00\x00\x00\x01" + out + b"m\x00\x00\x00\x00"
    return b"\x83" + out


def expected_continued(levels: int) -> Any:
    term: Any = b"z"
    for i in range(levels):
        term = ImproperList([i % 256, term], b"")
    return term


SHAPES = {
    "iolist": lambda n: (etf.encode(iolist(n)), iolist(n)),
    "request": lambda n: (etf.encode(request(n), compressed=9), request(n)),
    "improper_tails": lambda n: (etf.encode(improper_tails(n)), improper_tails(n)),
    "string_tails": lambda n: (encoded_with_string_tails(n), string_tails(n)),
    "continued": lambda n: (encoded_continued(n), expected_continued(n)),
    "keys_in_keys": lambda n: (etf.encode(keys_in_keys(n)), keys_in_keys(n)),
    "clashing_keys": lambda n: (etf.encode(clashing_keys(n)), clashing_keys(n)),
}


@pytest.mark.parametrize("accelerated", BACKENDS)
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nested_shapes_decode_with_linear_python_work(shape: str, levels: int, accelerated: bool) -> None:
    data, expected = SHAPES[shape](levels)
    term, calls = decoding_work(data, accelerated, max_depth=2 * levels + 10)
    assert same(term, expected)
    assert calls <= PER_LEVEL * levels, f"{calls} Python calls for {levels} levels"


@pytest.mark.parametrize("shape", SHAPES)
def test_nested_shapes_decode_the_same_on_both_backends(shape: str) -> None:
    """Terms and errors (too deep, truncated, trailing bytes) agree at every cut."""
    data, _ = SHAPES[shape](60)
    for depth in (512, 61, 60, 59, 3):
        check_decode(data, max_depth=depth)
    for cut in range(2, len(data), max(1, len(data) // 97)):
        check_decode(data[:cut])
    check_decode(data + b"\x00")


# ---- the request from the issue ---------------------------------------------------------------

HOSTILE_LEVELS = 190
HOSTILE_FILL = 6000  # small ints per level: ~3 KB compressed, 2.3 MB inflated


def hostile_request() -> bytes:
    return etf.encode(request(HOSTILE_LEVELS, HOSTILE_FILL), compressed=9)


def test_hostile_request_is_a_small_compressed_message() -> None:
    data = hostile_request()
    assert data[1] == 80  # COMPRESSED
    assert 2000 < len(data) < 4000
    assert len(zlib.decompress(data[6:])) > 2_000_000


@pytest.mark.parametrize("accelerated", BACKENDS)
def test_hostile_request_decodes_each_level_once(accelerated: bool) -> None:
    term, calls = decoding_work(hostile_request(), accelerated, max_depth=512)
    assert same(term, request(HOSTILE_LEVELS, HOSTILE_FILL))
    assert calls <= PER_LEVEL * HOSTILE_LEVELS, f"{calls} Python calls"


@needs_c
@pytest.mark.parametrize("levels", LEVELS)
def test_c_decoder_hands_python_each_byte_at_most_once(levels: int) -> None:
    """Improper lists and wrapped maps are C's own now: the Python fallback only gets the
    sub-terms past C's nesting cap, each once, so the spans it decodes never overlap (the
    old decoder restarted every level in Python, each span holding all the inner ones)."""
    spans: list[tuple[int, int]] = []
    py = python_dec()

    def fallback(data: bytes, pos: int, depth: int, budget: list[int]) -> tuple[Any, int]:
        term, end = py(data, pos, depth, budget)
        spans.append((pos, end))
        return term, end

    dec = etf._c_decoder(fallback, "undefined")
    for term in (request(levels), improper_tails(levels), keys_in_keys(levels), clashing_keys(levels)):
        data = etf.encode(term)
        spans.clear()
        (got, end), calls = python_calls(lambda: dec(data, 1, 2 * levels + 10, [10**9]), py)
        assert end == len(data)
        assert same(got, term)
        spans.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
        assert calls <= PER_LEVEL * levels


# ---- funs nested in funs' free variables --------------------------------------------------


def new_fun(free: list[bytes], uniq: int = 0) -> bytes:
    """A NEW_FUN_EXT (no version byte) with these encoded free variables."""
    body = (
        b"\x00"
        + uniq.to_bytes(16, "big")
        + struct.pack(">II", 0, len(free))
        + b"w\x01m"
        + b"a\x00"
        + b"a\x00"
        + b"Xw\x01n"
        + bytes(12)
        + b"".join(free)
    )
    return b"p" + struct.pack(">I", 4 + len(body)) + body


def nested_funs(levels: int, blob: int = 1000) -> bytes:
    """fun() -> {F, Blob} end around F, levels deep; the free variable is a tuple."""
    payload = b"m" + struct.pack(">I", blob) + bytes(blob)
    fun = new_fun([b"a\x01"])
    for _ in range(levels):
        fun = new_fun([b"h\x02" + fun + payload])
    return b"\x83" + fun


@pytest.mark.parametrize("accelerated", BACKENDS)
def test_funs_in_free_variables_are_not_copied(accelerated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    copied = 0

    class CountingFun(Fun):
        __slots__ = ()

        def __init__(self, data: bytes) -> None:
            nonlocal copied
            copied += len(data)
            super().__init__(data)

    monkeypatch.setattr(etf, "Fun", CountingFun)
    data = nested_funs(300)
    with backend(accelerated):
        term = etf.decode(data, max_depth=1000)
    assert type(term) is CountingFun and term.data == data[1:]
    copied -= len(data) - 1  # the outermost fun: the one kept
    assert copied <= 2 * len(data), f"{copied} bytes copied for a {len(data)}-byte input"


def fun_keys(a: bytes, b: bytes, levels: int = 3) -> bytes:
    """A fun whose free variable is #{A => 1, B => 2}, A and B funs nested ``levels`` deep."""

    def deep(inner: bytes) -> bytes:
        for i in range(levels):
            inner = new_fun([b"l\x00\x00\x00\x01" + inner + b"j", b"a" + bytes([i])])
        return inner

    return b"\x83" + new_fun([b"t\x00\x00\x00\x02" + deep(a) + b"a\x01" + deep(b) + b"a\x02"])


@pytest.mark.parametrize(
    ("a", "b", "duplicate"),
    [
        pytest.param(new_fun([b"a\x05"]), new_fun([b"a\x05"]), True, id="equal"),
        pytest.param(new_fun([b"a\x05"]), new_fun([b"a\x06"]), False, id="free_variable"),
        pytest.param(new_fun([b"a\x05"]), new_fun([b"a\x05"], uniq=1), False, id="header"),
        pytest.param(new_fun([b"a\x05"]), new_fun([b"b\x00\x00\x00\x05"]), False, id="encoding"),
        pytest.param(new_fun([b"a\x05"]), new_fun([b"a\x05", b"j"]), False, id="count"),
    ],
)
def test_funs_in_free_variables_still_compare_by_their_bytes(a: bytes, b: bytes, duplicate: bool) -> None:
    """Funs inside free variables stand as digests: map keys that are funs are still
    duplicates exactly when their bytes are equal (a fun's own bytes are what it keeps)."""
    data = fun_keys(a, b)
    check_decode(data)
    for accelerated in ACCELERATED:
        with backend(accelerated):
            if duplicate:
                with pytest.raises(DecodeError, match="duplicate keys"):
                    etf.decode(data)
            else:
                assert etf.decode(data) == Fun(data[1:])


# ---- the same terms written by a real Erlang ----------------------------------------------------

ERLANG_SCRIPT = r"""
#!/usr/bin/env escript
%% Writes term_to_binary (plain and compressed) of a deep iolist request and nested funs.
-mode(compile).

main([Levels, Fill, Out]) ->
    L = list_to_integer(Levels),
    F = list_to_integer(Fill),
    Deep = lists:foldl(fun(I, Acc) -> [Acc | <<I>>] end, <<"x">>, lists:seq(1, L)),
    Hostile = lists:foldl(
        fun(_, Acc) -> lists:foldr(fun(X, T) -> [X | T] end, <<"y">>, [Acc | lists:duplicate(F, 1)]) end,
        <<"x">>, lists:seq(1, L)),
    Funs = lists:foldl(fun(I, G) -> fun() -> {G, I} end end, fun erlang:self/0, lists:seq(1, L)),
    Terms = [{call, pp_handlers, echo, [Deep]}, {call, pp_handlers, echo, [Hostile]}, Funs],
    Blobs = lists:append([[term_to_binary(T), term_to_binary(T, [compressed])] || T <- Terms]),
    ok = file:write_file(Out, [[<<(byte_size(B)):32>>, B] || B <- Blobs]).
"""


def test_deep_terms_from_erlang(tmp_path: Path) -> None:
    script = tmp_path / "deep.escript"
    script.write_text(ERLANG_SCRIPT.lstrip())
    out = tmp_path / "deep.bin"
    _escript(script, HOSTILE_LEVELS, HOSTILE_FILL, out)
    blobs = _read_blobs(out)
    assert len(blobs) == 6
    plain: Any = b"x"
    for i in range(1, HOSTILE_LEVELS + 1):
        plain = ImproperList([plain], bytes([i]))
    requests = [(A("call"), A("pp_handlers"), A("echo"), [plain]), request(HOSTILE_LEVELS, HOSTILE_FILL)]
    assert [blob[1] for blob in blobs] == [104, 80, 104, 80, 112, 80]
    assert len(blobs[3]) < 4000  # the hostile request is small on the wire
    for i, blob in enumerate(blobs):
        check_decode(blob)
        for accelerated in ACCELERATED:
            term, calls = decoding_work(blob, accelerated, max_depth=512)
            if i < 4:
                assert same(term, requests[i // 2])
            else:  # a fun keeps its bytes (the inflated ones, when compressed)
                assert term == Fun(zlib.decompress(blob[6:]) if blob[1] == 80 else blob[1:])
            assert calls <= PER_LEVEL * HOSTILE_LEVELS, f"blob {i}: {calls} Python calls"
