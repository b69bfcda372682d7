"""Typed handlers: convert Erlang arguments to a handler's annotations, and results back.

Arguments. When a handler's parameters carry annotations, :func:`wrap` builds a
*plan* once per function (``inspect.signature`` + ``typing.get_type_hints``,
then ``msgspec.inspect.type_info`` for each annotation) and returns a wrapper
that converts the positional arguments before calling the handler. Each
conversion is two steps:

1. a *normaliser* compiled from the type tree rewrites what Erlang sends into
   what msgspec understands, only where the annotation asks for text: a UTF-8
   binary, a charlist or an atom becomes a ``str``; map keys that are atoms or
   binaries become ``str`` for Structs, dataclasses, TypedDicts and
   ``dict[str, ...]``; an atom/binary naming an Enum member (its name, as is
   or lowercased) becomes that member's value;
2. ``msgspec.convert`` (strict mode: an atom ``'123'`` is *not* an ``int``)
   validates and builds the value (Structs, dataclasses, constraints from
   ``Annotated[..., msgspec.Meta(...)]``, unions, ``Optional``, ...). Strings
   are never base64-decoded into ``bytes`` (``builtin_types``).

A mismatch raises :class:`~poolport.errors.ArgumentError` whose message is
msgspec's, told in Erlang's words and naming the argument::

    Expected int, got binary - at age
    Expected str, got integer - at person.name
    Map missing required field age - at person

Unannotated functions (or ones annotated only with ``Any``) are returned
unchanged: zero overhead. Plans are cached per function.

Results. :func:`to_term` turns what ``etf.encode`` cannot take into terms: a
msgspec Struct or a dataclass becomes a map with atom keys (the Struct's
``encode_name``; an ``array_like`` Struct a tuple), a plain ``Enum`` member the
atom of its name **lowercased** (``Color.RED`` -> ``red``). An Enum that is
also an ``int`` or ``str`` (``IntEnum``, ``StrEnum``) is that int or str
(integer / binary), exactly as without ``to_term``. Anything else with no
Erlang mapping is an :class:`~poolport.errors.EncodeError` naming its type.
The worker only calls it when a plain encode failed, so ordinary results never
pay for it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import logging
import math
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from msgspec import inspect as mi

from poolport.errors import ArgumentError, EncodeError
from poolport.handlers.handler import exposed_name
from poolport.codec.terms import Atom, BitString, Fun, ImproperList, MapKey, Opaque, Pid, Port, Reference

__all__ = ["ArgumentError", "Plan", "erlang_kind", "plan_of", "to_term", "type_name", "wrap"]

log = logging.getLogger("poolport.handlers.typed")

_NOT_COERCED = (bytes, bytearray, memoryview)  # never base64-decode a str into these
_MISSING = object()

Normaliser = Callable[[Any], Any]


# ---------------------------------------------------------------------- Erlang names


def _printable(c: Any) -> bool:
    return type(c) is int and (
        32 <= c <= 126 or 8 <= c <= 13 or c == 27 or (160 <= c <= 0x10FFFF and not 0xD800 <= c <= 0xDFFF)
    )


def erlang_kind(value: Any, none_atom: str = "undefined") -> str:
    """What ``value`` was on the Erlang side, in Erlang's words (``binary``, ``atom``, ...)."""
    if value is None:
        return none_atom
    t = type(value)
    if t is bool:
        return "boolean"
    if t is int:
        return "integer"
    if t is float:
        return "float"
    if isinstance(value, Atom):
        return "atom"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary"
    if isinstance(value, list):
        return "charlist" if value and all(map(_printable, value)) else "list"
    if isinstance(value, tuple):
        return "tuple"
    if isinstance(value, Mapping):
        return "map"
    for cls, name in (
        (ImproperList, "improper list"),
        (BitString, "bitstring"),
        (Pid, "pid"),
        (Reference, "reference"),
        (Port, "port"),
        (Fun, "fun"),
    ):
        if isinstance(value, cls):
            return name
    return type(value).__name__


# msgspec's names for what it got, when the value itself cannot be looked at
_MSGSPEC_GOT = {
    "bytes": "binary",
    "str": "atom",
    "array": "list",
    "object": "map",
    "int": "integer",
    "bool": "boolean",
    "Reference": "reference",
    "Pid": "pid",
    "Port": "port",
    "Fun": "fun",
    "BitString": "bitstring",
    "ImproperList": "improper list",
}
# msgspec's names for what it expected
_MSGSPEC_EXPECTED = {"array": "list", "object": "map", "null": "None"}

_GOT = re.compile(r"got `([^`]+)`")
_AT = re.compile(r" - at (?:`key` in )?`\$([^`]*)`$")
_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_TICKED = re.compile(r"`([^`]+)`")


class _Invalid:
    """Stands in for text that names no Enum member / Literal value: msgspec rejects it with the
    path, and the message becomes ``Invalid value 'blue', expected one of red, green``."""

    __slots__ = ("text", "choices")

    def __init__(self, text: str, choices: list[str]) -> None:
        self.text, self.choices = text, choices


def _walk(value: Any, path: str) -> Any:
    """The part of ``value`` at msgspec's ``path`` (``.field[3]``), or ``_MISSING``."""
    pos = 0
    while pos < len(path):
        m = _PATH_STEP.match(path, pos)
        if m is None:
            return _MISSING
        pos = m.end()
        field, index = m.groups()
        try:
            if field is not None:
                value = value[field]
            elif index == "...":
                return _MISSING
            else:
                value = value[int(index)]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return value


def type_name(annotation: Any) -> str:
    """A short name for an annotation: ``int``, ``list[int]``, ``Person``, ``Optional[str]``."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return _QUALIFIER.sub("", repr(annotation))


_QUALIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\.(?=[A-Za-z_])")


def _translate(message: str, value: Any, where: str, annotation: Any, none_atom: str) -> str:
    """msgspec's ValidationError message, in Erlang's words, ending ``- at <argument><path>``."""
    at = _AT.search(message)
    path = at.group(1) if at else ""
    is_key = at is not None and "`key` in" in at.group(0)
    body = message[: at.start()] if at else message
    part = _MISSING if is_key else _walk(value, path)
    if isinstance(part, _Invalid):
        return f"Invalid value {part.text!r}, expected one of {', '.join(part.choices)} - at {where}{path}"
    if not path and not is_key:  # at the argument itself: name the annotation, not "array"/"object"
        origin = typing.get_origin(annotation)
        body = re.sub(
            r"^Expected `(array|object)`(,| of)",
            lambda m: "Expected `{}`{}".format(
                origin.__name__ if m.group(2) == " of" and isinstance(origin, type) else type_name(annotation),
                m.group(2),
            ),
            body,
        )

    def got(m: re.Match[str]) -> str:
        if part is _MISSING:
            name = m.group(1)
            return f"got {none_atom if name == 'null' else _MSGSPEC_GOT.get(name, name)}"
        kind = erlang_kind(part, none_atom)
        if body.startswith("Expected `str`"):  # str takes binaries and charlists: say which failed
            if kind == "binary":
                kind = "binary that is not valid UTF-8"
            elif kind == "list":
                kind = "list that is not a charlist"
        return f"got {kind}"

    body = _GOT.sub(got, body)
    body = _TICKED.sub(lambda m: " | ".join(_MSGSPEC_EXPECTED.get(p, p) for p in m.group(1).split(" | ")), body)
    body = body.replace("Object missing required field", "Map missing required field")
    body = body.replace("Object contains unknown field", "Map contains unknown field")
    body = body.replace("Invalid enum value", "Invalid value")
    return f"{body} - at {'key in ' if is_key else ''}{where}{path}"


# ---------------------------------------------------------------------- normalisers


def _text(v: Any) -> Any:
    """A binary, charlist or atom as a plain ``str``; anything else unchanged (msgspec says why)."""
    t = type(v)
    if t is bytes:
        try:
            return v.decode()
        except UnicodeDecodeError:
            return v
    if t is list:
        if all(type(c) is int for c in v):
            try:
                return "".join(map(chr, v))
            except (ValueError, OverflowError):
                return v
        return v
    if isinstance(v, str):
        return str(v)
    return v


def _key(k: Any) -> Any:
    """A map key as a field name: an atom or a UTF-8 binary becomes a ``str``."""
    if type(k) is bytes:
        try:
            return k.decode()
        except UnicodeDecodeError:
            return k
    if isinstance(k, str):
        return str(k)
    return k


def _native(info: Any) -> Callable[[Any], bool]:
    """Does a value already have the shape of this type (used to pick a union member)?"""
    if isinstance(info, mi.IntType):
        return lambda v: type(v) is int
    if isinstance(info, mi.FloatType):
        return lambda v: type(v) in (int, float)
    if isinstance(info, mi.BoolType):
        return lambda v: type(v) is bool
    if isinstance(info, mi.NoneType):
        return lambda v: v is None
    if isinstance(info, mi.StrType):
        return lambda v: isinstance(v, str)
    if isinstance(info, (mi.BytesType, mi.ByteArrayType, mi.MemoryViewType)):
        return lambda v: isinstance(v, (bytes, bytearray))
    if isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType, mi.TupleType, mi.NamedTupleType)):
        return lambda v: isinstance(v, (list, tuple))
    if isinstance(info, mi.StructType) and info.array_like:
        return lambda v: isinstance(v, (list, tuple))
    if isinstance(info, (mi.DictType, mi.StructType, mi.DataclassType, mi.TypedDictType)):
        return lambda v: isinstance(v, dict)
    if isinstance(info, mi.CustomType):
        cls = info.cls
        return lambda v: isinstance(v, cls)
    if isinstance(info, mi.AnyType):
        return lambda v: True
    return lambda v: False


def _sequence(item: Normaliser) -> Normaliser:
    def norm(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [item(x) for x in v]
        return v

    return norm


def _fields(fields: Any, tag_field: str | None = None, tag: Any = None) -> Normaliser:
    """Maps for a Struct, dataclass or TypedDict: atom/binary keys to ``str``, values by field."""
    by_name = {f.encode_name: n for f in fields if (n := _compile(f.type)) is not None}
    if tag_field is not None and isinstance(tag, str):
        by_name[tag_field] = _text

    def norm(v: Any) -> Any:
        if type(v) is not dict:
            return v
        out = {}
        for k, x in v.items():
            k = _key(k)
            n = by_name.get(k)
            out[k] = n(x) if n is not None else x
        return out

    return norm


def _positional(norms: list[Normaliser | None]) -> Normaliser | None:
    if not any(norms):
        return None

    def norm(v: Any) -> Any:
        if isinstance(v, (list, tuple)) and len(v) == len(norms):
            return [x if n is None else n(x) for n, x in zip(norms, v, strict=True)]
        return v

    return norm


def _enum(cls: type[enum.Enum]) -> Normaliser:
    """An atom/binary/charlist naming a member (``red`` or ``RED``) becomes its value; msgspec
    then maps values (an integer, or a text equal to a str value) to the member."""
    by_name: dict[str, Any] = {}
    for member in cls:
        by_name.setdefault(member.name, member.value)
        by_name.setdefault(member.name.lower(), member.value)
    text_values = {m.value for m in cls if isinstance(m.value, str)}
    choices = [m.name.lower() for m in cls]

    def norm(v: Any) -> Any:
        if isinstance(v, (str, bytes, list)):
            text = _text(v)
            if isinstance(text, str):
                hit = by_name.get(text, _MISSING)
                if hit is not _MISSING:
                    return hit
                return text if text in text_values else _Invalid(text, choices)
        return v

    return norm


def _literal(values: tuple[Any, ...]) -> Normaliser | None:
    texts = sorted(v for v in values if isinstance(v, str))
    if not texts:
        return None
    allowed = set(texts)

    def norm(v: Any) -> Any:
        if isinstance(v, (str, bytes, list)):
            text = _text(v)
            if isinstance(text, str):
                return text if text in allowed else _Invalid(text, texts)
        return v

    return norm


def _union(infos: tuple[Any, ...]) -> Normaliser | None:
    members = [(info, _native(info), _compile(info)) for info in infos]
    if not any(n for _, _, n in members):
        return None
    by_tag: dict[tuple[str, Any], Normaliser] = {}
    for info in infos:
        if isinstance(info, mi.StructType) and info.tag_field is not None:
            tagged = _compile(info)
            if tagged is not None:
                by_tag[(info.tag_field, info.tag)] = tagged
    converters = [
        n
        for info, _, n in members
        if n is not None and isinstance(info, (mi.StrType, mi.EnumType, mi.LiteralType, *_TEXT_PARSED))
    ]

    def norm(v: Any) -> Any:
        if by_tag and type(v) is dict:  # a tagged union of Structs: the tag picks the member
            keyed = {_key(k): x for k, x in v.items()}
            for (field, tag), member in by_tag.items():
                if field in keyed and _text(keyed[field]) == tag:
                    return member(v)
        for _info, native, n in members:
            if native(v):
                return v if n is None else n(v)
        invalid: Any = None
        for n in converters:  # a binary, charlist or atom for `str | ...`, `Color | None`, ...
            out = n(v)
            if isinstance(out, _Invalid):
                invalid = invalid or out
            elif out is not v:
                return out
        return v if invalid is None else invalid

    return norm


_TEXT_PARSED = tuple(
    getattr(mi, name)
    for name in ("DateTimeType", "DateType", "TimeType", "TimeDeltaType", "UUIDType", "DecimalType")
    if hasattr(mi, name)
)


def _compile(info: Any) -> Normaliser | None:
    """The normaliser for one msgspec type node, or ``None`` when values need none."""
    if isinstance(info, mi.StrType) or isinstance(info, _TEXT_PARSED):
        return _text
    if isinstance(info, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        item = _compile(info.item_type)
        return None if item is None else _sequence(item)
    if isinstance(info, mi.TupleType):
        return _positional([_compile(t) for t in info.item_types])
    if isinstance(info, mi.NamedTupleType):
        return _positional([_compile(f.type) for f in info.fields])
    if isinstance(info, mi.DictType):
        key, value = _compile(info.key_type), _compile(info.value_type)
        if key is None and value is None:
            return None
        k = _key if isinstance(info.key_type, mi.StrType) else key

        def norm(v: Any) -> Any:
            if type(v) is not dict:
                return v
            return {(k(a) if k else a): (value(b) if value else b) for a, b in v.items()}

        return norm
    if isinstance(info, mi.StructType):
        if info.array_like:
            norms = [_compile(f.type) for f in info.fields]
            if info.tag is not None:
                norms.insert(0, _text if isinstance(info.tag, str) else None)
            if not any(norms):
                return None

            def norm_array(v: Any) -> Any:  # optional trailing fields: normalise what is there
                if isinstance(v, (list, tuple)):
                    head = [x if n is None else n(x) for n, x in zip(norms, v, strict=False)]
                    return head + list(v[len(norms) :])
                return v

            return norm_array
        return _fields(info.fields, info.tag_field, info.tag)
    if isinstance(info, (mi.DataclassType, mi.TypedDictType)):
        return _fields(info.fields)
    if isinstance(info, mi.UnionType):
        return _union(info.types)
    if isinstance(info, mi.EnumType):
        return _enum(info.cls)
    if isinstance(info, mi.LiteralType):
        return _literal(info.values)
    return None


# ---------------------------------------------------------------------- plans


class _Param:
    __slots__ = ("name", "annotation", "convert")

    def __init__(self, name: str, annotation: Any, convert: Callable[..., Any]) -> None:
        self.name, self.annotation, self.convert = name, annotation, convert


_CONSTRAINTS = ("gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "pattern")


def _skip(info: Any) -> bool:
    return isinstance(info, mi.AnyType) or (isinstance(info, mi.CustomType) and info.cls is object)


def _converter(name: str, annotation: Any, none_atom: str) -> Callable[..., Any] | None:
    """``convert(value, where=name)`` for one parameter (raises ArgumentError), or None."""
    info = mi.type_info(annotation)
    if _skip(info):
        return None
    try:
        msgspec.convert(None, annotation, builtin_types=_NOT_COERCED)  # unsupported types raise
    except msgspec.ValidationError:
        pass
    norm = _compile(info)

    def slow(value: Any, where: str = name) -> Any:
        v = value if norm is None else norm(value)
        try:
            return msgspec.convert(v, annotation, builtin_types=_NOT_COERCED)
        except msgspec.ValidationError as exc:
            raise ArgumentError(_translate(str(exc), v, where, annotation, none_atom), argument=name) from None

    # fast paths: an unconstrained scalar that already has its exact type needs no msgspec
    exact = {mi.IntType: int, mi.FloatType: float, mi.BoolType: bool, mi.BytesType: bytes}.get(type(info))
    unconstrained = not any(getattr(info, a, None) is not None for a in _CONSTRAINTS)
    if unconstrained and isinstance(info, mi.StrType):

        def text(value: Any, where: str = name) -> Any:
            if type(value) is bytes:  # the usual case: a binary
                try:
                    return value.decode()
                except UnicodeDecodeError:
                    return slow(value, where)
            v = _text(value)
            return v if type(v) is str else slow(value, where)

        return text
    if unconstrained and exact is not None:

        def scalar(value: Any, where: str = name) -> Any:
            return value if type(value) is exact else slow(value, where)

        return scalar
    return slow


class Plan:
    """How to convert one function's positional arguments; built once by :func:`plan_of`."""

    def __init__(self, fn: Callable[..., Any], none_atom: str = "undefined") -> None:
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
        self.name: str = exposed_name(fn) or str(getattr(fn, "__name__", "handler"))  # as Erlang says
        self.names: list[str] = []  # positional parameters, in order
        self.params: list[tuple[int, _Param]] = []  # the annotated ones, by index
        self.varargs: _Param | None = None  # an annotated *args
        self.required = 0
        has_varargs = False
        for p in sig.parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD):
                continue  # a request only carries positional arguments
            convert = None
            annotation = hints.get(p.name, inspect.Parameter.empty)
            if annotation is not inspect.Parameter.empty:
                try:
                    convert = _converter(p.name, annotation, none_atom)
                except (TypeError, ValueError) as exc:  # a type msgspec cannot convert to
                    log.warning(
                        "%s.%s: argument %r (%r) is passed unconverted: %s",
                        getattr(fn, "__module__", "?"),
                        self.name,
                        p.name,
                        annotation,
                        exc,
                    )
            if p.kind is p.VAR_POSITIONAL:
                has_varargs = True
                if convert is not None:
                    self.varargs = _Param(p.name, annotation, convert)
                continue
            if p.default is p.empty:
                self.required = len(self.names) + 1
            if convert is not None:
                self.params.append((len(self.names), _Param(p.name, annotation, convert)))
            self.names.append(p.name)
        self.maximum: float = math.inf if has_varargs else len(self.names)

    @property
    def typed(self) -> bool:
        return bool(self.params) or self.varargs is not None

    def arity_error(self, given: int) -> ArgumentError:
        if self.maximum == math.inf:
            want = f"at least {self.required}"
        elif self.required == self.maximum:
            want = str(self.required)
        else:
            want = f"{self.required} to {int(self.maximum)}"
        plural = "" if (self.required if self.maximum == math.inf else self.maximum) == 1 else "s"
        names = f" ({', '.join(self.names)})" if self.names else ""
        return ArgumentError(f"Expected {want} argument{plural}{names}, got {given} - at {self.name}")

    def convert(self, args: tuple[Any, ...] | list[Any]) -> list[Any]:
        """The converted positional arguments; raises ArgumentError on a count or type mismatch."""
        n = len(args)
        if n < self.required or n > self.maximum:
            raise self.arity_error(n)
        out = list(args)
        for index, param in self.params:
            if index >= n:
                break  # the rest take their defaults
            out[index] = param.convert(out[index])
        var = self.varargs
        if var is not None:
            start = len(self.names)
            for i in range(start, n):
                out[i] = var.convert(out[i], f"{var.name}[{i - start}]")
        return out


_PLANS: dict[tuple[Any, str], Plan | None] = {}
_WRAPPED: dict[tuple[Any, str], Callable[..., Any]] = {}


def plan_of(fn: Callable[..., Any], none_atom: str = "undefined") -> Plan | None:
    """The cached :class:`Plan` of ``fn``, or ``None`` when no parameter needs converting."""
    key = (fn, none_atom)
    try:
        return _PLANS[key]
    except KeyError:
        pass
    except TypeError:  # unhashable callable: build, do not cache
        return _build(fn, none_atom)
    plan = _PLANS[key] = _build(fn, none_atom)
    return plan


def _build(fn: Callable[..., Any], none_atom: str) -> Plan | None:
    try:
        plan = Plan(fn, none_atom)
    except (TypeError, ValueError, NameError) as exc:  # no signature, unresolvable annotations
        log.warning("%r: arguments are passed unconverted (cannot read its annotations: %s)", fn, exc)
        return None
    return plan if plan.typed else None


def wrap(fn: Callable[..., Any], none_atom: str = "undefined") -> Callable[..., Any]:
    """``fn`` itself if it has no annotated parameters, else a cached converting wrapper.

    ``none_atom`` is only used to name ``None`` in error messages.
    """
    if getattr(fn, "__poolport_plan__", None) is not None:
        return fn  # already a typed wrapper
    plan = plan_of(fn, none_atom)
    if plan is None:
        return fn
    key = (fn, none_atom)
    try:
        return _WRAPPED[key]
    except (KeyError, TypeError):
        pass
    params, convert = plan.params, plan.convert
    if len(params) == 1 and params[0][0] == 0 and plan.required == plan.maximum == 1:
        one = params[0][1].convert
        arity_error = plan.arity_error

        def typed(*args: Any) -> Any:  # the common case: f(x: T)
            if len(args) != 1:
                raise arity_error(len(args))
            return fn(one(args[0]))
    else:

        def typed(*args: Any) -> Any:
            return fn(*convert(args))

    functools.update_wrapper(typed, fn)
    typed.__poolport_plan__ = plan  # type: ignore[attr-defined]
    try:
        _WRAPPED[key] = typed
    except TypeError:
        pass
    return typed


# ---------------------------------------------------------------------- results

_LEAVES = frozenset({int, float, bool, str, bytes, bytearray, memoryview, Atom, type(None)})


def to_term(x: Any) -> Any:
    """``x`` with Structs, dataclasses and Enums turned into terms ``etf.encode`` can send.

    Raises EncodeError naming the type of the first value with no Erlang mapping.
    """
    t = type(x)
    if t in _LEAVES:
        return x
    if t is list:
        return [to_term(v) for v in x]
    if t is tuple:
        return tuple(to_term(v) for v in x)
    if t is dict:
        return {to_term(k): to_term(v) for k, v in x.items()}
    if isinstance(x, msgspec.Struct):
        return _struct_term(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {Atom(f.name): to_term(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, enum.Enum):
        if isinstance(x, (int, str)):
            return x  # IntEnum/StrEnum: an int or a str, encoded as such
        return Atom(x.name.lower())
    if isinstance(x, (Opaque, BitString)):
        return x
    if isinstance(x, ImproperList):
        return ImproperList([to_term(v) for v in x.items], to_term(x.tail))
    if isinstance(x, MapKey):
        return MapKey(to_term(x.term))
    if isinstance(x, tuple):  # namedtuple
        return tuple(to_term(v) for v in x)
    if isinstance(x, (list, set, frozenset)):
        return [to_term(v) for v in x]
    if isinstance(x, Mapping):
        return {to_term(k): to_term(v) for k, v in x.items()}
    if isinstance(x, (int, float, str, bytes, bytearray)):
        return x
    raise EncodeError(f"cannot encode object of type {type(x).__name__!r} as an Erlang term")


def _struct_term(x: msgspec.Struct) -> Any:
    config = x.__struct_config__
    fields = msgspec.structs.fields(x)
    tag = config.tag
    if config.array_like:
        values = [to_term(getattr(x, f.name)) for f in fields]
        if tag is not None:
            values.insert(0, Atom(tag) if isinstance(tag, str) else tag)
        return tuple(values)
    out: dict[Any, Any] = {}
    if tag is not None:
        out[Atom(config.tag_field)] = Atom(tag) if isinstance(tag, str) else tag
    for f in fields:
        out[Atom(f.encode_name)] = to_term(getattr(x, f.name))
    return out
