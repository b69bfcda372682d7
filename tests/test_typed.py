"""Typed handlers, @poolport.handler, per-worker state (worker_init), result conversion.

Unit tables for every conversion and its error message, the decorator and
``to_term``; then the worker in-process; then a real ``poolport serve`` over
pipes (PortClient) and a real Erlang VM (tests/erl/typed_client.escript).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal, NamedTuple, Optional, TypedDict, Union

import msgspec
import pytest

import poolport
from poolport import (
    ArgumentError,
    Atom,
    BitString,
    EncodeError,
    ImproperList,
    Pid,
    PoolportError,
    Ref,
)
from poolport.codec import etf
from poolport.handlers import typed
from poolport.config import Config, load_config
from poolport.errors import ConfigError
from poolport.handlers.handler import (
    HandlerSettings,
    aliases,
    clear_worker_state,
    exposed_name,
    run_worker_init,
    set_worker_state,
    settings_of,
)
from poolport.codec.terms import MapKey
from poolport.server.worker import Worker
from portclient import HANDLERS, ROOT, A, PortClient, call

OK = A("reply")
ERROR = A("error")
TYPED_CONFIG = str(ROOT / "config" / "typed.yaml")


# ---------------------------------------------------------------------- types used by the tables


class Person(msgspec.Struct):
    name: str
    age: int
    tags: list[str] = []


class Renamed(msgspec.Struct, rename="camel"):
    first_name: str


class Strict(msgspec.Struct, forbid_unknown_fields=True):
    a: int


class Row(msgspec.Struct, array_like=True):
    id: int
    label: str


class Circle(msgspec.Struct, tag=True):
    r: float


class Square(msgspec.Struct, tag=True):
    side: float


@dataclasses.dataclass
class Point:
    x: float
    y: float


class Movie(TypedDict):
    title: str
    year: int


class Pair(NamedTuple):
    left: int
    right: str


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Mode(str, enum.Enum):
    FAST = "fast-mode"
    SLOW = "slow-mode"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


UUID = "c0a8a2a6-1d4e-4c4b-9e1a-1a2b3c4d5e6f"
LEAVES = [None, True, 1, 1.5, b"b", "s", A("a")]


def typed_fn(annotation: Any, *, name: str = "x") -> Any:
    """A handler ``def f(<name>: annotation): return <name>``, wrapped."""

    def f(*args: Any) -> Any:
        return args[0]

    param = inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
    f.__signature__ = inspect.Signature([param])  # type: ignore[attr-defined]
    f.__annotations__ = {name: annotation}
    return typed.wrap(f)


# ---------------------------------------------------------------------- conversions that work


@pytest.mark.parametrize(
    ("annotation", "value", "expected"),
    [
        # str: a UTF-8 binary, a charlist or an atom
        pytest.param(str, b"World", "World", id="str-binary"),
        pytest.param(str, list(b"World"), "World", id="str-charlist"),
        pytest.param(str, [74, 111, 115, 233, 0x4E16], "Jos\u00e9\u4e16", id="str-unicode-charlist"),
        pytest.param(str, "José".encode(), "José", id="str-utf8-binary"),
        pytest.param(str, Atom("World"), "World", id="str-atom"),
        pytest.param(str, [], "", id="str-empty-charlist"),
        pytest.param(str, b"", "", id="str-empty-binary"),
        # scalars
        pytest.param(int, 42, 42, id="int"),
        pytest.param(int, 1 << 70, 1 << 70, id="int-bignum"),
        pytest.param(float, 1.5, 1.5, id="float"),
        pytest.param(float, 3, 3.0, id="float-from-integer"),
        pytest.param(bool, True, True, id="bool"),
        pytest.param(bytes, b"\x00\xff", b"\x00\xff", id="bytes"),
        pytest.param(bytearray, b"ab", bytearray(b"ab"), id="bytearray"),
        # containers
        pytest.param(list[int], [1, 2, 3], [1, 2, 3], id="list-int"),
        pytest.param(list[int], list(b"abc"), [97, 98, 99], id="list-int-from-charlist"),
        pytest.param(list[int], (1, 2), [1, 2], id="list-from-tuple"),
        pytest.param(list[str], [b"a", "b", Atom("c")], ["a", "b", "c"], id="list-str-mixed"),
        pytest.param(list[list[str]], [[b"a"], [[98]]], [["a"], ["b"]], id="nested-list"),
        pytest.param(set[str], [b"a", b"a", b"b"], {"a", "b"}, id="set-str"),
        pytest.param(tuple[int, str], (1, b"a"), (1, "a"), id="tuple"),
        pytest.param(tuple[int, str], [1, b"a"], (1, "a"), id="tuple-from-list"),
        pytest.param(tuple[str, ...], (b"a", b"b"), ("a", "b"), id="var-tuple"),
        pytest.param(
            dict[str, int], {Atom("a"): 1, b"b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3}, id="dict-atom-and-binary-keys"
        ),
        pytest.param(dict[str, list[str]], {b"k": [b"v"]}, {"k": ["v"]}, id="dict-nested-values"),
        pytest.param(dict[int, str], {1: b"one"}, {1: "one"}, id="dict-int-keys"),
        pytest.param(dict, {Atom("a"): b"x"}, {Atom("a"): b"x"}, id="bare-dict-untouched"),
        pytest.param(list, [b"x"], [b"x"], id="bare-list-untouched"),
        # Optional / unions
        pytest.param(Optional[str], None, None, id="optional-none"),
        pytest.param(Optional[str], b"x", "x", id="optional-binary"),
        pytest.param(Union[int, str], 3, 3, id="union-int"),
        pytest.param(Union[int, str], b"3", "3", id="union-binary-to-str"),
        pytest.param(Union[list[int], str], [104, 105], [104, 105], id="union-list-kept-as-list"),
        pytest.param(Union[bytes, str], b"x", b"x", id="union-binary-kept-as-bytes"),
        # Structs, dataclasses, TypedDict, NamedTuple from maps / tuples
        pytest.param(Person, {Atom("name"): b"Ann", Atom("age"): 30}, Person("Ann", 30), id="struct-atom-keys"),
        pytest.param(
            Person,
            {b"name": [66], b"age": 7, b"tags": [b"x", Atom("y")]},
            Person("B", 7, ["x", "y"]),
            id="struct-binary-keys",
        ),
        pytest.param(
            Person,
            {Atom("name"): b"A", Atom("age"): 1, Atom("extra"): 1},
            Person("A", 1),
            id="struct-extra-key-ignored",
        ),
        pytest.param(Renamed, {Atom("firstName"): b"Al"}, Renamed("Al"), id="struct-renamed"),
        pytest.param(Row, (1, b"x"), Row(1, "x"), id="struct-array-like"),
        pytest.param(
            Union[Circle, Square],
            {Atom("type"): Atom("Square"), Atom("side"): 2},
            Square(2.0),
            id="tagged-union-atom-tag",
        ),
        pytest.param(Union[Circle, Square], {b"type": b"Circle", b"r": 1}, Circle(1.0), id="tagged-union-binary-tag"),
        pytest.param(Point, {Atom("x"): 1, Atom("y"): 2.5}, Point(1.0, 2.5), id="dataclass"),
        pytest.param(Movie, {b"title": b"Up", b"year": 2009}, {"title": "Up", "year": 2009}, id="typeddict"),
        pytest.param(Pair, (1, b"r"), Pair(1, "r"), id="namedtuple"),
        pytest.param(list[Point], [{Atom("x"): 0, Atom("y"): 0}], [Point(0.0, 0.0)], id="list-of-dataclass"),
        pytest.param(Optional[Person], None, None, id="optional-struct"),
        # enums and literals: atom (member name, as is or lowercased), binary, or the value
        pytest.param(Color, Atom("red"), Color.RED, id="enum-lowercase-name"),
        pytest.param(Color, Atom("RED"), Color.RED, id="enum-name"),
        pytest.param(Color, b"green", Color.GREEN, id="enum-binary-name"),
        pytest.param(Color, 2, Color.GREEN, id="enum-value"),
        pytest.param(Optional[Color], Atom("red"), Color.RED, id="optional-enum"),
        pytest.param(Mode, Atom("fast"), Mode.FAST, id="str-enum-name"),
        pytest.param(Mode, b"slow-mode", Mode.SLOW, id="str-enum-value"),
        pytest.param(Level, 2, Level.HIGH, id="int-enum-value"),
        pytest.param(Literal["on", "off"], Atom("on"), "on", id="literal-atom"),
        pytest.param(Literal["on", "off"], b"off", "off", id="literal-binary"),
        pytest.param(Literal[1, 2], 2, 2, id="literal-int"),
        # constraints and text-parsed types
        pytest.param(Annotated[int, msgspec.Meta(ge=1)], 5, 5, id="constrained-int"),
        pytest.param(Annotated[str, msgspec.Meta(max_length=3)], b"abc", "abc", id="constrained-str"),
        pytest.param(
            datetime,
            b"2024-01-02T03:04:05Z",
            datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
            id="datetime-from-binary",
        ),
        pytest.param(uuid.UUID, UUID.encode(), uuid.UUID(UUID), id="uuid-from-binary"),
        pytest.param(Decimal, b"1.25", Decimal("1.25"), id="decimal-from-binary"),
        # explicit Erlang types
        pytest.param(Atom, Atom("ok"), Atom("ok"), id="atom"),
        pytest.param(Pid, Pid(b"X\x00"), Pid(b"X\x00"), id="pid"),
        pytest.param(Ref, Ref(b"Z\x00"), Ref(b"Z\x00"), id="ref"),
        pytest.param(ImproperList, ImproperList([1], 2), ImproperList([1], 2), id="improper-list"),
        pytest.param(BitString, BitString(b"\x80", 1), BitString(b"\x80", 1), id="bitstring"),
        pytest.param(Any, b"untouched", b"untouched", id="any"),
    ],
)
def test_conversion(annotation, value, expected):
    got = typed_fn(annotation)(value)
    assert got == expected
    assert type(got) is type(expected)
    if isinstance(expected, (list, tuple)) and expected and isinstance(expected[0], str):
        assert all(type(v) is str for v in got)  # plain str, never an Atom


def test_str_parameter_gets_a_plain_str_not_an_atom():
    assert type(typed_fn(str)(Atom("a"))) is str
    assert type(typed_fn(dict[str, int])({Atom("k"): 1}).popitem()[0]) is str


# ---------------------------------------------------------------------- conversions that fail


@pytest.mark.parametrize(
    ("annotation", "value", "message"),
    [
        pytest.param(int, b"12", "Expected int, got binary - at x", id="int-binary"),
        pytest.param(int, Atom("a"), "Expected int, got atom - at x", id="int-atom"),
        pytest.param(int, list(b"ab"), "Expected int, got charlist - at x", id="int-charlist"),
        pytest.param(int, [1, 300, -1], "Expected int, got list - at x", id="int-list"),
        pytest.param(int, (1,), "Expected int, got tuple - at x", id="int-tuple"),
        pytest.param(int, {}, "Expected int, got map - at x", id="int-map"),
        pytest.param(int, 1.0, "Expected int, got float - at x", id="int-float"),
        pytest.param(int, True, "Expected int, got boolean - at x", id="int-bool"),
        pytest.param(int, None, "Expected int, got undefined - at x", id="int-undefined"),
        pytest.param(int, Pid(b"p"), "Expected int, got pid - at x", id="int-pid"),
        pytest.param(int, ImproperList([1], 2), "Expected int, got improper list - at x", id="int-improper"),
        pytest.param(int, BitString(b"\x80", 1), "Expected int, got bitstring - at x", id="int-bitstring"),
        pytest.param(str, 42, "Expected str, got integer - at x", id="str-integer"),
        pytest.param(str, b"\xff\xfe", "Expected str, got binary that is not valid UTF-8 - at x", id="str-bad-utf8"),
        pytest.param(str, [1, b"x"], "Expected str, got list that is not a charlist - at x", id="str-not-charlist"),
        pytest.param(str, [0x110000], "Expected str, got list that is not a charlist - at x", id="str-out-of-range"),
        pytest.param(str, {}, "Expected str, got map - at x", id="str-map"),
        pytest.param(bytes, Atom("a"), "Expected bytes, got atom - at x", id="bytes-atom-no-base64"),
        pytest.param(bytes, list(b"ab"), "Expected bytes, got charlist - at x", id="bytes-charlist"),
        pytest.param(bool, 1, "Expected bool, got integer - at x", id="bool-integer"),
        pytest.param(float, b"1.5", "Expected float, got binary - at x", id="float-binary"),
        pytest.param(list[int], b"ab", "Expected list[int], got binary - at x", id="list-binary"),
        pytest.param(list[int], [1, Atom("two")], "Expected int, got atom - at x[1]", id="list-item"),
        pytest.param(list[list[int]], [[1], [2, b"3"]], "Expected int, got binary - at x[1][1]", id="nested-item"),
        pytest.param(tuple[int, str], (1, 2), "Expected str, got integer - at x[1]", id="tuple-item"),
        pytest.param(tuple[int, str], (1,), "Expected tuple of length 2, got 1 - at x", id="tuple-length"),
        pytest.param(tuple[int, str], 7, "Expected tuple[int, str], got integer - at x", id="tuple-integer"),
        pytest.param(dict[str, int], {b"a": b"1"}, "Expected int, got binary - at x[...]", id="dict-value"),
        pytest.param(dict[str, int], {1: 1}, "Expected str, got integer - at key in x", id="dict-key"),
        pytest.param(dict[str, int], [1], "Expected dict[str, int], got list - at x", id="dict-list"),
        pytest.param(Optional[int], b"1", "Expected int | None, got binary - at x", id="optional"),
        pytest.param(Union[int, str], 1.5, "Expected int | str, got float - at x", id="union"),
        pytest.param(
            Person, {Atom("name"): b"A", Atom("age"): b"old"}, "Expected int, got binary - at x.age", id="struct-field"
        ),
        pytest.param(Person, {Atom("name"): b"A"}, "Map missing required field age - at x", id="struct-missing"),
        pytest.param(Person, 5, "Expected Person, got integer - at x", id="struct-integer"),
        pytest.param(
            Person,
            {Atom("name"): b"A", Atom("age"): 1, Atom("tags"): [b"a", 5]},
            "Expected str, got integer - at x.tags[1]",
            id="struct-nested",
        ),
        pytest.param(Strict, {Atom("a"): 1, Atom("b"): 2}, "Map contains unknown field b - at x", id="struct-unknown"),
        pytest.param(Row, (1, 2), "Expected str, got integer - at x[1]", id="array-like"),
        pytest.param(Point, {Atom("x"): 1}, "Map missing required field y - at x", id="dataclass-missing"),
        pytest.param(
            Point, {Atom("x"): b"1", Atom("y"): 1}, "Expected float, got binary - at x.x", id="dataclass-field"
        ),
        pytest.param(
            list[Point],
            [{Atom("x"): 1, Atom("y"): Atom("no")}],
            "Expected float, got atom - at x[0].y",
            id="list-of-dataclass",
        ),
        pytest.param(
            Union[Circle, Square], {Atom("type"): Atom("Tri")}, "Invalid value 'Tri' - at x.type", id="tagged-union"
        ),
        pytest.param(Color, Atom("blue"), "Invalid value 'blue', expected one of red, green - at x", id="enum-name"),
        pytest.param(Color, 7, "Invalid value 7 - at x", id="enum-value"),
        pytest.param(
            Optional[Color], Atom("blue"), "Invalid value 'blue', expected one of red, green - at x", id="optional-enum"
        ),
        pytest.param(
            Literal["on", "off"], b"maybe", "Invalid value 'maybe', expected one of off, on - at x", id="literal"
        ),
        pytest.param(Annotated[int, msgspec.Meta(ge=1)], 0, "Expected int >= 1 - at x", id="constraint"),
        pytest.param(
            Annotated[str, msgspec.Meta(max_length=2)],
            b"abc",
            "Expected str of length <= 2 - at x",
            id="constraint-str",
        ),
        pytest.param(datetime, b"nope", "Invalid RFC3339 encoded datetime - at x", id="datetime"),
        pytest.param(Atom, b"ok", "Expected Atom, got binary - at x", id="atom-binary"),
        pytest.param(Pid, b"pid", "Expected Pid, got binary - at x", id="pid-binary"),
    ],
)
def test_conversion_error_names_the_argument_and_the_expectation(annotation, value, message):
    with pytest.raises(ArgumentError) as info:
        typed_fn(annotation)(value)
    assert str(info.value) == message
    assert info.value.argument == "x"
    assert isinstance(info.value, PoolportError) and isinstance(info.value, TypeError)


def test_none_atom_is_named_as_configured():
    def f(n: int) -> int:
        return n

    with pytest.raises(ArgumentError, match=r"^Expected int, got nil - at n$"):
        typed.wrap(f, none_atom="nil")(None)


# ---------------------------------------------------------------------- plans: arity, caching


def several(a: int, b: str = "dflt", *rest: float, flag: bool = False) -> tuple:
    return (a, b, rest, flag)


def test_positional_defaults_and_varargs():
    w = typed.wrap(several)
    assert w(1) == (1, "dflt", (), False)
    assert w(1, b"b") == (1, "b", (), False)
    assert w(1, b"b", 2, 3.5) == (1, "b", (2.0, 3.5), False)
    with pytest.raises(ArgumentError, match=r"^Expected float, got binary - at rest\[1\]$"):
        w(1, b"b", 2, b"x")
    message = r"^Expected at least 1 argument \(a, b\), got 0 - at several$"
    with pytest.raises(ArgumentError, match=message):
        w()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param((), "Expected 2 arguments (a, b), got 0 - at two", id="none"),
        pytest.param((1,), "Expected 2 arguments (a, b), got 1 - at two", id="too-few"),
        pytest.param((1, 2, 3), "Expected 2 arguments (a, b), got 3 - at two", id="too-many"),
    ],
)
def test_wrong_number_of_arguments(args, message):
    def two(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ArgumentError) as info:
        typed.wrap(two)(*args)
    assert str(info.value) == message


def test_optional_argument_count_range():
    def opt(a: int, b: int = 0) -> int:
        return a + b

    message = r"^Expected 1 to 2 arguments \(a, b\), got 3 - at opt$"
    with pytest.raises(ArgumentError, match=message):
        typed.wrap(opt)(1, 2, 3)


def unannotated(x, y=1):
    return x


def any_only(x: Any, y: object) -> int:
    return 1


def return_only(x) -> str:
    return x


def keyword_only(x, *, y: int = 0):
    return x


@pytest.mark.parametrize("fn", [unannotated, any_only, return_only, keyword_only, len, print])
def test_functions_without_annotated_parameters_are_not_wrapped(fn):
    assert typed.wrap(fn) is fn
    assert typed.plan_of(fn) is None


def test_plan_is_built_once_per_function(monkeypatch):
    calls = []
    real = typed.typing.get_type_hints

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(typed.typing, "get_type_hints", counting)

    def fresh(a: int, b: str) -> str:
        return b * a

    first = typed.wrap(fresh)
    assert first is not fresh and typed.wrap(fresh) is first
    assert typed.wrap(first) is first  # wrapping a wrapper is a no-op
    assert [first(2, b"ab") for _ in range(100)] == ["abab"] * 100
    assert calls == [fresh]
    assert typed.plan_of(fresh) is first.__poolport_plan__
    assert first.__name__ == "fresh" and first.__module__ == __name__ and first.__wrapped__ is fresh


def test_unsupported_annotation_is_passed_unconverted_with_a_warning(caplog):
    def odd(a: Union[int, Person, dict[str, int]], b: int) -> int:  # msgspec refuses this union
        return b

    with caplog.at_level(logging.WARNING, logger="poolport.handlers.typed"):
        w = typed.wrap(odd)
    assert "passed unconverted" in caplog.text
    assert w(object(), 3) == 3
    with pytest.raises(ArgumentError, match="at b$"):
        w(1, b"3")


def test_unresolvable_annotation_leaves_the_function_unwrapped(caplog):
    namespace: dict[str, Any] = {}
    exec("def f(x: 'NoSuchType'): return x", namespace)
    with caplog.at_level(logging.WARNING, logger="poolport.handlers.typed"):
        assert typed.wrap(namespace["f"]) is namespace["f"]
    assert "unconverted" in caplog.text


# ---------------------------------------------------------------------- to_term (results)


@dataclasses.dataclass
class Box:
    point: Point
    color: Color
    items: list[Any]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(Person("Ann", 3, ["x"]), {A("name"): "Ann", A("age"): 3, A("tags"): ["x"]}, id="struct"),
        pytest.param(Renamed("Al"), {A("firstName"): "Al"}, id="struct-encode-name"),
        pytest.param(Row(1, "x"), (1, "x"), id="struct-array-like-tuple"),
        pytest.param(Circle(1.0), {A("type"): A("Circle"), A("r"): 1.0}, id="struct-tagged"),
        pytest.param(Point(1.0, 2.0), {A("x"): 1.0, A("y"): 2.0}, id="dataclass"),
        pytest.param(
            Box(Point(0.0, 1.0), Color.GREEN, [Person("a", 1), {Color.RED: {Color.RED}}]),
            {
                A("point"): {A("x"): 0.0, A("y"): 1.0},
                A("color"): A("green"),
                A("items"): [{A("name"): "a", A("age"): 1, A("tags"): []}, {A("red"): [A("red")]}],
            },
            id="nested",
        ),
        pytest.param(Color.RED, A("red"), id="enum-lowercased-name"),
        pytest.param(Mode.FAST, Mode.FAST, id="str-enum-stays-a-str"),
        pytest.param(Level.HIGH, Level.HIGH, id="int-enum-stays-an-int"),
        pytest.param((Color.RED, [Color.GREEN]), (A("red"), [A("green")]), id="tuple-list"),
        pytest.param(Pair(1, "a"), (1, "a"), id="namedtuple"),
        pytest.param(frozenset({Color.RED}), [A("red")], id="frozenset"),
        pytest.param(ImproperList([Color.RED], Color.GREEN), ImproperList([A("red")], A("green")), id="improper"),
        pytest.param(MapKey([Color.RED]), MapKey([A("red")]), id="mapkey"),
        pytest.param(Pid(b"X"), Pid(b"X"), id="pid"),
        pytest.param(BitString(b"\x80", 1), BitString(b"\x80", 1), id="bitstring"),
        pytest.param(LEAVES, LEAVES, id="leaves"),
    ],
)
def test_to_term(value, expected):
    got = typed.to_term(value)
    assert got == expected
    etf.encode(got)  # and it can be sent


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        pytest.param(object(), "object", id="object"),
        pytest.param([1, {A("k"): datetime(2024, 1, 1)}], "datetime", id="nested-datetime"),
        pytest.param(Person("a", 1, [object()]), "object", id="inside-struct"),  # type: ignore[list-item]
    ],
)
def test_to_term_names_the_unsupported_type(value, type_name):
    with pytest.raises(EncodeError, match=f"cannot encode object of type '{type_name}'"):
        typed.to_term(value)


def test_enum_results_round_trip_to_atoms_and_back():
    def paint(c: Color) -> Color:
        return c

    term = typed.to_term(typed.wrap(paint)(A("green")))
    assert term == A("green") and typed.wrap(paint)(term) is Color.GREEN


# ---------------------------------------------------------------------- the decorator


def test_decorator_records_settings_and_returns_the_same_function():
    def f(x):
        return x

    assert poolport.handler(timeout_ms=500, name="eff")(f) is f
    assert settings_of(f) == HandlerSettings(500, "eff") and exposed_name(f) == "eff"

    @poolport.handler
    def g(x):
        return x

    assert settings_of(g) == HandlerSettings(None, None) and exposed_name(g) is None
    assert settings_of(len) is None and settings_of(42) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"timeout_ms": -1}, id="negative-timeout"),
        pytest.param({"timeout_ms": 1.5}, id="float-timeout"),
        pytest.param({"timeout_ms": True}, id="bool-timeout"),
        pytest.param({"name": ""}, id="empty-name"),
        pytest.param({"name": "_private"}, id="private-name"),
        pytest.param({"name": "x" * 256}, id="long-name"),
        pytest.param({"name": 3}, id="non-str-name"),
    ],
)
def test_decorator_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        poolport.handler(**kwargs)


def test_aliases_only_count_functions_defined_in_the_module(monkeypatch):
    monkeypatch.syspath_prepend(HANDLERS)
    import pp_typed

    assert aliases(pp_typed) == {"hello": pp_typed.greet_impl}
    # a decorated function defined elsewhere (here: this test module) and imported is no alias
    imported = poolport.handler(name="imp")(lambda: 1)
    monkeypatch.setattr(pp_typed, "imported", imported, raising=False)
    assert "imp" not in aliases(pp_typed)


# ---------------------------------------------------------------------- worker state


@pytest.fixture
def no_state():
    clear_worker_state()
    yield
    clear_worker_state()


def test_worker_state_without_worker_init_is_a_clear_error(no_state):
    with pytest.raises(PoolportError, match="worker_init"):
        poolport.worker_state()


def test_run_worker_init_keeps_what_it_returned(no_state, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(HANDLERS)
    log_path = tmp_path / "inits"
    state = run_worker_init("pp_typed:init", [str(log_path), "t"])
    assert poolport.worker_state() is state
    assert state == {"pid": os.getpid(), "tag": "t", "calls": 0}
    assert log_path.read_text() == f"{os.getpid()}\n"
    set_worker_state(None)
    assert poolport.worker_state() is None  # None is a state too


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        pytest.param("pp_typed", ValueError, id="no-colon"),
        pytest.param("pp_typed:nope", AttributeError, id="no-function"),
        pytest.param("pp_nope_mod:f", ModuleNotFoundError, id="no-module"),
        pytest.param("pp_typed:bad_init", RuntimeError, id="raises"),
    ],
)
def test_run_worker_init_failures_propagate(no_state, monkeypatch, spec, error):
    monkeypatch.syspath_prepend(HANDLERS)
    with pytest.raises(error):
        run_worker_init(spec)
    with pytest.raises(PoolportError):
        poolport.worker_state()


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("yaml", "ok"),
    [
        pytest.param(b"worker_init: 'mod:setup'", True, id="simple"),
        pytest.param(b"worker_init: 'pkg.sub.mod:load_model'", True, id="dotted"),
        pytest.param(b"worker_init: null", True, id="null"),
        pytest.param(b"worker_init: 'mod.setup'", False, id="dot-not-colon"),
        pytest.param(b"worker_init: 'mod:'", False, id="no-function"),
        pytest.param(b"worker_init: ':f'", False, id="no-module"),
        pytest.param(b"worker_init: 'mod:f()'", False, id="call-syntax"),
        pytest.param(b"worker_init: 'mod:a:b'", False, id="two-colons"),
        pytest.param(b"worker_init: 3", False, id="not-a-string"),
        pytest.param(b"worker_init_args: 3", False, id="args-not-a-list"),
    ],
)
def test_worker_init_config_is_validated(yaml, ok):
    if ok:
        load_config(yaml)
    else:
        with pytest.raises(ConfigError, match=r"worker_init"):
            load_config(yaml)


def test_worker_init_defaults():
    config = load_config(b"")
    assert (config.worker_init, config.worker_init_args) == (None, [])
    config = load_config(b"worker_init: 'm:f'\nworker_init_args: [1, [a, b], {k: v}]")
    assert config.worker_init_args == [1, ["a", "b"], {"k": "v"}]


@pytest.mark.parametrize(
    ("functions", "handler_ms", "expected"),
    [
        pytest.param({}, None, 100, id="global"),
        pytest.param({}, 300, 100, id="global-below-decorator-wins"),
        pytest.param({}, 30, 30, id="decorator-below-global-wins"),
        pytest.param({"m": {"timeout_ms": 50}}, 300, 50, id="config-module-beats-decorator"),
        pytest.param({"m.f": {"timeout_ms": 60}}, 300, 60, id="config-function-beats-decorator"),
        pytest.param({"m.f": {"timeout_ms": 0}}, 30, 100, id="config-zero-means-unset-and-hides-decorator"),
        pytest.param({"m.f": {}}, 30, 30, id="config-entry-without-timeout"),
        pytest.param({"m.g": {"timeout_ms": 60}}, None, 100, id="other-function"),
    ],
)
def test_timeout_precedence(functions, handler_ms, expected):
    config = msgspec.convert({"timeout_ms": 100, "functions": functions}, Config)
    assert config.timeout_for("m", "f", handler_ms) == expected


# ---------------------------------------------------------------------- the worker, in process


class RecordingProgress:
    def __init__(self) -> None:
        self.timeouts: list[int] = []

    def begin(self, timeout_ms: int = 0) -> None: ...  # provisional, until the function is known

    def set_timeout(self, timeout_ms: int) -> None:
        self.timeouts.append(timeout_ms)

    def end(self) -> None: ...


@pytest.fixture
def make_worker(monkeypatch):
    monkeypatch.syspath_prepend(HANDLERS)

    def make(**settings: Any) -> tuple[Worker, RecordingProgress]:
        config = msgspec.convert({"modules": ["pp_typed", "pp_handlers"], **settings}, Config)
        progress = RecordingProgress()
        return Worker(config, progress=progress), progress  # type: ignore[arg-type]

    return make


def ask(worker: Worker, *request: Any) -> Any:
    return etf.decode(worker.handle(etf.encode(request)))


def test_worker_converts_arguments_and_results(make_worker):
    worker, _ = make_worker()
    assert ask(worker, A("call"), A("pp_typed"), A("greet"), [list(b"World")]) == (OK, b"Hello, World")
    assert ask(worker, A("call"), A("pp_typed"), A("birthday"), [{b"name": b"A", b"age": 1}]) == (
        OK,
        {A("name"): b"A", A("age"): 2, A("tags"): []},
    )
    assert ask(worker, A("call"), A("pp_typed"), A("next_color"), [A("green")]) == (OK, A("blue"))
    assert ask(worker, A("call"), A("pp_handlers"), A("echo"), [b"raw"]) == (OK, b"raw")  # untyped


def test_worker_argument_error_is_a_user_error_without_handler_traceback(make_worker):
    worker, _ = make_worker()
    reply = ask(worker, A("call"), A("pp_typed"), A("add"), [1, b"2"])
    assert reply == (
        ERROR,
        (
            A("user"),
            0,
            b"ArgumentError",
            b"Expected int, got binary - at b",
            [b"ArgumentError: Expected int, got binary - at b"],
        ),
    )
    assert ask(worker, A("cast"), A("pp_typed"), A("add"), [1, b"2"]) == (A("noreply"),)


def test_worker_encode_error_still_names_the_type(make_worker):
    worker, _ = make_worker()
    reply = ask(worker, A("call"), A("pp_typed"), A("bad_struct"), [])
    kind, (typ, _code, cls, detail, _trace) = reply
    assert (kind, typ, cls) == (ERROR, A("user"), b"EncodeError")
    assert b"'object'" in detail


def test_worker_alias_and_renamed_function(make_worker):
    worker, _ = make_worker()
    assert ask(worker, A("call"), A("pp_typed"), A("hello"), [b"x"]) == (OK, b"Hi, x")
    kind, (typ, code, cls, *_rest) = ask(worker, A("call"), A("pp_typed"), A("greet_impl"), [b"x"])
    assert (kind, typ, code, cls) == (ERROR, A("server"), 2, b"NoSuchFunction")
    for private in ("_private", "__dict__"):
        kind, (typ, code, *_rest) = ask(worker, A("call"), A("pp_typed"), A(private), [])
        assert (kind, typ, code) == (ERROR, A("server"), 2)


def test_bare_mode_uses_typed_handlers_too(monkeypatch):
    monkeypatch.syspath_prepend(HANDLERS)
    settings = {"protocol": "bare", "bare_module": "pp_typed", "modules": ["pp_typed"]}
    config = msgspec.convert(settings, Config)
    worker = Worker(config)
    assert etf.decode(worker.handle(etf.encode((A("greet"), list(b"Bare"))))) == b"Hello, Bare"
    person = {A("name"): b"A", A("age"): 1}
    assert etf.decode(worker.handle(etf.encode((A("birthday"), person)))) == {
        A("name"): b"A",
        A("age"): 2,
        A("tags"): [],
    }


@pytest.mark.parametrize(
    ("settings", "function", "expected"),
    [
        pytest.param({}, "slow", 300, id="decorator"),
        pytest.param({"timeout_ms": 9000}, "slow", 300, id="decorator-beats-global"),
        pytest.param({"functions": {"pp_typed.slow": {"timeout_ms": 5000}}}, "slow", 5000, id="config-function-wins"),
        pytest.param({"functions": {"pp_typed": {"timeout_ms": 4000}}}, "slow", 300, id="decorator-below-module-wins"),
        pytest.param({"functions": {"pp_typed": {"timeout_ms": 200}}}, "slow", 200, id="module-below-decorator-wins"),
        pytest.param({"timeout_ms": 9000}, "greet", 9000, id="undecorated-global"),
        pytest.param({}, "greet", 0, id="undecorated-none"),
    ],
)
def test_worker_picks_the_timeout(make_worker, settings, function, expected):
    worker, progress = make_worker(**settings)
    ask(worker, A("call"), A("pp_typed"), A(function), [1 if function == "slow" else b"x"])
    assert progress.timeouts == [expected]


def test_info_timeout_beats_the_decorator(make_worker):
    worker, progress = make_worker()
    assert worker.handle(etf.encode((A("info"), A("timeout"), [(A("ms"), 77)]))) is None
    ask(worker, A("call"), A("pp_typed"), A("slow"), [1])
    assert progress.timeouts == [77]


# ---------------------------------------------------------------------- a real poolport serve


def test_serve_typed_calls_end_to_end():
    with PortClient("--workers", "2", "-m", "pp_typed") as c:
        c.send(
            call("pp_typed", "greet", b"World"),
            call("pp_typed", "greet", list(b"World")),
            call("pp_typed", "greet", A("World")),
            call("pp_typed", "greet", 42),
            call("pp_typed", "describe", {b"name": b"Bob", b"age": 7}),
            call("pp_typed", "mirror", {A("x"): 1, A("y"): 2}),
            call("pp_typed", "no_state"),
        )
        assert [c.recv() for _ in range(3)] == [(OK, b"Hello, World")] * 3
        message = b"Expected str, got integer - at name"
        assert c.recv() == (ERROR, (A("user"), 0, b"ArgumentError", message, [b"ArgumentError: " + message]))
        assert c.recv() == (OK, b"Bob (7): no tags")
        assert c.recv() == (OK, {A("x"): -1.0, A("y"): -2.0})
        kind, (typ, _code, cls, detail, _trace) = c.recv()
        assert (kind, typ, cls) == (ERROR, A("user"), b"PoolportError") and b"worker_init" in detail


def test_worker_init_runs_once_per_worker_and_state_persists(tmp_path):
    log_path = tmp_path / "inits"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"workers: 2\nworker_init: 'pp_typed:init'\nworker_init_args: [{str(log_path)!r}, model-v1]\n")
    n = 400
    with PortClient("-m", "pp_typed", config=str(cfg)) as c:
        replies: list[Any] = []
        deadline = time.monotonic() + 60
        while len({r[1][1] for r in replies}) < 2:  # until both workers have started and served
            assert time.monotonic() < deadline, "the second worker never served a call"
            c.send(*[call("pp_typed", "state_info", 50) for _ in range(4)])
            replies += [c.recv() for _ in range(4)]
        c.send(*[call("pp_typed", "state_info") for _ in range(n)])
        replies += [c.recv() for _ in range(n)]
        # a second wave, after the first has been answered: still the same state, no new init
        c.send(*[call("pp_typed", "state_info") for _ in range(n)])
        replies += [c.recv() for _ in range(n)]
    assert all(kind == OK for kind, _ in replies), replies[:3]
    inits = log_path.read_text().split()
    assert len(inits) == 2 and len(set(inits)) == 2, "worker_init ran once in each of the 2 workers"
    calls_by_pid: dict[int, list[int]] = {}
    for _, (state_pid, os_pid, calls, tag) in replies:
        assert state_pid == os_pid and tag == b"model-v1"  # each worker sees the state it built
        calls_by_pid.setdefault(os_pid, []).append(calls)
    assert {str(pid) for pid in calls_by_pid} <= set(inits)
    for counts in calls_by_pid.values():  # one state object per worker, mutated call after call
        assert sorted(counts) == list(range(1, len(counts) + 1))
    assert len(calls_by_pid) == 2 and sum(len(v) for v in calls_by_pid.values()) == len(replies)


def test_failing_worker_init_stops_serve_at_start_with_its_traceback(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("workers: 2\nworker_init: 'pp_typed:bad_init'\n")
    c = PortClient("-m", "pp_typed", config=str(cfg))
    try:
        assert c.proc.wait(60) == 3
        log = c.stderr_text()
    finally:
        c.close()
    assert "worker_init 'pp_typed:bad_init' failed" in log
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: model file missing: /nonexistent/model.bin" in log
    assert re.search(r"worker_init failed in worker \d \(traceback above\)", log)


def test_decorator_timeout_and_config_override_end_to_end(tmp_path):
    with PortClient("--workers", "1", "-m", "pp_typed") as c:
        c.send(call("pp_typed", "slow", 20_000), call("pp_typed", "add", 1, 2))
        assert c.recv(timeout=30)[1][:3] == (A("server"), 3, b"Timeout")
        assert c.recv() == (OK, 3)
    cfg = tmp_path / "p.yaml"
    cfg.write_text("functions: {pp_typed.slow: {timeout_ms: 10000}}\n")
    with PortClient("--workers", "1", "-m", "pp_typed", config=str(cfg)) as c:
        assert c.request(call("pp_typed", "slow", 600)) == (OK, 600)  # 600 ms > the decorator's 300


def test_example_config_serves_the_example_module():
    with PortClient("--workers", "2", config=TYPED_CONFIG) as c:
        assert c.request(call("typed_handlers", "greet", list(b"World"))) == (OK, b"Hello, World")
        order = {b"item": b"tea", b"quantity": 3, b"unit_price": 2.5}
        assert c.request(call("typed_handlers", "quote", order)) == (OK, {A("item"): b"tea", A("total"): 7.5})
        assert c.request(call("typed_handlers", "classify", b"awful, just awful")) == (OK, A("negative"))
        assert c.request(call("typed_handlers", "classify", b"fine")) == (OK, A("neutral"))
        assert c.request(call("typed_handlers", "words", b"a b c d", 2)) == (OK, [b"a", b"b"])
        pids = {c.request(call("typed_handlers", "model_pid"))[1] for _ in range(20)}
        assert pids and all(isinstance(p, int) for p in pids)


# ---------------------------------------------------------------------- a real Erlang VM

ESCRIPT = shutil.which("escript")
TYPED_CLIENT = str(ROOT / "tests" / "erl" / "typed_client.escript")


def argument_error(message: str) -> str:
    return f'{{error,{{user,0,<<"ArgumentError">>,<<"{message}">>,[<<"ArgumentError: {message}">>]}}}}'


EXPECTED_FROM_ERLANG = {
    "greet_binary": '{reply,<<"Hello, World">>}',
    "greet_charlist": '{reply,<<"Hello, World">>}',
    "greet_atom": '{reply,<<"Hello, World">>}',
    "greet_unicode": '{reply,<<"Hello, Jos\u00e9 \u4e16\u754c"/utf8>>}',
    "greet_utf8_binary": '{reply,<<"Hello, Jos\u00e9"/utf8>>}',
    "greet_integer": argument_error("Expected str, got integer - at name"),
    "greet_bad_utf8": argument_error("Expected str, got binary that is not valid UTF-8 - at name"),
    "greet_arity": argument_error("Expected 1 argument (name), got 2 - at greet"),
    "add": "{reply,42}",
    "add_bignum": "{reply,1180591620717411303425}",
    "add_binary": argument_error("Expected int, got binary - at b"),
    "scale_int_to_float": "{reply,6.0}",
    "scale_float": "{reply,6.0}",
    "negate": "{reply,false}",
    "size_binary": "{reply,3}",
    "size_charlist": argument_error("Expected bytes, got charlist - at data"),
    "types": '{reply,[<<"str">>,<<"bytes">>,<<"int">>,<<"float">>,<<"str">>,<<"str">>,<<"str">>]}',
    "total_list": "{reply,6}",
    "total_charlist": "{reply,294}",
    "total_bad_item": argument_error("Expected int, got atom - at xs[1]"),
    "swap": '{reply,{<<"seven">>,7}}',
    "weigh": '{reply,[{<<"a">>,1.5},{<<"b">>,2.0}]}',
    "maybe_undefined": '{reply,<<"anonymous">>}',
    "maybe_default": '{reply,<<"anonymous">>}',
    "maybe_charlist": '{reply,<<"Zoe">>}',
    "summed": "{reply,10}",
    "summed_bad": argument_error("Expected int, got binary - at xs[2]"),
    "describe_atom_keys": '{reply,<<"Ann (30): a, b">>}',
    "describe_binary_keys": '{reply,<<"Bob (7): no tags">>}',
    "describe_wrong_type": argument_error("Expected int, got binary - at person.age"),
    "describe_missing": argument_error("Map missing required field age - at person"),
    "describe_not_a_map": argument_error("Expected Person, got list - at person"),
    "birthday": '{reply,#{age => 31,name => <<"Ann">>,tags => []}}',
    "mirror": "{reply,#{x => -1.0,y => 2.5}}",
    "next_color": "{reply,red}",
    "next_color_bad": argument_error("Invalid value 'purple', expected one of red, green, blue - at c"),
    "charlist_out": '{reply,"hi"}',
    "atom_out": "{reply,made_in_python}",
    "bits_out": "{reply,<<255,1:1>>}",
    "pid_echo": "true",
    "pid_bad": argument_error("Expected Pid, got binary - at p"),
    "improper": "{reply,{[1,2],tail}}",
    "raw_untyped": '{reply,[<<"bytes">>,<<"as is">>]}',
    "alias": '{reply,<<"Hi, Erlang">>}',
    "alias_hides_python_name": '{error,{server,2,<<"NoSuchFunction">>,'
    '<<"pp_typed.greet_impl is not a public function">>,[]}}',
    "example_greet": '{reply,<<"Hello, World">>}',
    "example_quote": '{reply,#{item => <<"tea">>,total => 7.5}}',
    "example_classify": "{reply,positive}",
    "example_words": '{reply,[<<"to">>,<<"be">>,<<"or">>]}',
}


@pytest.fixture(scope="module")
def erlang_replies() -> dict[str, str]:
    assert ESCRIPT, "Erlang/OTP (escript) must be on PATH"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [
            ESCRIPT,
            TYPED_CLIENT,
            sys.executable,
            "--",
            "--workers",
            "2",
            "--config",
            TYPED_CONFIG,
            "--module",
            "pp_typed",
            "--python-path",
            HANDLERS,
        ],
        env=env,
        capture_output=True,
        timeout=180,
    )
    out, err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and out.endswith("done\n"), out + err
    return dict(line.split(" => ", 1) for line in out.splitlines()[:-1])


def test_erlang_calls_every_case(erlang_replies):
    assert set(erlang_replies) == set(EXPECTED_FROM_ERLANG)


@pytest.mark.parametrize("label", sorted(EXPECTED_FROM_ERLANG))
def test_erlang_typed_call(erlang_replies, label):
    assert erlang_replies[label] == EXPECTED_FROM_ERLANG[label]
