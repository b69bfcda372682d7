"""A term's first bytes, read without decoding it.

The dispatcher routes frames it never decodes, and a worker maps the first
bytes of a request straight to its handler: both ask only what a term *starts*
with (which tuple, which atoms). The answers are here, next to the codec that
owns the format, so the byte layout of External Term Format is written down
once. Nothing here copies more than a term's head.
"""

from __future__ import annotations

import zlib

VERSION = 131  # the first byte of every term_to_binary/1 result
SMALL_TUPLE = 104  # SMALL_TUPLE_EXT: arity in one byte
COMPRESSED = 80  # term_to_binary(T, [compressed]): 4-byte inflated size, then zlib
SMALL_ATOMS = (115, 119)  # SMALL_ATOM_EXT (latin-1), SMALL_ATOM_UTF8_EXT: length in one byte
ATOMS = (100, 118)  # ATOM_EXT (latin-1), ATOM_UTF8_EXT: length in two bytes
UTF8_ATOMS = (118, 119)
SMALL_INTEGER, INTEGER = 97, 98


def atom_forms(name: str) -> tuple[bytes, ...]:
    """The four ways the atom ``name`` can be written (SMALL_ATOM_UTF8, SMALL_ATOM, ATOM, ATOM_UTF8);
    ``name`` is ASCII, so its bytes are the same in both encodings."""
    raw = name.encode("ascii")
    n = len(raw)
    return (bytes([119, n]) + raw, bytes([115, n]) + raw, bytes([100, 0, n]) + raw, bytes([118, 0, n]) + raw)


def tuple_heads(arities: int | tuple[int, ...], first: str, version: bool = True) -> tuple[bytes, ...]:
    """Every way a tuple ``{first, ...}`` of one of ``arities`` can begin (with the version byte
    unless ``version`` is False): ``data.startswith(heads, pos)`` tests for it in one call."""
    arities = (arities,) if isinstance(arities, int) else arities
    lead = bytes([VERSION]) if version else b""
    return tuple(lead + bytes([SMALL_TUPLE, n]) + form for n in arities for form in atom_forms(first))


def atom_end(data: bytes, pos: int, end: int) -> int:
    """Offset just after the atom at ``pos``, or 0 if no whole atom is there before ``end``."""
    if pos + 2 > end:
        return 0
    tag = data[pos]
    if tag in SMALL_ATOMS:
        after = pos + 2 + data[pos + 1]
    elif tag in ATOMS and pos + 3 <= end:
        after = pos + 3 + (data[pos + 1] << 8 | data[pos + 2])
    else:
        return 0
    return after if after <= end else 0


def atoms_end(data: bytes, pos: int, end: int, count: int) -> int:
    """Offset just after ``count`` atoms in a row from ``pos``, or 0 if they are not all there
    with something after them (a request's ``call, M, F`` is followed by its arguments)."""
    for _ in range(count):
        pos = atom_end(data, pos, end)
        if not pos:
            return 0
    return pos if pos < end else 0


def request_head_end(data: bytes, start: int, end: int) -> int:
    """Offset just after ``{Kind, M, F`` of the 4-tuple term at ``data[start:end]`` (version
    byte, then three atoms), or 0. Calls of one function share these bytes: the worker and
    the dispatcher key what they learn of a function on them."""
    if end - start <= 3 or data[start] != VERSION or data[start + 1] != SMALL_TUPLE or data[start + 2] != 4:
        return 0
    return atoms_end(data, start + 3, end, 3)


def read_atoms(data: bytes, pos: int, count: int) -> list[str] | None:
    """The names of ``count`` atoms in a row from ``pos`` (undecodable bytes replaced), or
    ``None`` if something else is there."""
    out = []
    for _ in range(count):
        after = atom_end(data, pos, len(data))
        if not after:
            return None
        start = pos + (2 if data[pos] in SMALL_ATOMS else 3)
        out.append(data[start:after].decode("utf-8" if data[pos] in UTF8_ATOMS else "latin-1", errors="replace"))
        pos = after
    return out


def small_ints(data: bytes, pos: int, end: int, count: int) -> list[int] | None:
    """``count`` integers in a row from ``pos`` (SMALL_INTEGER or INTEGER), or ``None``."""
    out = []
    for _ in range(count):
        if pos >= end:
            return None
        tag = data[pos]
        if tag == SMALL_INTEGER and pos + 2 <= end:
            out.append(data[pos + 1])
            pos += 2
        elif tag == INTEGER and pos + 5 <= end:
            out.append(int.from_bytes(data[pos + 1 : pos + 5], "big", signed=True))
            pos += 5
        else:
            return None
    return out


def head(data: bytes, start: int, end: int, size: int) -> bytes | None:
    """The first ``size`` bytes (at most) of the term at ``data[start:end]``, version byte
    included, as if it were not compressed: a compressed term has just that much inflated.
    ``None`` if its compressed stream is broken."""
    if end - start > 6 and data[start + 1] == COMPRESSED:
        try:
            stream = data[start + 6 : min(end, start + 6 + 64 * size)]
            return bytes([VERSION]) + zlib.decompressobj().decompress(stream, size - 1)
        except zlib.error:
            return None
    return bytes(data[start : min(end, start + size)])
