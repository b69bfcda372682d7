"""Erlang External Term Format (ETF) codec: bytes in, terms out; terms in, bytes out.

Pure and sans-IO, stdlib only. ``decode`` reads one term that starts with the
version byte 131 (optionally zlib-compressed, tag 80); ``encode`` writes one.
It covers every tag ``term_to_binary/1,2`` produces; the mapping is the one in
the design document::

    integer (97, 98, 110, 111)     <-> int
    float (70; old 99 on input)    <-> float (NaN/inf are refused both ways)
    atom (100, 115, 118, 119)      <-> Atom; true/false <-> bool; none_atom <-> None
    tuple (104, 105)               <-> tuple
    list (106, 107, 108)           <-> list; [a | b] <-> ImproperList
    binary (109)                   <-> bytes (str/bytearray/memoryview encode as binary)
    bitstring (77)                 <-> BitString
    map (116)                      <-> dict (see "map keys")
    pid/port/ref/fun/export        <-> Pid/Port/Reference/Fun holding the raw bytes

Decisions worth knowing:

* **Map keys.** Python dict keys must be hashable and Python's ``==`` is looser
  than Erlang's ``=:=`` (``1 == 1.0 == True``, ``0.0 == -0.0``). A decoded map
  whose keys are all usable as they are becomes a plain ``dict``, which is
  what every real-world map looks like. Otherwise the decoder wraps keys in
  ``terms.MapKey``, which holds the decoded term and compares and hashes by
  its canonical encoding (so exactly like Erlang's ``=:=``): first only the
  unhashable keys (lists, maps, improper lists, and tuples holding those);
  and if Python would still merge two distinct keys, every key whose Python
  equality is looser than Erlang's (floats, bools and anything holding one).
  ``MapKey`` encodes as the term it holds, so such maps round-trip to an
  equal Erlang term; build one yourself to send a map with a list key.
  A map that really has duplicate keys (Erlang itself refuses these) is a
  DecodeError.
* **Charlists.** STRING_EXT decodes to a list of ints, exactly as Erlang sees
  it. On encode, a list of ints that all fit in 0..255 (at most 65535 of them)
  is written as STRING_EXT, as ``term_to_binary`` does: it is smaller and
  checking it runs at C speed. Erlang sees the same term either way. A
  ``str`` is always a UTF-8 binary; send ``list(s.encode())`` or
  ``[ord(c) for c in s]`` for a charlist.
* **Opaque terms.** Pids, ports, references and funs keep the bytes of the
  whole sub-term (tag included) and are written back byte-identical. Their
  structure is checked while skipping over them (atoms, sizes, fun free
  variables), not interpreted.
* **Atom encoding.** ``atom_encoding="latin1"`` (the default) writes what
  ``term_to_binary/1`` of OTP 25 writes: ATOM_EXT (100, 2-byte length) for an
  atom whose characters are all Latin-1, and SMALL_ATOM_UTF8_EXT (119;
  ATOM_UTF8_EXT, 118, over 255 bytes) only for one that needs UTF-8. BERT
  clients written before UTF-8 atoms read only ATOM_EXT (and SMALL_ATOM_EXT),
  so this is what lets them read poolport's replies. ``"utf8"`` writes every
  atom as 119/118, as OTP 26+ does by default (``[{minor_version, 2}]``).
  Erlang reads both as the same atom. Atom bytes are memoised per setting;
  :func:`canonical` is independent of it (always UTF-8).
* **Canonical output.** Integers are written in the smallest form, bitstrings
  with their unused bits zeroed, and a bitstring whose last byte is full as a
  plain binary.
  ``compressed=N`` behaves like ``term_to_binary(T, [{compressed, N}])``:
  the compressed form is used only when it is smaller.
* **Limits on hostile input.** Every failure is a DecodeError naming the
  problem and byte offset. Counts and lengths are checked against the bytes
  that remain *before* anything is allocated or looped over (an N-element
  list needs at least N more bytes); container nesting is capped by
  ``max_depth``; a compressed term is inflated through ``decompressobj`` with
  ``max_length`` so it never produces more than ``max_inflated`` bytes, and its
  declared size must match. A one-byte ``[]`` becomes a 56-byte Python list,
  so the bytes alone do not bound memory: the elements of every list, tuple,
  map (keys and values) and string are charged, as each is opened, against
  ``max_elements`` for the whole term. LOCAL_EXT (121, node-local, undocumented format),
  atom cache references (82) and compressed terms below the top level are
  refused. Decoding time is linear in the (inflated) input, however deeply
  terms nest: no sub-term is decoded again for each level around it.

Speed: the decoder walks a ``bytes`` object with a position index, dispatches
on the tag with the most common tags first and handles small integers,
cached atoms and binaries inline inside list, tuple and map loops; atoms are
memoised per ``none_atom``. The encoder branches on ``type(x) is ...`` for
the common exact types (subclasses take a slower ``isinstance`` path) and
appends parts to a list joined once.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from poolport.errors import DecodeError, EncodeError
from poolport.codec.terms import (
    Atom,
    BitString,
    Fun,
    ImproperList,
    MapKey,
    Opaque,
    Pid,
    Port,
    Reference,
    use_canonical,
)

_cetf: Any
try:  # the optional C accelerator (setup.py builds it when a compiler is there)
    from poolport.codec import _cetf  # type: ignore[attr-defined,no-redef]  # built in place, no stub
except ImportError:  # pragma: no cover - depends on the build
    _cetf = None

__all__ = ["ACCELERATED", "ATOM_ENCODINGS", "AtomEncoding", "canonical", "decode", "encode"]

# True when decode/encode/term_codec use poolport.codec._cetf: it is built and
# POOLPORT_PURE_PYTHON is unset, empty or "0". The C codec handles the common
# tags and types itself and hands everything else to the Python one below,
# which stays the reference (same bytes, terms, types and errors).
ACCELERATED = _cetf is not None and os.environ.get("POOLPORT_PURE_PYTHON", "") in ("", "0")

VERSION = 131
DEFAULT_MAX_DEPTH = 512  # container nesting levels accepted by decode
DEFAULT_MAX_INFLATED = 64 * 1024 * 1024  # bytes a compressed term may inflate to
DEFAULT_MAX_ELEMENTS = 4_000_000  # list/tuple/map/string elements a decoded term may hold
AtomEncoding = Literal["latin1", "utf8"]  # how encode writes atoms: see "Atom encoding" above
ATOM_ENCODINGS: tuple[AtomEncoding, ...] = get_args(AtomEncoding)
_ATOM_CACHE_SIZE = 4096  # distinct atom names memoised per none_atom before a reset
_MAX_U32 = 0xFFFFFFFF

_u16 = struct.Struct(">H").unpack_from
_u32 = struct.Struct(">I").unpack_from
_i32 = struct.Struct(">i").unpack_from
_f64 = struct.Struct(">d").unpack_from
_pack_tag_u8 = struct.Struct(">BB").pack
_pack_tag_u16 = struct.Struct(">BH").pack
_pack_tag_u32 = struct.Struct(">BI").pack
_pack_tag_i32 = struct.Struct(">Bi").pack
_pack_tag_f64 = struct.Struct(">Bd").pack

_MISSING: Any = object()

# The old FLOAT_EXT text: "%.20e" padded with NULs; Erlang's own parser is this strict.
_OLD_FLOAT = re.compile(rb" *[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

_TAG_NAMES = {
    70: "NEW_FLOAT_EXT",
    77: "BIT_BINARY_EXT",
    80: "COMPRESSED",
    82: "ATOM_CACHE_REF",
    88: "NEW_PID_EXT",
    89: "NEW_PORT_EXT",
    90: "NEWER_REFERENCE_EXT",
    97: "SMALL_INTEGER_EXT",
    98: "INTEGER_EXT",
    99: "FLOAT_EXT",
    100: "ATOM_EXT",
    101: "REFERENCE_EXT",
    102: "PORT_EXT",
    103: "PID_EXT",
    104: "SMALL_TUPLE_EXT",
    105: "LARGE_TUPLE_EXT",
    106: "NIL_EXT",
    107: "STRING_EXT",
    108: "LIST_EXT",
    109: "BINARY_EXT",
    110: "SMALL_BIG_EXT",
    111: "LARGE_BIG_EXT",
    112: "NEW_FUN_EXT",
    113: "EXPORT_EXT",
    114: "NEW_REFERENCE_EXT",
    115: "SMALL_ATOM_EXT",
    116: "MAP_EXT",
    117: "FUN_EXT",
    118: "ATOM_UTF8_EXT",
    119: "SMALL_ATOM_UTF8_EXT",
    120: "V4_PORT_EXT",
    121: "LOCAL_EXT",
}


# --------------------------------------------------------------------------- decoding


# dec(data, pos, depth, budget) -> (term, end); budget is [elements the term may still hold]
Dec = Callable[[bytes, int, int, list[int]], tuple[Any, int]]
# enc(term, put) writes the term's parts with put (the C one: all of them in one call)
Enc = Callable[[Any, Callable[[bytes], Any]], None]


def _claims(what: str, pos: int, count: int, unit: str, left: int) -> DecodeError:
    """A length field that promises more than the input holds."""
    return DecodeError(f"{what} at byte {pos} claims {count} {unit} but only {max(left, 0)} bytes remain")


def _too_many(what: str, pos: int, count: int, left: int) -> DecodeError:
    """A container that would take the term past its element budget (``max_elements``)."""
    return DecodeError(
        f"{what} at byte {pos} holds {count} elements but the term may hold only {left} more (max_term_elements)"
    )


def _too_deep(pos: int) -> DecodeError:
    return DecodeError(f"term nested deeper than max_depth at byte {pos}")


def _atom_end(data: bytes, pos: int) -> int:
    """Skip over an atom (a node, module or function name) inside an opaque term."""
    tag = data[pos]
    if tag == 119 or tag == 115:
        end = pos + 2 + data[pos + 1]
    elif tag == 118 or tag == 100:
        end = pos + 3 + _u16(data, pos + 1)[0]
    else:
        raise DecodeError(f"expected an atom at byte {pos}, found tag {tag}")
    if end > len(data):
        raise _claims("atom", pos, end - pos, "bytes", len(data) - pos)
    if tag == 118 or tag == 119:
        try:
            data[pos + (2 if tag == 119 else 3) : end].decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"atom at byte {pos} is not valid UTF-8") from None
    return end


def _int_end(data: bytes, pos: int) -> int:
    """Skip over a SMALL_INTEGER_EXT or INTEGER_EXT inside a fun."""
    tag = data[pos]
    if tag == 97:
        return pos + 2
    if tag == 98:
        return pos + 5
    raise DecodeError(f"expected an integer at byte {pos}, found tag {tag}")


def _pid_end(data: bytes, pos: int) -> int:
    """Skip over a PID_EXT or NEW_PID_EXT inside a fun."""
    tag = data[pos]
    if tag == 88:
        return _atom_end(data, pos + 1) + 12
    if tag == 103:
        return _atom_end(data, pos + 1) + 9
    raise DecodeError(f"expected a pid at byte {pos}, found tag {tag}")


_EXACT_KEY_TYPES = frozenset({int, Atom, bytes, type(None), BitString, Pid, Port, Reference, Fun})


def _exact_key(key: Any) -> bool:
    """True if Python's == on this decoded key is exactly Erlang's =:=."""
    t = type(key)
    if t is tuple:
        return all(_exact_key(k) for k in key)
    return t in _EXACT_KEY_TYPES


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True


def _map_with_wrapped_keys(keys: list[Any], values: list[Any], pos: int) -> dict[Any, Any]:
    """The rare map that a plain dict cannot hold as is; see "map keys" above."""
    wrapped = [k if _hashable(k) else MapKey(k) for k in keys]
    result = dict(zip(wrapped, values))
    if len(result) == len(keys):
        return result
    wrapped = [k if _exact_key(k) else MapKey(k) for k in keys]
    result = dict(zip(wrapped, values))
    if len(result) != len(keys):
        raise DecodeError(f"map at byte {pos} has duplicate keys")
    return result


def _special_atoms(none_atom: str | None) -> dict[str, Any]:
    """Atom names that decode to Python constants rather than Atom (both decoders use this)."""
    special: dict[str, Any] = {"true": True, "false": False}
    if none_atom is not None:
        special[none_atom] = None
    return special


def _make_decoder(none_atom: str | None) -> Dec:
    """Build the recursive decoder whose atom memo maps names to Atom/bool/None.

    ``dec(data, pos, depth, budget)`` decodes the term at ``pos`` and returns it with the
    position after it; ``depth`` is how many more containers may be opened (a
    container at ``depth <= 0`` is refused).
    Positions may run past the end of ``data`` on truncated input: every later
    read then raises IndexError and ``decode`` checks the final position.
    """
    special = _special_atoms(none_atom)
    utf8_atoms: dict[bytes, Any] = {}
    latin1_atoms: dict[bytes, Any] = {}

    def new_atom(data: bytes, pos: int, start: int, end: int, utf8: bool) -> Any:
        """Decode, validate and memoise an atom name not seen before."""
        if end > len(data):
            raise _claims("atom", pos, end - start, "bytes", len(data) - start)
        name = data[start:end]
        if utf8:
            try:
                text = name.decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError(f"atom at byte {pos} is not valid UTF-8") from None
            memo = utf8_atoms
        else:
            text = name.decode("latin-1")
            memo = latin1_atoms
        if len(text) > 255:
            raise DecodeError(f"atom at byte {pos} has {len(text)} characters (at most 255)")
        value = special.get(text, _MISSING)
        if value is _MISSING:
            value = Atom(text)
        if len(memo) >= _ATOM_CACHE_SIZE:
            memo.clear()
        memo[name] = value
        return value

    def dec(data: bytes, pos: int, depth: int, budget: list[int]) -> tuple[Any, int]:
        tag = data[pos]
        # ---- leaves, most common first
        if tag == 97:  # SMALL_INTEGER_EXT
            return data[pos + 1], pos + 2
        if tag == 109:  # BINARY_EXT
            end = pos + 5 + _u32(data, pos + 1)[0]
            if end > len(data):
                raise _claims("binary", pos, end - pos - 5, "bytes", len(data) - pos - 5)
            return data[pos + 5 : end], end
        if tag == 119:  # SMALL_ATOM_UTF8_EXT
            end = pos + 2 + data[pos + 1]
            value = utf8_atoms.get(data[pos + 2 : end], _MISSING)
            if value is _MISSING:
                value = new_atom(data, pos, pos + 2, end, True)
            return value, end
        if tag == 100:  # ATOM_EXT (latin-1; what OTP < 26 writes)
            end = pos + 3 + _u16(data, pos + 1)[0]
            value = latin1_atoms.get(data[pos + 3 : end], _MISSING)
            if value is _MISSING:
                value = new_atom(data, pos, pos + 3, end, False)
            return value, end
        if tag == 98:  # INTEGER_EXT
            return _i32(data, pos + 1)[0], pos + 5
        if tag == 70:  # NEW_FLOAT_EXT
            value = _f64(data, pos + 1)[0]
            if value - value:  # nan or inf (finite x - x is 0.0)
                raise DecodeError(f"float at byte {pos} is NaN or infinite")
            return value, pos + 9
        if tag == 106:  # NIL_EXT
            return [], pos + 1
        # ---- containers
        if tag == 116:  # MAP_EXT
            n = _u32(data, pos + 1)[0]
            start = pos
            pos += 5
            if 2 * n > len(data) - pos:
                raise _claims("map", start, n, "pairs", len(data) - pos)
            if depth <= 0:
                raise _too_deep(start)
            depth -= 1
            if 2 * n > budget[0]:
                raise _too_many("map", start, 2 * n, budget[0])
            budget[0] -= 2 * n
            result: dict[Any, Any] = {}
            for i in range(n):
                t = data[pos]
                # An Atom key can only equal another Atom (a real duplicate, caught below);
                # any other key, true/false/None included, is checked for a clash first,
                # see "map keys" in the module docstring.
                if t == 119:
                    end = pos + 2 + data[pos + 1]
                    x = utf8_atoms.get(data[pos + 2 : end], _MISSING)
                    if x is _MISSING:
                        x = new_atom(data, pos, pos + 2, end, True)
                    pos = end
                elif t == 100:
                    end = pos + 3 + _u16(data, pos + 1)[0]
                    x = latin1_atoms.get(data[pos + 3 : end], _MISSING)
                    if x is _MISSING:
                        x = new_atom(data, pos, pos + 3, end, False)
                    pos = end
                else:
                    x, pos = dec(data, pos, depth, budget)
                if type(x) is not Atom:
                    try:
                        clash = x in result
                    except TypeError:  # unhashable: a list, map, ... key
                        clash = True
                    if clash:
                        return map_slow(data, pos, depth, budget, result, x, n - i, start, n)
                t = data[pos]
                if t == 97:
                    result[x] = data[pos + 1]
                    pos += 2
                elif t == 109:
                    end = pos + 5 + _u32(data, pos + 1)[0]
                    if end > len(data):
                        raise _claims("binary", pos, end - pos - 5, "bytes", len(data) - pos - 5)
                    result[x] = data[pos + 5 : end]
                    pos = end
                elif t == 119:
                    end = pos + 2 + data[pos + 1]
                    v = utf8_atoms.get(data[pos + 2 : end], _MISSING)
                    if v is _MISSING:
                        v = new_atom(data, pos, pos + 2, end, True)
                    result[x] = v
                    pos = end
                else:
                    result[x], pos = dec(data, pos, depth, budget)
            if len(result) != n:
                raise DecodeError(f"map at byte {start} has duplicate keys")
            return result, pos
        if tag == 108:  # LIST_EXT
            if depth <= 0:
                raise _too_deep(pos)
            depth -= 1
            items: list[Any] = []
            put = items.append
            while True:  # a LIST_EXT tail continues the same list (in a loop, not recursion)
                n = _u32(data, pos + 1)[0]
                start = pos
                pos += 5
                if n >= len(data) - pos:  # n elements and a tail
                    raise _claims("list", start, n, "elements", len(data) - pos)
                if n > budget[0]:
                    raise _too_many("list", start, n, budget[0])
                budget[0] -= n
                for _ in range(n):
                    t = data[pos]
                    if t == 97:
                        put(data[pos + 1])
                        pos += 2
                    elif t == 119:
                        end = pos + 2 + data[pos + 1]
                        x = utf8_atoms.get(data[pos + 2 : end], _MISSING)
                        if x is _MISSING:
                            x = new_atom(data, pos, pos + 2, end, True)
                        put(x)
                        pos = end
                    elif t == 109:
                        end = pos + 5 + _u32(data, pos + 1)[0]
                        if end > len(data):
                            raise _claims("binary", pos, end - pos - 5, "bytes", len(data) - pos - 5)
                        put(data[pos + 5 : end])
                        pos = end
                    else:
                        x, pos = dec(data, pos, depth, budget)
                        put(x)
                t = data[pos]
                if t == 106:
                    return items, pos + 1
                if t != 108:
                    break
            tail, pos = dec(data, pos, depth, budget)
            if type(tail) is list:  # a STRING_EXT tail
                items.extend(tail)
                return items, pos
            return (ImproperList(items, tail) if items else tail), pos
        if tag == 104 or tag == 105:  # SMALL_TUPLE_EXT, LARGE_TUPLE_EXT
            start = pos
            if tag == 104:
                n = data[pos + 1]
                pos += 2
            else:
                n = _u32(data, pos + 1)[0]
                pos += 5
                if n > len(data) - pos:
                    raise _claims("tuple", start, n, "elements", len(data) - pos)
            if depth <= 0:
                raise _too_deep(start)
            depth -= 1
            if n > budget[0]:
                raise _too_many("tuple", start, n, budget[0])
            budget[0] -= n
            items = []
            put = items.append
            for _ in range(n):
                t = data[pos]
                if t == 97:
                    put(data[pos + 1])
                    pos += 2
                elif t == 119:
                    end = pos + 2 + data[pos + 1]
                    x = utf8_atoms.get(data[pos + 2 : end], _MISSING)
                    if x is _MISSING:
                        x = new_atom(data, pos, pos + 2, end, True)
                    put(x)
                    pos = end
                elif t == 100:
                    end = pos + 3 + _u16(data, pos + 1)[0]
                    x = latin1_atoms.get(data[pos + 3 : end], _MISSING)
                    if x is _MISSING:
                        x = new_atom(data, pos, pos + 3, end, False)
                    put(x)
                    pos = end
                else:
                    x, pos = dec(data, pos, depth, budget)
                    put(x)
            return tuple(items), pos
        if tag == 107:  # STRING_EXT: a charlist, i.e. a list of small ints
            end = pos + 3 + _u16(data, pos + 1)[0]
            if end > len(data):
                raise _claims("string", pos, end - pos - 3, "bytes", len(data) - pos - 3)
            if end - pos - 3 > budget[0]:
                raise _too_many("string", pos, end - pos - 3, budget[0])
            budget[0] -= end - pos - 3
            return list(data[pos + 3 : end]), end
        # ---- rarer leaves
        if tag == 110 or tag == 111:  # SMALL_BIG_EXT, LARGE_BIG_EXT
            if tag == 110:
                n = data[pos + 1]
                first = pos + 3
            else:
                n = _u32(data, pos + 1)[0]
                first = pos + 6
            end = first + n
            if end > len(data):
                raise _claims("bignum", pos, n, "digit bytes", len(data) - first)
            value = int.from_bytes(data[first:end], "little")
            return (-value if data[first - 1] else value), end  # any non-zero sign is negative
        if tag == 115 or tag == 118:  # SMALL_ATOM_EXT (latin-1), ATOM_UTF8_EXT
            if tag == 115:
                start = pos + 2
                end = start + data[pos + 1]
            else:
                start = pos + 3
                end = start + _u16(data, pos + 1)[0]
            utf8 = tag == 118
            value = (utf8_atoms if utf8 else latin1_atoms).get(data[start:end], _MISSING)
            if value is _MISSING:
                value = new_atom(data, pos, start, end, utf8)
            return value, end
        if tag == 77:  # BIT_BINARY_EXT
            n = _u32(data, pos + 1)[0]
            bits = data[pos + 5]
            end = pos + 6 + n
            if end > len(data):
                raise _claims("bitstring", pos, n, "bytes", len(data) - pos - 6)
            if (n == 0) != (bits == 0) or bits > 8:
                raise DecodeError(f"bitstring at byte {pos} has {n} bytes and {bits} bits")
            if n == 0 or bits == 8:  # a whole number of bytes is a binary
                return data[pos + 6 : end], end
            body = bytearray(data[pos + 6 : end])
            body[-1] &= (0xFF << (8 - bits)) & 0xFF  # Erlang ignores the unused bits
            return BitString(bytes(body), bits), end
        if tag == 99:  # FLOAT_EXT (old): 31 bytes of "%.20e" text
            end = pos + 32
            text = data[pos + 1 : end].split(b"\0", 1)[0]
            if len(data) < end or not _OLD_FLOAT.fullmatch(text):
                raise DecodeError(f"old-style float at byte {pos} is malformed")
            value = float(text)
            if value - value:
                raise DecodeError(f"float at byte {pos} is NaN or infinite")
            return value, end
        # ---- opaque terms: keep the whole sub-term, tag included
        if tag == 88:  # NEW_PID_EXT
            end = _atom_end(data, pos + 1) + 12
            cls: type[Opaque] = Pid
        elif tag == 103:  # PID_EXT
            end = _atom_end(data, pos + 1) + 9
            cls = Pid
        elif tag == 90 or tag == 114:  # NEWER_REFERENCE_EXT, NEW_REFERENCE_EXT
            words = _u16(data, pos + 1)[0]
            end = _atom_end(data, pos + 3) + (4 if tag == 90 else 1) + 4 * words
            cls = Reference
        elif tag == 101:  # REFERENCE_EXT
            end = _atom_end(data, pos + 1) + 5
            cls = Reference
        elif tag == 89:  # NEW_PORT_EXT
            end = _atom_end(data, pos + 1) + 8
            cls = Port
        elif tag == 120:  # V4_PORT_EXT
            end = _atom_end(data, pos + 1) + 12
            cls = Port
        elif tag == 102:  # PORT_EXT
            end = _atom_end(data, pos + 1) + 5
            cls = Port
        elif tag == 113:  # EXPORT_EXT: module, function, arity
            end = _atom_end(data, _atom_end(data, pos + 1))
            if data[end] != 97:
                raise DecodeError(f"export at byte {pos} has no small-integer arity")
            end += 2
            cls = Fun
        elif tag == 112:  # NEW_FUN_EXT: Size counts itself and everything after it
            size = _u32(data, pos + 1)[0]
            end = pos + 1 + size
            if end > len(data):
                raise _claims("fun", pos, size, "bytes", len(data) - pos - 1)
            if depth <= 0:
                raise _too_deep(pos)
            p = _pid_end(data, _int_end(data, _int_end(data, _atom_end(data, pos + 30))))
            p, mark = free_vars(data, p, _u32(data, pos + 26)[0], depth - 1, budget, pos)
            if p != end:
                raise DecodeError(f"fun at byte {pos} has size {size} but its fields take {p - pos - 1}")
            cls = Fun
        elif tag == 117:  # FUN_EXT (pre-R8 funs; still decodable by Erlang)
            if depth <= 0:
                raise _too_deep(pos)
            p = _int_end(data, _int_end(data, _atom_end(data, _pid_end(data, pos + 5))))
            end, mark = free_vars(data, p, _u32(data, pos + 1)[0], depth - 1, budget, pos)
            cls = Fun
        elif tag == 80:
            raise DecodeError(f"compressed term at byte {pos} is not at the top level")
        else:
            name = _TAG_NAMES.get(tag)
            what = f"unsupported tag {tag} ({name})" if name else f"unknown tag {tag}"
            raise DecodeError(f"{what} at byte {pos}")
        if end > len(data):
            raise _claims(cls.__name__.lower(), pos, end - pos, "bytes", len(data) - pos)
        if tag == 112 or tag == 117:
            return fun(data, pos, end, mark), end
        return cls(data[pos:end]), end

    def map_slow(
        data: bytes,
        pos: int,
        depth: int,
        budget: list[int],
        done: dict[Any, Any],
        key: Any,
        left: int,
        start: int,
        n: int,
    ) -> tuple[Any, int]:
        """Finish a map whose ``key`` (value at ``pos``) a plain dict cannot take as is.

        ``done`` holds the pairs before it, ``left`` counts the pairs from ``key`` on.
        """
        if len(done) != n - left:  # two equal atom keys merged before we got here
            raise DecodeError(f"map at byte {start} has duplicate keys")
        keys = list(done)
        values = list(done.values())
        for _ in range(left):
            if key is _MISSING:
                key, pos = dec(data, pos, depth, budget)
            keys.append(key)
            value, pos = dec(data, pos, depth, budget)
            values.append(value)
            key = _MISSING
        return _map_with_wrapped_keys(keys, values, start), pos

    nested = threading.local()  # .funs: (start, end, digest) of funs met in free variables

    def free_vars(data: bytes, pos: int, n: int, depth: int, budget: list[int], at: int) -> tuple[int, int]:
        """Validate the fun at ``at``'s ``n`` free variables: (where they end, mark for ``fun``).

        Their terms are only checked, not kept: the fun keeps its bytes.
        """
        if n > len(data) - pos:
            raise _claims("fun", at, n, "free variables", len(data) - pos)
        funs = getattr(nested, "funs", None)
        if funs is not None:  # inside another fun's free variables
            mark = len(funs)
            for _ in range(n):
                pos = dec(data, pos, depth, budget)[1]
            return pos, mark
        nested.funs = []
        try:
            for _ in range(n):
                pos = dec(data, pos, depth, budget)[1]
        finally:
            nested.funs = None
        return pos, -1

    def fun(data: bytes, pos: int, end: int, mark: int) -> Fun:
        """The fun ``data[pos:end]``; ``mark`` is what ``free_vars`` returned for it.

        A fun inside another fun's free variables is thrown away and matters only
        as a map key, where it must equal exactly the funs with the same bytes.
        Copying (or hashing) its bytes would cost once per fun it is nested in, so it
        stands as a digest of its bytes with each fun nested in it replaced by that
        fun's own digest: every byte is hashed once.
        """
        if mark < 0:
            return Fun(data[pos:end])
        funs = nested.funs
        h = hashlib.blake2b(digest_size=32)
        at = pos
        for start, stop, digest in funs[mark:]:  # the funs right inside this one, in order
            h.update(data[at : start + 1])  # up to and with its tag
            h.update(digest)
            at = stop
        h.update(data[at:end])
        digest = h.digest()
        del funs[mark:]
        funs.append((pos, end, digest))
        return Fun(b"\xff" + digest)  # 255 is no tag, so it equals no real fun's bytes

    return dec


_DECODERS: dict[str | None, Dec] = {}  # pure Python
_ACTIVE_DECODERS: dict[str | None, Dec] = {}


def _decoder(none_atom: str | None) -> Dec:
    """The decoder decode() and term_codec() use: C when ACCELERATED, else Python."""
    dec = _ACTIVE_DECODERS.get(none_atom)
    if dec is None:
        dec = _DECODERS.get(none_atom)
        if dec is None:
            dec = _DECODERS[none_atom] = _make_decoder(none_atom)
        if ACCELERATED:
            dec = _c_decoder(dec, none_atom)
        _ACTIVE_DECODERS[none_atom] = dec
    return dec


def _c_decoder(fallback: Dec, none_atom: str | None) -> Dec:
    """The C decoder that hands what it does not take to ``fallback`` (the Python ``dec``)."""
    decoder: Dec = _cetf.Decoder(fallback, _special_atoms(none_atom), Atom, ImproperList, _map_with_wrapped_keys).decode
    return decoder


def _inflate(data: bytes, max_inflated: int) -> bytes:
    """Inflate a COMPRESSED term body, never producing more than the declared size."""
    if len(data) < 6:
        raise DecodeError(f"compressed term header at byte 1 is truncated ({len(data)} bytes)")
    size = _u32(data, 2)[0]
    if size > max_inflated:
        raise DecodeError(f"compressed term at byte 1 declares {size} inflated bytes, over max_inflated={max_inflated}")
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data[6:], size + 1)  # one spare byte detects overflow
    except zlib.error as exc:
        raise DecodeError(f"compressed term at byte 1 is corrupt: {exc}") from None
    if len(body) > size:
        raise DecodeError(f"compressed term at byte 1 declares {size} inflated bytes but inflates to more")
    if not inflater.eof:
        raise DecodeError("compressed data starting at byte 6 is truncated")
    if len(body) != size:
        raise DecodeError(f"compressed term at byte 1 declares {size} inflated bytes but inflates to {len(body)}")
    if inflater.unused_data:
        raise DecodeError(f"trailing bytes after the compressed data ({len(inflater.unused_data)} bytes)")
    return body


def codec_name() -> str:
    """Which term codec this installation runs: the optional C accelerator or pure Python."""
    return "C-accelerated" if ACCELERATED else "pure-Python"


def decode(
    data: bytes | bytearray | memoryview,
    *,
    none_atom: str | None = "undefined",
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Any:
    """Decode one ETF term (version byte 131 first); the whole input must be used.

    ``none_atom`` is the atom that becomes ``None`` (``None``: no atom does);
    ``max_depth`` caps container nesting, ``max_inflated`` the size a compressed
    term may inflate to, ``max_elements`` the elements of all its lists, tuples,
    maps and strings together. Every failure raises DecodeError.
    """
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"expected bytes, got {type(data).__name__!r}")
        data = bytes(data)
    dec = _ACTIVE_DECODERS.get(none_atom) or _decoder(none_atom)
    size = len(data)
    if size < 2:
        raise DecodeError("empty input" if not size else "no term after the version byte")
    if data[0] != VERSION:
        raise DecodeError(f"bad version byte {data[0]} at byte 0 (expected {VERSION})")
    where = ""
    try:
        if data[1] == 80:  # COMPRESSED
            data = _inflate(data, max_inflated)
            size = len(data)
            where = " of the inflated data"
            term, end = dec(data, 0, max_depth, [max_elements])
        else:
            term, end = dec(data, 1, max_depth, [max_elements])
    except (IndexError, struct.error):
        raise DecodeError(f"truncated input: the term goes on past byte {size}{where}") from None
    except RecursionError:
        raise DecodeError("term nested too deeply for the Python stack") from None
    except DecodeError as exc:
        if where:
            raise DecodeError(f"{exc} (offsets are into the inflated data)") from None
        raise
    if end != size:
        if end > size:
            raise DecodeError(f"truncated input: the term goes on past byte {size}{where}")
        raise DecodeError(f"trailing bytes: the term ends at byte {end}{where} of {size}")
    return term


# --------------------------------------------------------------------------- encoding

_SMALL_INTS = [bytes((97, i)) for i in range(256)]
_SMALL_TUPLES = [bytes((104, i)) for i in range(256)]
_NIL = b"j"
_JUST_INT = {int}
_ATOM_BYTES: dict[str, dict[str, bytes]] = {e: {} for e in ATOM_ENCODINGS}  # per setting: name -> bytes


def _check_atom_encoding(atom_encoding: Any) -> None:
    if atom_encoding not in _ATOM_BYTES:
        raise EncodeError(f"atom_encoding must be 'latin1' or 'utf8', got {atom_encoding!r}")


def _atom(name: str, atom_encoding: AtomEncoding = "latin1") -> bytes:
    """Encode an atom name the ``atom_encoding`` way, memoised per setting."""
    cache = _ATOM_BYTES[atom_encoding]
    data = cache.get(name)
    if data is None:
        data = _atom_bytes(name, atom_encoding == "latin1")
        if len(cache) >= _ATOM_CACHE_SIZE:
            cache.clear()
        cache[str(name)] = data
    return data


def _atom_bytes(name: str, latin1: bool) -> bytes:
    """ATOM_EXT if ``latin1`` and every character fits, else SMALL_ATOM_UTF8_EXT / ATOM_UTF8_EXT."""
    if len(name) > 255:
        raise EncodeError(f"atom has {len(name)} characters; Erlang allows at most 255")
    if latin1:
        try:
            raw = name.encode("latin-1")
        except UnicodeEncodeError:  # needs UTF-8, as term_to_binary/1 of OTP 25 decides too
            pass
        else:
            return _pack_tag_u16(100, len(raw)) + raw
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(f"atom {name[:40]!r} is not valid Unicode") from None
    n = len(raw)
    return (_pack_tag_u8(119, n) if n < 256 else _pack_tag_u16(118, n)) + raw


def _bignum(x: int) -> bytes:
    sign = 0
    if x < 0:
        sign = 1
        x = -x
    n = (x.bit_length() + 7) >> 3
    digits = x.to_bytes(n, "little")
    if n < 256:
        return bytes((110, n, sign)) + digits
    return _pack_tag_u32(111, n) + bytes((sign,)) + digits


def _bitstring(x: BitString) -> list[bytes]:
    if x.bits == 8:
        return [_pack_tag_u32(109, len(x.data)), x.data]
    body = bytearray(x.data)
    body[-1] &= (0xFF << (8 - x.bits)) & 0xFF
    return [_pack_tag_u32(77, len(body)) + bytes((x.bits,)), bytes(body)]


def _cannot(x: Any) -> EncodeError:
    return EncodeError(f"cannot encode object of type {type(x).__name__!r} as an Erlang term")


def _make_encoder(none_atom: str, atom_encoding: AtomEncoding) -> Enc:
    """Build the recursive encoder ``enc(x, put)`` that writes ``x``'s parts with ``put``."""
    atoms = _ATOM_BYTES[atom_encoding]  # the memo, bound once: a closure cell is cheaper than a global

    def atom(name: str) -> bytes:
        return _atom(name, atom_encoding)

    none_bytes, true_bytes, false_bytes = atom(none_atom), atom("true"), atom("false")

    def enc(x: Any, put: Callable[[bytes], Any]) -> None:
        t = type(x)
        if t is int:
            if 0 <= x <= 255:
                put(_SMALL_INTS[x])
            elif -0x80000000 <= x <= 0x7FFFFFFF:
                put(_pack_tag_i32(98, x))
            else:
                put(_bignum(x))
        elif t is bytes:
            put(_pack_tag_u32(109, len(x)))
            put(x)
        elif t is Atom:
            put(atoms.get(x) or atom(x))
        elif t is str:
            x = x.encode()  # UnicodeEncodeError (lone surrogates) is converted in encode()
            put(_pack_tag_u32(109, len(x)))
            put(x)
        elif t is dict:
            put(_pack_tag_u32(116, len(x)))
            for k, v in x.items():
                t = type(k)
                if t is Atom:
                    put(atoms.get(k) or atom(k))
                else:
                    enc(k, put)
                t = type(v)
                if t is int and 0 <= v <= 255:
                    put(_SMALL_INTS[v])
                elif t is bytes:
                    put(_pack_tag_u32(109, len(v)))
                    put(v)
                elif t is Atom:
                    put(atoms.get(v) or atom(v))
                else:
                    enc(v, put)
        elif t is list:
            if not x:
                put(_NIL)
                return
            first = x[0]
            if (
                type(first) is int
                and 0 <= first <= 255
                and len(x) < 0x10000
                and set(map(type, x)) == _JUST_INT  # no bools: bytes() would take them
            ):
                try:
                    chars = bytes(x)
                except ValueError:  # some int is outside 0..255
                    pass
                else:
                    put(_pack_tag_u16(107, len(chars)))
                    put(chars)
                    return
            put(_pack_tag_u32(108, len(x)))
            for v in x:
                t = type(v)
                if t is int and 0 <= v <= 255:
                    put(_SMALL_INTS[v])
                elif t is bytes:
                    put(_pack_tag_u32(109, len(v)))
                    put(v)
                elif t is Atom:
                    put(atoms.get(v) or atom(v))
                else:
                    enc(v, put)
            put(_NIL)
        elif t is tuple:
            n = len(x)
            put(_SMALL_TUPLES[n] if n < 256 else _pack_tag_u32(105, n))
            for v in x:
                t = type(v)
                if t is Atom:
                    put(atoms.get(v) or atom(v))
                elif t is int and 0 <= v <= 255:
                    put(_SMALL_INTS[v])
                elif t is bytes:
                    put(_pack_tag_u32(109, len(v)))
                    put(v)
                else:
                    enc(v, put)
        elif t is float:
            if x - x:
                raise EncodeError(f"cannot encode {x!r}: Erlang floats are finite")
            put(_pack_tag_f64(70, x))
        elif x is None:
            put(none_bytes)
        elif x is True:
            put(true_bytes)
        elif x is False:
            put(false_bytes)
        else:
            enc_other(x, put)

    def enc_other(x: Any, put: Callable[[bytes], Any]) -> None:
        """Everything but the common exact types: terms types, subclasses, sets."""
        if isinstance(x, Opaque):
            put(x.data)
        elif isinstance(x, MapKey):
            enc(x.term, put)
        elif isinstance(x, ImproperList):
            items, tail = x.items, x.tail
            if type(tail) is ImproperList:
                enc(ImproperList(items + tail.items, tail.tail), put)
            elif isinstance(tail, list):
                enc(items + tail, put)
            elif not items:
                enc(tail, put)
            else:
                put(_pack_tag_u32(108, len(items)))
                for v in items:
                    enc(v, put)
                enc(tail, put)
        elif isinstance(x, BitString):
            for part in _bitstring(x):
                put(part)
        elif isinstance(x, Atom):
            put(atom(x))
        elif isinstance(x, int):  # IntEnum, IntFlag, ... (bool is handled exactly)
            enc(int(x), put)
        elif isinstance(x, float):
            enc(float(x), put)
        elif isinstance(x, str):
            raw = str.encode(x)
            put(_pack_tag_u32(109, len(raw)))
            put(raw)
        elif isinstance(x, (bytes, bytearray, memoryview)):
            raw = x.tobytes() if isinstance(x, memoryview) else bytes(x)
            put(_pack_tag_u32(109, len(raw)))
            put(raw)
        elif isinstance(x, tuple):
            enc(tuple(x), put)
        elif isinstance(x, (list, set, frozenset)):
            enc(list(x), put)
        elif isinstance(x, Mapping):
            enc(dict(x), put)
        else:
            raise _cannot(x)

    return enc


_ENCODERS: dict[tuple[str, str], Enc] = {}  # pure Python, by (none_atom, atom_encoding)
_ACTIVE_ENCODERS: dict[tuple[str, str], Enc] = {}


def _encoder(none_atom: str, atom_encoding: AtomEncoding = "latin1") -> Enc:
    key = (none_atom, atom_encoding)
    enc = _ENCODERS.get(key)
    if enc is None:
        if type(none_atom) is not str:
            raise EncodeError(f"none_atom must be a str, got {type(none_atom).__name__!r}")
        _check_atom_encoding(atom_encoding)
        enc = _ENCODERS[key] = _make_encoder(none_atom, atom_encoding)
    return enc


def _active_encoder(none_atom: str, atom_encoding: AtomEncoding = "latin1") -> Enc:
    """The encoder encode() and term_codec() use: C when ACCELERATED, else Python."""
    key = (none_atom, atom_encoding)
    enc = _ACTIVE_ENCODERS.get(key)
    if enc is None:
        enc = _encoder(none_atom, atom_encoding)  # checks both settings
        if ACCELERATED:
            enc = _cetf.Encoder(enc, _atom(none_atom, atom_encoding), Atom, atom_encoding == "latin1").encode
        _ACTIVE_ENCODERS[key] = enc
    return enc


# term_writer()s by atom_encoding, then none_atom: two str lookups per encode() call, no key tuple
_WRITERS: dict[str, dict[str, Callable[[bytes, Any], bytes]]] = {e: {} for e in ATOM_ENCODINGS}
_NO_WRITERS: dict[str, Callable[[bytes, Any], bytes]] = {}  # stays empty: for a bad atom_encoding


def term_writer(none_atom: str = "undefined", atom_encoding: AtomEncoding = "latin1") -> Callable[[bytes, Any], bytes]:
    """``write(prefix, term)``: ``prefix`` followed by the term's encoding, as one ``bytes``.

    The C encoder builds both in one buffer, so a big binary inside the term
    is copied once, not once more to put the prefix in front. Raises what
    ``enc`` of :func:`term_codec` raises.
    """
    writers = _WRITERS.get(atom_encoding, _NO_WRITERS)
    write = writers.get(none_atom)
    if write is None:
        enc = _active_encoder(none_atom, atom_encoding)  # checks both settings
        if ACCELERATED:

            def write(prefix: bytes, term: Any) -> bytes:
                parts: list[bytes] = []
                enc(term, parts.append, prefix)  # type: ignore[call-arg]
                return parts[0]
        else:

            def write(prefix: bytes, term: Any) -> bytes:
                parts = [prefix]
                enc(term, parts.append)
                return b"".join(parts)

        writers[none_atom] = write
    return write


def encode(
    term: Any, *, none_atom: str = "undefined", compressed: int = 0, atom_encoding: AtomEncoding = "latin1"
) -> bytes:
    """Encode ``term`` as ETF (version byte 131 first).

    ``None`` becomes the atom ``none_atom``; ``compressed`` (0..9) is the zlib
    level of ``term_to_binary(T, [{compressed, N}])``, 0 meaning uncompressed
    (``True`` means 6, like the bare ``compressed`` option); ``atom_encoding``
    is ``"latin1"`` (OTP 25's ``term_to_binary/1``) or ``"utf8"`` (OTP 26+).
    Raises EncodeError for values with no Erlang counterpart.
    """
    write = _WRITERS.get(atom_encoding, _NO_WRITERS).get(none_atom) or term_writer(none_atom, atom_encoding)
    try:
        data = write(b"\x83", term)
    except RecursionError:
        raise EncodeError("term is nested too deeply (or contains itself)") from None
    except struct.error:
        raise EncodeError("term has a binary, list, tuple or map over 2**32-1 long") from None
    except UnicodeEncodeError as exc:
        raise EncodeError(f"str is not valid Unicode: {exc.reason} at index {exc.start}") from None
    if not compressed:
        return data
    if compressed is True:  # like the bare `compressed` option
        compressed = 6
    if type(compressed) is not int or not 0 <= compressed <= 9:
        raise EncodeError(f"compressed must be an int in 0..9, got {compressed!r}")
    body = data[1:]
    packed = zlib.compress(body, compressed)
    if len(packed) + 5 >= len(body) or len(body) > _MAX_U32:
        return b"\x83" + body
    return b"".join((b"\x83", _pack_tag_u32(80, len(body)), packed))


def canonical(term: Any) -> bytes:
    """Bytes that are equal exactly when two terms are the same Erlang term (=:=).

    Used by ``terms.MapKey`` to hash and compare map keys; not valid ETF. It is
    the encoding with atoms always as UTF-8 (whatever ``atom_encoding`` replies
    use: MapKey hashes never change with it), lists always as LIST_EXT, ``None``
    as a private marker (so it never equals an atom), set elements sorted, and map keys replaced by a
    BLAKE2b-256 digest of their own canonical form with entries sorted by it.
    """
    parts: list[bytes] = []
    _canonical(term, parts.append, _encoder("undefined", "utf8"))
    return b"".join(parts)


def _digest(key: Any) -> bytes:
    return hashlib.blake2b(canonical(key), digest_size=32).digest()


_first = operator.itemgetter(0)


def _canonical(x: Any, put: Callable[[bytes], Any], enc: Callable[[Any, Any], None]) -> None:
    if x is None:
        put(b"\0")  # no ETF tag is 0, so this equals no atom
    elif isinstance(x, MapKey):
        # The key's own memo of canonical(x.term): a key nested in keys (as the decoder
        # builds them, inside out) is walked once, not once per level it is nested in.
        put(x._key())
    elif isinstance(x, Mapping):
        # Each key stands as a digest of its canonical form: entries get an order of their
        # own, and keys nested inside keys are hashed once, so hostile input stays linear.
        entries = sorted(((_digest(k), v) for k, v in x.items()), key=_first)
        put(_pack_tag_u32(116, len(entries)))
        for key, value in entries:
            put(key)
            _canonical(value, put, enc)
    elif isinstance(x, tuple):
        n = len(x)
        put(_SMALL_TUPLES[n] if n < 256 else _pack_tag_u32(105, n))
        for v in x:
            _canonical(v, put, enc)
    elif isinstance(x, (list, set, frozenset)):
        if x:
            put(_pack_tag_u32(108, len(x)))
            if isinstance(x, list):
                for v in x:
                    _canonical(v, put, enc)
            else:  # a set has no order of its own
                for element in sorted(canonical(v) for v in x):
                    put(element)
        put(_NIL)
    elif isinstance(x, ImproperList):
        items, tail = x.items, x.tail
        while isinstance(tail, ImproperList):
            items, tail = items + tail.items, tail.tail
        if isinstance(tail, list):
            _canonical(items + tail, put, enc)
        elif not items:
            _canonical(tail, put, enc)
        else:
            put(_pack_tag_u32(108, len(items)))
            for v in items:
                _canonical(v, put, enc)
            _canonical(tail, put, enc)
    else:
        enc(x, put)


def term_codec(none_atom: str = "undefined", atom_encoding: AtomEncoding = "latin1") -> tuple[Dec, Enc]:
    """The raw decoder and encoder behind :func:`decode` and :func:`encode`.

    For a caller that walks an envelope itself and must not pay for a second
    pass (the worker's request fast path): ``dec(data, pos, depth, budget)``
    returns ``(term, end)``, lowering ``budget[0]`` (elements the term may still
    hold) by the elements it decoded, and may raise IndexError, struct.error,
    RecursionError or DecodeError on bad input (callers fall back to
    :func:`decode` for the message); ``enc(term, put)`` writes the term without
    the version byte, its atoms the ``atom_encoding`` way.
    Both are the C ones when ACCELERATED (the C ``enc`` calls ``put`` once).
    """
    return _decoder(none_atom), _active_encoder(none_atom, atom_encoding)


use_canonical(canonical)  # MapKey (poolport.codec.terms) compares keys with it
