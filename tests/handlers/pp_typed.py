"""Typed handlers used by tests/test_typed.py (allowlisted as `pp_typed`)."""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from typing import Optional

import msgspec

import poolport
from poolport import Atom, BitString, ImproperList, Pid


class Person(msgspec.Struct):
    name: str
    age: int
    tags: list[str] = []


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Color(enum.Enum):
    RED = 1
    GREEN = 2
    BLUE = 3


def greet(name: str) -> str:
    return f"Hello, {name}"


def add(a: int, b: int) -> int:
    return a + b


def scale(x: float, k: float = 2.0) -> float:
    return x * k


def negate(b: bool) -> bool:
    return not b


def size(data: bytes) -> int:
    return len(data)


def total(xs: list[int]) -> int:
    return sum(xs)


def swap(pair: tuple[int, str]) -> tuple[str, int]:
    return (pair[1], pair[0])


def weigh(weights: dict[str, float]) -> list:
    return sorted(weights.items())


def maybe(name: Optional[str] = None) -> str:
    return "anonymous" if name is None else name


def describe(person: Person) -> str:
    return f"{person.name} ({person.age}): {', '.join(person.tags) or 'no tags'}"


def birthday(person: Person) -> Person:
    return Person(person.name, person.age + 1, person.tags)


def mirror(p: Point) -> Point:
    return Point(-p.x, -p.y)


def next_color(c: Color) -> Color:
    return Color(c.value % 3 + 1)


def summed(*xs: int) -> int:
    return sum(xs)


def types_of(name: str, data: bytes, n: int, ratio: float, items: list[str]) -> list[str]:
    """The exact Python types the handler received (proves conversion end to end)."""
    return [type(v).__name__ for v in (name, data, n, ratio, *items)]


def raw(x):
    """Unannotated: gets the plain mapping (a binary stays bytes)."""
    return [type(x).__name__, x]


@poolport.handler(name="hello")
def greet_impl(name: str) -> str:
    return f"Hi, {name}"


@poolport.handler(timeout_ms=300)
def slow(ms: int) -> int:
    time.sleep(ms / 1000)
    return ms


def as_charlist(s: str) -> list[int]:
    return list(s.encode())


def as_atom(s: str) -> Atom:
    return Atom(s)


def as_bits() -> BitString:
    return BitString(b"\xff\x80", 1)  # <<255, 1:1>>


def pid_echo(p: Pid) -> Pid:
    return p


def split_improper(x: ImproperList) -> tuple:
    return (x.items, x.tail)


def bad_struct() -> Person:
    return Person("x", 1, [object()])  # type: ignore[list-item]


# --- per-worker state -------------------------------------------------------------------


def init(log_path: str, tag: str) -> dict:
    """worker_init: record this process's pid (one line per run) and return the worker's state."""
    with open(log_path, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    return {"pid": os.getpid(), "tag": tag, "calls": 0}


def state_info(sleep_ms: int = 0) -> tuple:
    time.sleep(sleep_ms / 1000)
    state = poolport.worker_state()
    state["calls"] += 1
    return (state["pid"], os.getpid(), state["calls"], state["tag"])


def no_state():
    return poolport.worker_state()


def bad_init() -> None:
    raise RuntimeError("model file missing: /nonexistent/model.bin")
