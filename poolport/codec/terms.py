"""Python types for Erlang terms that have no natural Python counterpart.

Opaque terms (pids, ports, references, funs) keep the exact bytes they arrived
as, so they go back to Erlang byte-identical and compare equal to themselves.
"""

from __future__ import annotations

from typing import Any, Callable

# How MapKey compares keys: the codec's canonical encoding (Erlang's =:=). poolport.codec.etf
# registers it when it is imported (the package imports it), so this module needs no codec.
_canonical_of: Callable[[Any], bytes] | None = None


def use_canonical(fn: Callable[[Any], bytes]) -> None:
    """Called once by poolport.codec.etf: the function MapKey hashes and compares with."""
    global _canonical_of
    _canonical_of = fn


class Atom(str):
    """An Erlang atom; a ``str`` so handlers can compare it to plain strings."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


class Opaque:
    """An Erlang term kept as its raw ETF bytes (without the version byte)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.data == self.data

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.data))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.data!r})"


class Pid(Opaque):
    """An Erlang pid (PID_EXT / NEW_PID_EXT)."""

    __slots__ = ()


class Reference(Opaque):
    """An Erlang reference (REFERENCE_EXT / NEW_REFERENCE_EXT / NEWER_REFERENCE_EXT)."""

    __slots__ = ()


Ref = Reference


class Port(Opaque):
    """An Erlang port identifier (PORT_EXT / NEW_PORT_EXT / V4_PORT_EXT)."""

    __slots__ = ()


class Fun(Opaque):
    """An Erlang fun or external fun (FUN_EXT / NEW_FUN_EXT / EXPORT_EXT)."""

    __slots__ = ()


class BitString:
    """A bitstring whose length is not a whole number of bytes.

    ``bits`` is how many bits of the last byte are used (1..8), as in BIT_BINARY_EXT.
    """

    __slots__ = ("data", "bits")

    def __init__(self, data: bytes, bits: int) -> None:
        if not data or not 1 <= bits <= 8:
            raise ValueError("BitString needs at least one byte and 1..8 bits in the last byte")
        self.data = bytes(data)
        self.bits = bits

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BitString) and other.data == self.data and other.bits == self.bits

    def __hash__(self) -> int:
        return hash((self.data, self.bits))

    def __repr__(self) -> str:
        return f"BitString({self.data!r}, {self.bits})"


class ImproperList:
    """A list whose tail is not ``[]``: ``[a, b | tail]``."""

    __slots__ = ("items", "tail")

    def __init__(self, items: list[Any], tail: Any) -> None:
        self.items = list(items)
        self.tail = tail

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImproperList) and other.items == self.items and other.tail == self.tail

    def __hash__(self) -> int:  # pragma: no cover - lists are unhashable anyway
        raise TypeError("unhashable type: 'ImproperList'")

    def __repr__(self) -> str:
        return f"ImproperList({self.items!r}, {self.tail!r})"


class MapKey:
    """A map key a plain dict cannot hold as is: a list, a map, or a float/bool key
    that Python's ``==`` would merge with another (``1 == 1.0 == True``).

    ``term`` is the key itself; equality and hashing use its canonical encoding,
    i.e. Erlang's exact equality (``=:=``). Encodes as ``term``. Do not mutate
    ``term`` once the key is in a dict.
    """

    __slots__ = ("_canonical", "term")

    def __init__(self, term: Any) -> None:
        self.term = term
        self._canonical: bytes | None = None

    def _key(self) -> bytes:
        key = self._canonical
        if key is None:
            assert _canonical_of is not None, "poolport.codec.etf registers it on import"
            key = self._canonical = _canonical_of(self.term)
        return key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MapKey):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"MapKey({self.term!r})"
