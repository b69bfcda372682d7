"""Configuration errors a person can act on: which key, what it expects, what it got.

msgspec's messages are exact but written for programmers ("Invalid enum value
'two' - at `$.workers`", a raw regex for a module name). When a config does not
validate, :func:`explain` walks the raw YAML mapping against the schema to find
the first offending key and says it in the user's words, with a "did you mean"
for a misspelt key. The expectations are derived from the schema's types, so a
new key is explained without touching this module (a constrained string says
what it is with ``msgspec.Meta(description=...)``).
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

import msgspec


def explain(raw: dict[str, Any], schema: type[msgspec.Struct], path: str = "") -> str | None:
    """The first problem in ``raw`` against ``schema`` in words, or None if none is found."""
    hints = typing.get_type_hints(schema, include_extras=True)
    info = msgspec.inspect.type_info(schema)
    assert isinstance(info, msgspec.inspect.StructType)
    infos = {f.name: f.type for f in info.fields}
    for key, value in raw.items():
        where = f"{path}{key}"
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), n=1)
            known = ", ".join(hints)
            hint = (
                f"did you mean {near[0]!r}?" if near else f"expected one of {known}" if path else f"known keys: {known}"
            )
            return f"{path}unknown key {key!r} ({hint})"
        problem = _fault(where, value, hints[key], infos[key])
        if problem:
            return problem
    return None


def _fault(where: str, value: Any, hint: Any, info: msgspec.inspect.Type) -> str | None:
    try:
        msgspec.convert(value, hint)
        return None
    except msgspec.ValidationError:
        pass
    inner = info.type if isinstance(info, msgspec.inspect.Metadata) else info
    if isinstance(inner, msgspec.inspect.StructType) and isinstance(value, dict):
        problem = explain(value, inner.cls, f"{where}: ")
        if problem:
            return problem
    if isinstance(inner, msgspec.inspect.ListType) and isinstance(value, list):
        (item_hint,) = typing.get_args(_bare(hint))
        for i, item in enumerate(value):
            problem = _fault(f"{where}[{i}]", item, item_hint, inner.item_type)
            if problem:
                return problem
    if isinstance(inner, msgspec.inspect.DictType) and isinstance(value, dict):
        _, value_hint = typing.get_args(_bare(hint))
        for key, item in value.items():
            if isinstance(inner.value_type, msgspec.inspect.StructType) and isinstance(item, dict):
                problem = explain(item, inner.value_type.cls, f"{where}: {key!r}: ")
            else:
                problem = _fault(f"{where}: {key!r}", item, value_hint, inner.value_type)
            if problem:
                return problem
    return f"{where}: expected {describe(info)}, got {value!r}"


def _bare(hint: Any) -> Any:
    """``Annotated[X, ...]`` -> ``X``."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


def describe(info: msgspec.inspect.Type) -> str:
    """What values of a schema type look like, in words."""
    mi = msgspec.inspect
    if isinstance(info, mi.Metadata):
        words = (info.extra_json_schema or {}).get("description")
        return words if words else describe(info.type)
    if isinstance(info, mi.IntType):
        return "an integer" + (f" >= {info.ge}" if info.ge is not None else "")
    if isinstance(info, mi.LiteralType):
        values = [repr(v) for v in info.values]
        return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
    if isinstance(info, mi.UnionType):
        return " or ".join(describe(t) for t in info.types)
    if isinstance(info, mi.ListType):
        if isinstance(info.item_type, mi.AnyType):
            return "a list ([...])"
        return f"a list ([...]), each item {describe(info.item_type)}"
    if isinstance(info, mi.StrType):
        return f"a string matching {info.pattern}" if info.pattern else "a string"
    if isinstance(info, (mi.DictType, mi.StructType)):
        return "a mapping ({...})"
    if isinstance(info, mi.BoolType):
        return "true or false"
    if isinstance(info, mi.NoneType):
        return "null"
    return "a value of another type"
