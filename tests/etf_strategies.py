"""Hypothesis strategies for the ETF codec tests (tests/conftest.py puts this dir on sys.path).

``terms()`` draws Python values in the image of the decoder, so
``decode(encode(t)) == t`` must hold for every one of them; ``opaque_blobs()``
draws byte strings of pids, ports, references and funs, which the codec must
write back byte-identical.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import strategies as st

from poolport.codec.terms import Atom, BitString, ImproperList, MapKey

RESERVED_ATOMS = {"true", "false", "undefined", "nil", "none"}  # True/False/None (none_atom)


def atoms(max_size: int = 20) -> st.SearchStrategy[Atom]:
    """Atoms other than the reserved names; up to 255 characters is the Erlang limit."""
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=max_size)
    return text.filter(lambda s: s not in RESERVED_ATOMS).map(Atom)


def _signed(magnitude: bytes, negative: bool) -> int:
    value = int.from_bytes(magnitude, "big")
    return -value if negative else value


ints = st.one_of(
    st.integers(min_value=-300, max_value=300),
    st.integers(min_value=-(2**31) - 2, max_value=2**31 + 1),
    st.builds(_signed, st.binary(max_size=24), st.booleans()),  # SMALL_BIG
)
# LARGE_BIG too; kept out of ``terms()`` so hypothesis's reprs of drawn terms stay small
huge_ints = st.builds(_signed, st.binary(min_size=250, max_size=300), st.booleans())
floats = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def bitstrings(draw: st.DrawFn) -> BitString:
    data = bytearray(draw(st.binary(min_size=1, max_size=20)))
    bits = draw(st.integers(min_value=1, max_value=7))
    data[-1] &= (0xFF << (8 - bits)) & 0xFF  # canonical: unused bits are zero
    return BitString(bytes(data), bits)


leaves = st.one_of(
    ints,
    floats,
    atoms(),
    st.booleans(),
    st.none(),
    st.binary(max_size=40),
    bitstrings(),
)

hashable_keys = st.recursive(
    st.one_of(ints, floats, atoms(), st.booleans(), st.none(), st.binary(max_size=10), bitstrings()),
    lambda inner: st.lists(inner, max_size=3).map(tuple),
    max_leaves=5,
)


def _dicts(keys: st.SearchStrategy[Any], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict]:
    # Pairs folded into a dict rather than st.dictionaries: its uniqueness filter would
    # repr the whole recursive strategy, which hypothesis warns about (an error here).
    return st.lists(st.tuples(keys, values), max_size=5).map(dict)


def _improper(children: st.SearchStrategy[Any]) -> st.SearchStrategy[ImproperList]:
    tails = st.one_of(leaves, st.lists(children, max_size=3).map(tuple))  # anything but a list
    return st.builds(ImproperList, st.lists(children, min_size=1, max_size=4), tails)


def _map_keys(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Hashable keys as they are; lists and maps wrapped in MapKey, as decode does."""
    unhashable = st.one_of(st.lists(children, max_size=3), _dicts(hashable_keys, children))
    return st.one_of(hashable_keys, unhashable.map(MapKey))


def terms(max_leaves: int = 30) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=6),
            st.lists(children, max_size=6).map(tuple),
            _dicts(_map_keys(children), children),
            _improper(children),
            st.lists(st.integers(min_value=0, max_value=255), max_size=20),  # charlists
        ),
        max_leaves=max_leaves,
    )


# ---- opaque terms, built byte by byte as term_to_binary writes them


def _atom_bytes(name: bytes, utf8: bool) -> bytes:
    if utf8:
        return bytes((119, len(name))) + name
    return b"d" + struct.pack(">H", len(name)) + name


node_atoms = st.builds(
    _atom_bytes,
    st.sampled_from([b"nonode@nohost", b"a@b", b"poolport@host-1", "nœud@hôte".encode()]),
    st.booleans(),
)

u32 = st.integers(min_value=0, max_value=2**32 - 1).map(lambda i: struct.pack(">I", i))
u8 = st.integers(min_value=0, max_value=255).map(lambda i: bytes((i,)))


@st.composite
def pids(draw: st.DrawFn) -> bytes:
    node = draw(node_atoms)
    if draw(st.booleans()):
        return b"X" + node + draw(u32) + draw(u32) + draw(u32)  # NEW_PID_EXT
    return b"g" + node + draw(u32) + draw(u32) + draw(u8)  # PID_EXT


@st.composite
def ports(draw: st.DrawFn) -> bytes:
    node = draw(node_atoms)
    kind = draw(st.sampled_from("YxfX"))
    if kind == "Y":
        return b"Y" + node + draw(u32) + draw(u32)  # NEW_PORT_EXT
    if kind == "x":
        return b"x" + node + draw(u32) + draw(u32) + draw(u32)  # V4_PORT_EXT
    return b"f" + node + draw(u32) + draw(u8)  # PORT_EXT


@st.composite
def refs(draw: st.DrawFn) -> bytes:
    node = draw(node_atoms)
    words = draw(st.integers(min_value=1, max_value=5))
    ids = b"".join(draw(u32) for _ in range(words))
    kind = draw(st.sampled_from("Zre"))
    if kind == "Z":
        return b"Z" + struct.pack(">H", words) + node + draw(u32) + ids  # NEWER_REFERENCE_EXT
    if kind == "r":
        return b"r" + struct.pack(">H", words) + node + draw(u8) + ids  # NEW_REFERENCE_EXT
    return b"e" + node + draw(u32) + draw(u8)  # REFERENCE_EXT


@st.composite
def funs(draw: st.DrawFn) -> bytes:
    module = _atom_bytes(draw(st.sampled_from([b"lists", b"my_mod", b"m"])), draw(st.booleans()))
    if draw(st.booleans()):  # EXPORT_EXT
        function = _atom_bytes(b"map", True)
        return b"q" + module + function + bytes((97, draw(st.integers(0, 255))))
    free = draw(st.lists(st.sampled_from([b"a\x01", b"j", b"w\x02ok", b"m\x00\x00\x00\x01z"]), max_size=3))
    body = (
        bytes((draw(st.integers(0, 255)),))  # arity
        + draw(st.binary(min_size=16, max_size=16))  # uniq
        + draw(u32)  # index
        + struct.pack(">I", len(free))
        + module
        + b"a\x0c"  # old index
        + b"b"
        + draw(u32)  # old uniq
        + draw(pids())
        + b"".join(free)
    )
    return b"p" + struct.pack(">I", len(body) + 4) + body  # NEW_FUN_EXT


def opaque_blobs() -> st.SearchStrategy[bytes]:
    """Whole ETF encodings (version byte first) of opaque terms, alone or in a tuple/list."""
    one = st.one_of(pids(), ports(), refs(), funs())
    return st.one_of(
        one.map(lambda b: b"\x83" + b),
        st.lists(one, min_size=1, max_size=4).map(lambda bs: b"\x83" + bytes((104, len(bs))) + b"".join(bs)),
    )


@st.composite
def mutated(draw: st.DrawFn, soup: st.SearchStrategy[bytes] | None = None) -> bytes:
    """A valid encoding with a few bytes changed, removed, inserted or cut off.

    ``soup``: more encodings (version byte first) to start from, whose bodies
    may also be spliced in at random places.
    """
    from poolport.codec.etf import encode

    sources = [terms(max_leaves=12).map(encode), opaque_blobs()] + ([soup] if soup is not None else [])
    actions = ["set", "delete", "insert", "cut"] + (["splice"] if soup is not None else [])
    data = bytearray(draw(st.one_of(sources)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        i = draw(st.integers(min_value=0, max_value=len(data)))
        action = draw(st.sampled_from(actions))
        if action == "set" and i < len(data):
            data[i] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif action == "delete" and i < len(data):
            del data[i]
        elif action == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif action == "splice":
            data[i:i] = draw(soup)[1:]  # type: ignore[arg-type]
        elif action == "cut":
            del data[i:]
    return bytes(data)
