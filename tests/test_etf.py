"""Unit and property tests for poolport.codec.etf (the oracle test against a real erl is separate)."""

from __future__ import annotations

import collections
import enum
import struct
import zlib
from typing import Any, NamedTuple

import pytest
from etf_strategies import atoms, huge_ints, mutated, opaque_blobs, terms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolport.errors import DecodeError, EncodeError
from poolport.codec.etf import canonical, decode, encode, term_writer
from poolport.codec.terms import (
    Atom,
    BitString,
    Fun,
    ImproperList,
    MapKey,
    Pid,
    Port,
    Reference,
)

A = Atom
NODE = b"d\x00\x0dnonode@nohost"  # ATOM_EXT 'nonode@nohost'

# ---- bytes written by a real Erlang/OTP 25 term_to_binary/1,2 -------------------------

ERLANG_PID = b"\x83X" + NODE + b"\x00\x00\x00\x09" + bytes(8)
ERLANG_REF = b"\x83Z\x00\x03" + NODE + b"\x00\x00\x00\x00\x00\x00\x3c\x03\x0f\xf8\x00\x01\xb1\x16\xc0\x5e"
ERLANG_PORT = b"\x83Y" + NODE + bytes(8)
ERLANG_EXPORT = b"\x83qd\x00\x05listsd\x00\x03mapa\x02"  # fun lists:map/2
ERLANG_FUN = (  # fun(X) -> X + N end, one free variable N = 13
    b"\x83\x70\x00\x00\x00\x4c\x01\x3f\xd1\x87\xe2\x60\x13\x45\x35\x6a\xf0\x70\x75\x1b\x57\x5d"
    b"\x54\x00\x00\x00\x00\x00\x00\x00\x01\x64\x00\x06probe3\x61\x00\x62\x01\xfe\x8c\x3f\x58"
    + NODE
    + b"\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00\x00\x61\x0d"
)

# FUN_EXT (pre-R8 funs, still decodable): NumFree, Pid, Module, Index, Uniq, free variables
OLD_FUN = b"\x83u\x00\x00\x00\x01" + ERLANG_PID[1:] + b"d\x00\x01ma\x01a\x02a\x07"

FROM_ERLANG = [
    pytest.param(b"\x83a\x07", 7, id="small_integer"),
    pytest.param(b"\x83b\xff\xff\xff\xff", -1, id="integer_negative"),
    pytest.param(b"\x83b\x00\x00\x01\x00", 256, id="integer_256"),
    pytest.param(b"\x83n\x09\x00" + bytes(8) + b"\x40", 1 << 70, id="small_big"),
    pytest.param(b"\x83n\x09\x01" + bytes(8) + b"\x40", -(1 << 70), id="small_big_negative"),
    pytest.param(b"\x83F\x3f\xf8" + bytes(6), 1.5, id="new_float"),
    pytest.param(b"\x83c1.50000000000000000000e+00" + bytes(5), 1.5, id="old_float"),
    pytest.param(b"\x83k\x00\x03abc", [97, 98, 99], id="string_ext"),
    pytest.param(b"\x83l\x00\x00\x00\x03a\x01a\x02b\x00\x00\x01\x2cj", [1, 2, 300], id="list"),
    pytest.param(b"\x83l\x00\x00\x00\x01a\x01a\x02", ImproperList([1], 2), id="improper_list"),
    pytest.param(b"\x83M\x00\x00\x00\x01\x03\x20", BitString(b"\x20", 3), id="bit_binary"),
    pytest.param(b"\x83t\x00\x00\x00\x01d\x00\x01aa\x01", {A("a"): 1}, id="map"),
    pytest.param(b"\x83h\x00", (), id="empty_tuple"),
    pytest.param(b"\x83d\x00\x02h\xe9", A("hé"), id="atom_ext_latin1"),
    pytest.param(b"\x83w\x06\xe6\x97\xa5\xe6\x9c\xac", A("日本"), id="small_atom_utf8"),
    pytest.param(b"\x83j", [], id="nil"),
    pytest.param(b"\x83h\x02d\x00\x01ad\x00\x01b", (A("a"), A("b")), id="small_tuple"),
    pytest.param(b"\x83h\x02w\x05hellow\x03h\xc3\xa9", (A("hello"), A("hé")), id="minor_version_2"),
    pytest.param(
        b"\x83t\x00\x00\x00\x02d\x00\x01aa\x01m\x00\x00\x00\x01kl\x00\x00\x00\x02F\x3f\xf8"
        + bytes(6)
        + b"b\xff\xff\xff\xfdj",
        {A("a"): 1, b"k": [1.5, -3]},
        id="map_two_keys",
    ),
    pytest.param(
        b"\x83\x68\x02\x64\x00\x02\x6f\x6b\x6c\x00\x00\x00\x02\x74\x00\x00\x00\x02\x64\x00\x02"
        b"\x69\x64\x61\x01\x64\x00\x04\x74\x61\x67\x73\x6c\x00\x00\x00\x02\x64\x00\x01\x78\x64"
        b"\x00\x01\x79\x6a\x68\x04\x6d\x00\x00\x00\x02\x01\x02\x62\x00\x00\x01\x2c\x62\xff\xfe"
        b"\xee\x90\x6e\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x6a",
        (A("ok"), [{A("id"): 1, A("tags"): [A("x"), A("y")]}, (b"\x01\x02", 300, -70000, 1 << 64)]),
        id="nested",
    ),
    pytest.param(
        b"\x83\x50\x00\x00\x01\x1e\x78\x9c\xcb\x61\x60\x60\xd0\xc8\x05\x12\x4c\x89\x49\xa3\x14"
        b"\x1a\x95\x05\x00\xfb\xc6\x30\xcf",
        [b"ab"] * 40,
        id="compressed",
    ),
    pytest.param(b"\x83d\x00\x04true", True, id="true"),
    pytest.param(b"\x83d\x00\x05false", False, id="false"),
    pytest.param(b"\x83d\x00\x09undefined", None, id="undefined"),
]


@pytest.mark.parametrize(("data", "term"), FROM_ERLANG)
def test_decode_bytes_from_erlang(data: bytes, term: Any) -> None:
    assert decode(data) == term
    assert type(decode(data)) is type(term)
    assert decode(encode(term)) == term


@pytest.mark.parametrize(
    ("data", "cls"),
    [
        pytest.param(ERLANG_PID, Pid, id="new_pid"),
        pytest.param(ERLANG_REF, Reference, id="newer_reference"),
        pytest.param(ERLANG_PORT, Port, id="new_port"),
        pytest.param(ERLANG_EXPORT, Fun, id="export"),
        pytest.param(ERLANG_FUN, Fun, id="new_fun_with_env"),
        pytest.param(OLD_FUN, Fun, id="fun_ext"),
        pytest.param(b"\x83gw\x01n\x00\x00\x00\x01\x00\x00\x00\x02\x03", Pid, id="pid_ext"),
        pytest.param(b"\x83fw\x01n\x00\x00\x00\x01\x00", Port, id="port_ext"),
        pytest.param(b"\x83xw\x01n" + bytes(12), Port, id="v4_port_ext"),
        pytest.param(b"\x83ew\x01n\x00\x00\x00\x01\x00", Reference, id="reference_ext"),
        pytest.param(b"\x83r\x00\x01w\x01n\x00\x00\x00\x00\x01", Reference, id="new_reference"),
    ],
)
def test_opaque_terms_from_erlang_round_trip_byte_identical(data: bytes, cls: type) -> None:
    term = decode(data)
    assert type(term) is cls
    assert term.data == data[1:]
    assert encode(term) == data
    assert encode((term, [term])) == b"\x83h\x02" + data[1:] + b"l\x00\x00\x00\x01" + data[1:] + b"j"


# ---- exact bytes of what we write ------------------------------------------------------

TO_BYTES = [
    pytest.param(0, b"a\x00", id="small_int_0"),
    pytest.param(255, b"a\xff", id="small_int_255"),
    pytest.param(256, b"b\x00\x00\x01\x00", id="integer_256"),
    pytest.param(-1, b"b\xff\xff\xff\xff", id="integer_-1"),
    pytest.param(2**31 - 1, b"b\x7f\xff\xff\xff", id="integer_max"),
    pytest.param(-(2**31), b"b\x80\x00\x00\x00", id="integer_min"),
    pytest.param(2**31, b"n\x04\x00\x00\x00\x00\x80", id="small_big_2**31"),
    pytest.param(-(2**31) - 1, b"n\x04\x01\x01\x00\x00\x80", id="small_big_negative"),
    pytest.param(2 ** (8 * 255), b"o\x00\x00\x01\x00\x00" + bytes(255) + b"\x01", id="large_big"),
    pytest.param(1.5, b"F\x3f\xf8" + bytes(6), id="float"),
    pytest.param(-0.0, b"F\x80" + bytes(7), id="negative_zero"),
    pytest.param(A("ok"), b"w\x02ok", id="atom"),
    pytest.param(A("日本"), b"w\x06\xe6\x97\xa5\xe6\x9c\xac", id="utf8_atom"),
    pytest.param(A("é" * 200), b"v\x01\x90" + "é".encode() * 200, id="atom_utf8_ext"),
    pytest.param(True, b"w\x04true", id="true"),
    pytest.param(False, b"w\x05false", id="false"),
    pytest.param(None, b"w\x09undefined", id="none"),
    pytest.param(b"hi", b"m\x00\x00\x00\x02hi", id="bytes"),
    pytest.param("hé", b"m\x00\x00\x00\x03h\xc3\xa9", id="str_is_utf8_binary"),
    pytest.param(bytearray(b"x"), b"m\x00\x00\x00\x01x", id="bytearray"),
    pytest.param(memoryview(b"xy")[1:], b"m\x00\x00\x00\x01y", id="memoryview"),
    pytest.param((), b"h\x00", id="empty_tuple"),
    pytest.param((A("a"),) * 256, b"i\x00\x00\x01\x00" + b"w\x01a" * 256, id="large_tuple"),
    pytest.param([], b"j", id="nil"),
    pytest.param([1, 2, 3], b"k\x00\x03\x01\x02\x03", id="charlist_as_string_ext"),
    pytest.param([1, 256], b"l\x00\x00\x00\x02a\x01b\x00\x00\x01\x00j", id="int_list"),
    pytest.param([True, 1], b"l\x00\x00\x00\x02w\x04truea\x01j", id="bool_is_not_a_char"),
    pytest.param([A("a")], b"l\x00\x00\x00\x01w\x01aj", id="list"),
    pytest.param(ImproperList([1], A("t")), b"l\x00\x00\x00\x01a\x01w\x01t", id="improper"),
    pytest.param(ImproperList([1], [2]), b"k\x00\x02\x01\x02", id="improper_with_list_tail"),
    pytest.param(BitString(b"\xff", 3), b"M\x00\x00\x00\x01\x03\xe0", id="bitstring_masked"),
    pytest.param(BitString(b"\xff", 8), b"m\x00\x00\x00\x01\xff", id="bitstring_whole_byte"),
    pytest.param({A("k"): b""}, b"t\x00\x00\x00\x01w\x01km\x00\x00\x00\x00", id="map"),
    pytest.param({MapKey([1]): 2}, b"t\x00\x00\x00\x01k\x00\x01\x01a\x02", id="map_list_key"),
]


@pytest.mark.parametrize(("term", "body"), TO_BYTES)
def test_encode_exact_bytes_utf8_atoms(term: Any, body: bytes) -> None:
    assert encode(term, atom_encoding="utf8") == b"\x83" + body


# The default, atom_encoding="latin1": what term_to_binary/1 of OTP 25 writes (the oracle test
# checks it byte for byte against a real erl). Terms without atoms are the same bytes either way.
LATIN1_BYTES = [
    pytest.param(A("ok"), b"d\x00\x02ok", id="atom"),
    pytest.param(A(""), b"d\x00\x00", id="empty_atom"),
    pytest.param(A("hé"), b"d\x00\x02h\xe9", id="latin1_atom_is_latin1_bytes"),
    pytest.param(A("ÿ" * 255), b"d\x00\xff" + b"\xff" * 255, id="longest_latin1_atom"),
    pytest.param(A("日本"), b"w\x06\xe6\x97\xa5\xe6\x9c\xac", id="non_latin1_atom_is_utf8"),
    pytest.param(A("é" * 199 + "€"), b"v\x01\x91" + "é".encode() * 199 + "€".encode(), id="atom_utf8_ext"),
    pytest.param(True, b"d\x00\x04true", id="true"),
    pytest.param(False, b"d\x00\x05false", id="false"),
    pytest.param(None, b"d\x00\x09undefined", id="none"),
    pytest.param((A("a"),) * 256, b"i\x00\x00\x01\x00" + b"d\x00\x01a" * 256, id="large_tuple"),
    pytest.param([True, 1], b"l\x00\x00\x00\x02d\x00\x04truea\x01j", id="bool_is_not_a_char"),
    pytest.param(ImproperList([1], A("t")), b"l\x00\x00\x00\x01a\x01d\x00\x01t", id="improper"),
    pytest.param({A("k"): A("v")}, b"t\x00\x00\x00\x01d\x00\x01kd\x00\x01v", id="map"),
    pytest.param((A("reply"), b"x"), b"h\x02d\x00\x05replym\x00\x00\x00\x01x", id="reply"),
]


@pytest.mark.parametrize(("term", "body"), LATIN1_BYTES)
def test_encode_exact_bytes_latin1_atoms_by_default(term: Any, body: bytes) -> None:
    assert encode(term) == encode(term, atom_encoding="latin1") == b"\x83" + body
    assert decode(b"\x83" + body) == term


def _has_atoms(term: Any) -> bool:
    if term is None or isinstance(term, (bool, Atom)):
        return True
    if isinstance(term, dict):
        return _has_atoms(list(term.items()))
    if isinstance(term, ImproperList):
        return _has_atoms([term.items, term.tail])
    if isinstance(term, MapKey):
        return _has_atoms(term.term)
    return isinstance(term, (list, tuple)) and any(map(_has_atoms, term))


@pytest.mark.parametrize(("term", "body"), [p for p in TO_BYTES if not _has_atoms(p.values[0])])
def test_terms_without_atoms_do_not_depend_on_atom_encoding(term: Any, body: bytes) -> None:
    assert encode(term) == encode(term, atom_encoding="utf8") == b"\x83" + body


def test_atom_subclass_and_bad_atom_encoding() -> None:
    class Tag(Atom):
        pass

    assert encode(Tag("é")) == b"\x83d\x00\x01\xe9"
    assert encode(Tag("é"), atom_encoding="utf8") == b"\x83w\x02\xc3\xa9"
    with pytest.raises(EncodeError, match="atom_encoding must be 'latin1' or 'utf8', got 'utf-8'"):
        encode(A("ok"), atom_encoding="utf-8")  # type: ignore[arg-type]


def test_canonical_does_not_depend_on_atom_encoding() -> None:
    """MapKey hashes and compares by canonical(): always UTF-8 atoms, so never by setting."""
    assert canonical(A("é")) == b"w\x02\xc3\xa9"
    assert canonical((True, None)) == b"h\x02w\x04true\x00"
    key = MapKey([A("é")])
    assert decode(encode({key: 1})) == decode(encode({key: 1}, atom_encoding="utf8")) == {key: 1}


def test_large_tuple_round_trip() -> None:
    term = tuple(range(300))
    data = encode(term)
    assert data[1] == 105  # LARGE_TUPLE_EXT
    assert decode(data) == term


def test_long_int_list_is_list_ext_and_round_trips() -> None:
    term = [7] * 70000  # too long for STRING_EXT
    data = encode(term)
    assert data[1] == 108
    assert decode(data) == term


def test_none_atom_is_configurable() -> None:
    assert encode(None, none_atom="nil") == b"\x83d\x00\x03nil"
    assert encode(None, none_atom="nil", atom_encoding="utf8") == b"\x83w\x03nil"
    assert encode(None, none_atom="nïl") == b"\x83d\x00\x03n\xefl"
    assert decode(b"\x83w\x03nil", none_atom="nil") is None
    assert decode(b"\x83w\x09undefined", none_atom="nil") == A("undefined")
    assert decode(b"\x83w\x09undefined", none_atom=None) == A("undefined")
    assert decode(b"\x83w\x04true", none_atom=None) is True


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = encode({A("a"): [1, 2.5, b"x"]})
    assert decode(bytearray(data)) == decode(memoryview(data)) == decode(data)
    assert decode(memoryview(b"\x00" + data)[1:]) == decode(data)


def test_subclasses_and_other_containers_encode_like_their_base() -> None:
    class Color(enum.IntEnum):
        RED = 300

    class Point(NamedTuple):
        x: int
        y: int

    class Name(str):
        pass

    assert encode(Color.RED) == encode(300)
    assert encode(Point(1, 2)) == encode((1, 2))
    assert encode(Name("n")) == encode("n")
    assert encode(collections.OrderedDict(a=1)) == encode({"a": 1})
    assert sorted(decode(encode({3, 1, 2}))) == [1, 2, 3]
    assert sorted(decode(encode(frozenset({5, 6})))) == [5, 6]
    assert encode(Pid(ERLANG_PID[1:])) == ERLANG_PID


def test_bitstring_decode_masks_unused_bits_and_whole_bytes_are_binaries() -> None:
    assert decode(b"\x83M\x00\x00\x00\x01\x03\xff") == BitString(b"\xe0", 3)
    assert decode(b"\x83M\x00\x00\x00\x01\x08\xff") == b"\xff"
    assert decode(b"\x83M\x00\x00\x00\x00\x00") == b""


def test_list_tail_forms_are_normalised() -> None:
    # [1 | [2]] written with a LIST_EXT tail is just [1, 2]; a zero-length LIST_EXT is its tail.
    assert decode(b"\x83l\x00\x00\x00\x01a\x01l\x00\x00\x00\x01a\x02j") == [1, 2]
    assert decode(b"\x83l\x00\x00\x00\x01a\x01k\x00\x01\x02") == [1, 2]
    assert decode(b"\x83l\x00\x00\x00\x00a\x05") == 5
    nested = b"\x83l\x00\x00\x00\x01a\x01l\x00\x00\x00\x01a\x02a\x03"
    assert decode(nested) == ImproperList([1, 2], 3)


def test_compressed_encode_matches_term_to_binary_rules() -> None:
    big = [b"ab"] * 40
    data = encode(big, compressed=6)
    assert data[:2] == b"\x83P"
    assert struct.unpack(">I", data[2:6])[0] == len(encode(big)) - 1
    assert decode(data) == big
    assert encode(A("a"), compressed=9) == encode(A("a"))  # not smaller: left uncompressed
    assert encode(big, compressed=True)[:2] == b"\x83P"
    assert encode(big, compressed=0) == encode(big)


# ---- map keys --------------------------------------------------------------------------


def _map(*pairs: bytes) -> bytes:
    return b"\x83t" + struct.pack(">I", len(pairs) // 2) + b"".join(pairs)


def test_map_with_list_key_wraps_only_that_key() -> None:
    data = _map(b"k\x00\x02\x01\x02", b"w\x01a", b"F\x3f\xf8" + bytes(6), b"a\x01")
    term = decode(data)
    assert term == {MapKey([1, 2]): A("a"), 1.5: 1}
    assert term[MapKey([1, 2])] == A("a")
    assert decode(encode(term)) == term


def test_map_keys_python_would_merge_stay_apart() -> None:
    one, one_f, true = b"a\x01", b"F\x3f\xf0" + bytes(6), b"w\x04true"
    assert decode(_map(one, b"a\x0a", true, b"a\x0c")) == {1: 10, MapKey(True): 12}
    assert decode(_map(b"d\x00\x05false", b"a\x01", b"a\x00", b"a\x02")) == {
        MapKey(False): 1,
        0: 2,
    }
    term = decode(_map(one, b"a\x0a", one_f, b"a\x0b", true, b"a\x0c"))
    assert len(term) == 3
    assert term[1] == 10
    assert term[MapKey(1.0)] == 11
    assert term[MapKey(True)] == 12
    assert decode(encode(term)) == term
    zeros = decode(_map(b"F" + bytes(8), b"a\x01", b"F\x80" + bytes(7), b"a\x02"))
    assert zeros == {MapKey(0.0): 1, MapKey(-0.0): 2}
    tuples = decode(_map(b"h\x01a\x01", b"a\x01", b"h\x01" + one_f, b"a\x02"))
    assert tuples == {(1,): 1, MapKey((1.0,)): 2}


def test_mapkey_equality_is_erlang_exact_equality() -> None:
    assert MapKey([1, {A("a"): 2, A("b"): 3}]) == MapKey([1, {A("b"): 3, A("a"): 2}])
    assert MapKey([1]) != MapKey([1.0])
    assert MapKey(None) != MapKey(A("undefined"))
    assert MapKey([1]) != [1]
    assert hash(MapKey((1, [2]))) == hash(MapKey((1, [2])))
    assert canonical({1: 2, 3: 4}) == canonical({3: 4, 1: 2})
    assert canonical(ImproperList([1], ImproperList([2], 3))) == canonical(ImproperList([1, 2], 3))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_map(b"w\x01a", b"a\x01", b"w\x01a", b"a\x02"), id="atoms"),
        pytest.param(_map(b"a\x01", b"a\x01", b"a\x01", b"a\x02"), id="ints"),
        pytest.param(_map(b"j", b"a\x01", b"j", b"a\x02"), id="lists"),
        pytest.param(_map(b"w\x01a", b"a\x01", b"w\x01a", b"a\x02", b"j", b"j"), id="atoms_then_list"),
    ],
)
def test_map_with_duplicate_keys_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError, match="duplicate keys"):
        decode(data)


# ---- errors ----------------------------------------------------------------------------

BAD_INPUT = [
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"\x83", "no term", id="version_only"),
    pytest.param(b"\x84a\x01", "version byte 132", id="bad_version"),
    pytest.param(b"\x83a", "truncated", id="truncated_small_int"),
    pytest.param(b"\x83b\x00\x00", "truncated", id="truncated_integer"),
    pytest.param(b"\x83a\x01\x00", "trailing bytes", id="trailing"),
    pytest.param(b"\x83\x00", "unknown tag 0", id="unknown_tag"),
    pytest.param(b"\x83y\x00", "LOCAL_EXT", id="local_ext"),
    pytest.param(b"\x83R\x00", "ATOM_CACHE_REF", id="atom_cache_ref"),
    pytest.param(b"\x83h\x01P\x00\x00\x00\x01", "not at the top level", id="nested_compressed"),
    pytest.param(b"\x83m\xff\xff\xff\xff", "claims 4294967295 bytes", id="binary_4gib"),
    pytest.param(b"\x83l\xff\xff\xff\xffj", "claims 4294967295 elements", id="list_4g"),
    pytest.param(b"\x83i\xff\xff\xff\xff", "claims 4294967295 elements", id="tuple_4g"),
    pytest.param(b"\x83t\xff\xff\xff\xff", "claims 4294967295 pairs", id="map_4g"),
    pytest.param(b"\x83o\xff\xff\xff\xff\x00", "claims 4294967295 digit bytes", id="bignum_4g"),
    pytest.param(b"\x83k\xff\xff", "claims 65535 bytes", id="string_64k"),
    pytest.param(b"\x83M\x00\x00\x00\x01\x00\x01", "bitstring", id="bitstring_zero_bits"),
    pytest.param(b"\x83M\x00\x00\x00\x01\x09\x01", "bitstring", id="bitstring_nine_bits"),
    pytest.param(b"\x83w\x03ab", "truncated|claims", id="atom_truncated"),
    pytest.param(b"\x83w\x02\xc3\x28", "not valid UTF-8", id="atom_bad_utf8"),
    pytest.param(b"\x83v\x01\x00" + b"a" * 256, "256 characters", id="atom_utf8_too_long"),
    pytest.param(b"\x83d\x01\x00" + b"a" * 256, "256 characters", id="atom_latin1_too_long"),
    pytest.param(b"\x83F\x7f\xf8" + bytes(6), "NaN or infinite", id="float_nan"),
    pytest.param(b"\x83F\x7f\xf0" + bytes(6), "NaN or infinite", id="float_inf"),
    pytest.param(b"\x83c1_0" + bytes(28), "old-style float", id="old_float_underscore"),
    pytest.param(b"\x83cnan" + bytes(28), "old-style float", id="old_float_nan"),
    pytest.param(b"\x83c1.5", "old-style float", id="old_float_truncated"),
    pytest.param(b"\x83Xa\x01" + bytes(12), "expected an atom at byte 2", id="pid_bad_node"),
    pytest.param(b"\x83X" + NODE + bytes(5), "claims", id="pid_truncated"),
    pytest.param(b"\x83Z\xff\xff" + NODE + bytes(4), "claims", id="ref_too_many_words"),
    pytest.param(ERLANG_FUN[:-1], "claims", id="fun_truncated"),
    pytest.param(ERLANG_FUN[:5] + b"\x4b" + ERLANG_FUN[6:], "size", id="fun_size_mismatch"),
    pytest.param(b"\x83qd\x00\x05listsd\x00\x03mapb\x00\x00\x00\x02", "arity", id="export_arity"),
    pytest.param(OLD_FUN[:-1], "truncated", id="fun_ext_truncated"),
    pytest.param(OLD_FUN[:5] + b"\x09" + OLD_FUN[6:], "free variables", id="fun_ext_numfree"),
    pytest.param(b"\x83u\x00\x00\x00\x00a\x01", "expected a pid", id="fun_ext_no_pid"),
    pytest.param(b"\x83P\x00\x00\x00\x05" + zlib.compress(b"a\x01"), "declares 5", id="zlib_size_lie"),
    pytest.param(b"\x83P\x00\x00\x00\x02" + b"garbage", "corrupt", id="zlib_garbage"),
    pytest.param(b"\x83P\x00\x00\x00\x02" + zlib.compress(b"a\x01")[:-3], "truncated", id="zlib_truncated"),
    pytest.param(b"\x83P\x00\x00\x00\x02" + zlib.compress(b"a\x01") + b"x", "trailing", id="zlib_trailing"),
    pytest.param(
        b"\x83P\x00\x00\x00\x03" + zlib.compress(b"a\x01\x00"),
        "trailing bytes",
        id="zlib_term_trailing",
    ),
    pytest.param(b"\x83P\x00\x00", "header", id="zlib_header_truncated"),
    pytest.param(b"\x83P\xff\xff\xff\xff" + zlib.compress(b"a\x01"), "max_inflated", id="zlib_declares_4gib"),
]


@pytest.mark.parametrize(("data", "message"), BAD_INPUT)
def test_bad_input_raises_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode(data)


def test_decode_error_names_the_offset() -> None:
    with pytest.raises(DecodeError, match="at byte 8"):
        decode(b"\x83l\x00\x00\x00\x01h\x01\xfej")
    body = b"h\x01\xfe"
    with pytest.raises(DecodeError, match="at byte 2 .*inflated data"):
        decode(b"\x83P" + struct.pack(">I", len(body)) + zlib.compress(body))


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(DecodeError, match="expected bytes"):
        decode("text")  # type: ignore[arg-type]


def test_zip_bomb_stops_at_max_inflated() -> None:
    body = b"m\x01\x00\x00\x00" + bytes(16 * 1024 * 1024)  # a 16 MiB binary
    bomb = b"\x83P" + struct.pack(">I", len(body)) + zlib.compress(body, 9)
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="max_inflated"):
        decode(bomb, max_inflated=1024 * 1024)
    lying = b"\x83P" + struct.pack(">I", 1000) + zlib.compress(body, 9)  # declares 1000 bytes
    with pytest.raises(DecodeError, match="declares 1000 inflated bytes but inflates to more"):
        decode(lying)


@pytest.mark.parametrize("tag", [b"l\x00\x00\x00\x01", b"h\x01", b"t\x00\x00\x00\x01a\x01"])
def test_deep_nesting_is_capped_by_max_depth(tag: bytes) -> None:
    levels = 1_000_000
    closer = b"j" if tag[:1] == b"l" else b""
    deep = b"\x83" + tag * levels + b"a\x00" + closer * levels
    with pytest.raises(DecodeError, match="max_depth"):
        decode(deep)
    ok = b"\x83" + tag * 100 + b"a\x00" + closer * 100
    decode(ok, max_depth=100)
    with pytest.raises(DecodeError, match="max_depth"):
        decode(ok, max_depth=99)


@pytest.mark.parametrize(
    ("term", "elements"),
    [
        pytest.param([[], [], []], 3, id="list-of-empty-lists"),
        pytest.param((1, (2, 3)), 4, id="tuples"),
        pytest.param({Atom("a"): [1, 2], 3: 4}, 6, id="map-keys-and-values"),
        pytest.param(ImproperList([1, 2], b"t"), 2, id="improper-list"),
        pytest.param(b"x" * 1000, 0, id="binary-is-one-leaf"),
        pytest.param(Atom("a"), 0, id="atom"),
    ],
)
def test_max_elements_counts_every_container_item(term: Any, elements: int) -> None:
    data = encode(term)
    assert decode(data, max_elements=elements) == term
    if elements:
        with pytest.raises(DecodeError, match=r"holds \d+ elements but the term may hold only"):
            decode(data, max_elements=elements - 1)


def test_max_elements_counts_string_ext_characters_and_stops_element_bombs() -> None:
    charlist = b"\x83k\x00\x05hello"  # STRING_EXT: a list of 5 small integers
    assert decode(charlist, max_elements=5) == list(b"hello")
    with pytest.raises(DecodeError, match="string at byte 1 holds 5 elements"):
        decode(charlist, max_elements=4)
    body = b"l" + struct.pack(">I", 50_000_000) + b"j" * 50_000_001  # 50 million []s
    bomb = b"\x83P" + struct.pack(">I", len(body)) + zlib.compress(body, 9)
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="list at byte 0 holds 50000000 elements"):
        decode(bomb)  # the default limit, before a single [] is built


def test_huge_max_depth_still_gives_decode_error() -> None:
    deep = b"\x83" + b"h\x01" * 200_000 + b"j"
    with pytest.raises(DecodeError):
        decode(deep, max_depth=10**9)


class Foo:
    pass


def _cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("term", "message"),
    [
        pytest.param(Foo(), "cannot encode object of type 'Foo' as an Erlang term", id="unknown_type"),
        pytest.param([1, {2: object()}], "type 'object'", id="nested_unknown"),
        pytest.param(complex(1, 2), "type 'complex'", id="complex"),
        pytest.param(float("nan"), "finite", id="nan"),
        pytest.param([float("inf")], "finite", id="inf"),
        pytest.param(A("a" * 256), "256 characters", id="long_atom"),
        pytest.param("\ud800", "not valid Unicode", id="lone_surrogate"),
        pytest.param(_cyclic(), "nested too deeply", id="cyclic"),
    ],
)
def test_encode_errors(term: Any, message: str) -> None:
    with pytest.raises(EncodeError, match=message):
        encode(term)


def test_encode_bad_compressed_level() -> None:
    with pytest.raises(EncodeError, match="0..9"):
        encode([b"ab"] * 40, compressed=10)


# ---- properties ------------------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(terms(), st.sampled_from(["latin1", "utf8"]))
def test_round_trip(term: Any, atom_encoding: str) -> None:
    data = encode(term, atom_encoding=atom_encoding)
    assert decode(data) == term
    assert decode(encode(term, compressed=6, atom_encoding=atom_encoding)) == term


@given(st.one_of(huge_ints, atoms(max_size=255)), st.sampled_from(["latin1", "utf8"]))
def test_round_trip_huge_ints_and_long_atoms(term: Any, atom_encoding: str) -> None:
    assert decode(encode(term, atom_encoding=atom_encoding)) == term


@given(atoms(max_size=255))
def test_atom_tag_follows_atom_encoding(name: Atom) -> None:
    latin1, utf8 = encode(name)[1], encode(name, atom_encoding="utf8")[1]
    fits = all(ord(c) < 256 for c in name)
    assert latin1 == (100 if fits else utf8)
    assert utf8 == (119 if len(name.encode()) < 256 else 118)


@given(terms(), st.sampled_from(["nil", "undefined", "none"]))
def test_round_trip_with_none_atom(term: Any, none_atom: str) -> None:
    assert decode(encode(term, none_atom=none_atom), none_atom=none_atom) == term


@given(opaque_blobs())
def test_opaque_terms_round_trip_byte_identical(data: bytes) -> None:
    assert encode(decode(data)) == data


@given(terms(max_leaves=10))
def test_canonical_agrees_with_equality(term: Any) -> None:
    assert MapKey(term) == MapKey(decode(encode(term)))


@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    for blob in (data, b"\x83" + data):
        try:
            decode(blob)
        except DecodeError:
            pass


@settings(max_examples=500)
@given(mutated())
def test_mutated_encodings_never_crash(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


@given(mutated())
def test_mutated_compressed_encodings_never_crash(data: bytes) -> None:
    if len(data) > 1 and data[0] == 131:
        body = data[1:]
        data = b"\x83P" + struct.pack(">I", len(body)) + zlib.compress(body)
    try:
        decode(data)
    except DecodeError:
        pass


@pytest.mark.parametrize("term", [1, b"x" * 100_000, (Atom("ok"), [b"y" * 5000, 2.5, {Atom("k"): None}]), []])
@pytest.mark.parametrize("atom_encoding", ["latin1", "utf8"])
def test_term_writer_puts_the_prefix_before_the_encoding(term, atom_encoding):
    write = term_writer(atom_encoding=atom_encoding)
    expected = encode(term, atom_encoding=atom_encoding)[1:]
    assert write(b"\x83h\x02w\x05reply", term) == b"\x83h\x02w\x05reply" + expected
    assert write(b"", term) == expected
