"""Per-function settings (the ``@poolport.handler`` decorator) and per-worker state.

``@poolport.handler(timeout_ms=..., name=...)`` only records its settings on the
function (``fn.__poolport__``, a :class:`HandlerSettings`) and returns the same
function, so it is still a plain callable from Python and costs nothing per call:

* ``timeout_ms`` is the function's timeout, unless the config has an entry for
  that function (``functions:`` in the YAML), which replaces it. The call's
  timeout is the smallest set among the caller's (info packet), the function's,
  its module's and the global one. ``0`` means not set.
* ``name`` exposes the function under that name *instead of* its Python name:
  ``@handler(name="sum") def sum_(...)`` answers ``{call, mod, sum, ...}`` and
  ``{call, mod, sum_, ...}`` is ``NoSuchFunction``. The function must be defined
  in the module being called (and that module allowlisted). Its Python name
  may even start with ``_``: the alias is an explicit decision to expose it.

Per-worker state: the config key ``worker_init: "mymod:setup"`` (with
``worker_init_args: [...]``) runs ``mymod.setup(*args)`` once in each worker
process before it serves calls; handlers get what it returned from
:func:`worker_state`. Each worker process has its own state (processes share
nothing); a worker that is replaced after a crash or a timeout runs it again.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, overload

from poolport.errors import PoolportError

__all__ = ["HandlerSettings", "aliases", "handler", "is_handler", "run_worker_init", "settings_of", "worker_state"]

F = TypeVar("F", bound=Callable[..., Any])


class HandlerSettings(NamedTuple):
    """What ``@poolport.handler`` recorded; ``None`` means "not set"."""

    timeout_ms: int | None = None
    name: str | None = None


@overload
def handler(fn: F, /) -> F: ...


@overload
def handler(*, timeout_ms: int | None = None, name: str | None = None) -> Callable[[F], F]: ...


def handler(fn: Any = None, /, *, timeout_ms: int | None = None, name: str | None = None) -> Any:
    """Attach poolport settings to a handler; usable as ``@handler`` or ``@handler(...)``."""
    if timeout_ms is not None and (type(timeout_ms) is not int or timeout_ms < 0):
        raise ValueError(f"timeout_ms must be an int >= 0 (0 = no timeout), got {timeout_ms!r}")
    if name is not None and (not isinstance(name, str) or not name or name.startswith("_") or len(name) > 255):
        raise ValueError(f"name must be a non-empty atom name (max 255 characters) not starting with '_', got {name!r}")
    settings = HandlerSettings(timeout_ms, name)

    def decorate(f: F) -> F:
        if not callable(f):
            raise TypeError(f"@poolport.handler decorates a function, not {type(f).__name__!r}")
        f.__poolport__ = settings  # type: ignore[attr-defined]
        return f

    return decorate if fn is None else decorate(fn)


def settings_of(fn: Any) -> HandlerSettings | None:
    """The settings ``@poolport.handler`` attached to ``fn``, if any.

    Read statically (no ``__getattr__``, property or descriptor of ``fn`` runs): this is
    asked of objects a request names, before anything decides they may be called.
    """
    try:
        settings = inspect.getattr_static(fn, "__poolport__", None)
    except Exception:  # noqa: BLE001 - an object too odd to inspect is not a handler
        return None
    return settings if isinstance(settings, HandlerSettings) else None


_FUNCTIONS = (types.FunctionType, types.BuiltinFunctionType)


def is_handler(obj: Any) -> bool:
    """Only functions are callable through a request: a ``def`` (or a compiled function), or
    an object marked with ``@poolport.handler`` itself. Never a class, an instance, a
    ``functools.partial`` or a bound method. Decided from types alone, running no code of ``obj``.
    """
    return type(obj) in _FUNCTIONS or settings_of(obj) is not None


def aliases(module: types.ModuleType) -> dict[str, Callable[..., Any]]:
    """``{alias: function}`` for the functions of ``module`` decorated with ``name=``.

    Only functions defined in ``module`` itself count (not ones it imported).
    When two functions claim one alias, the first defined wins.
    """
    out: dict[str, Callable[..., Any]] = {}
    for obj in list(vars(module).values()):
        settings = settings_of(obj)
        if settings is not None and settings.name and getattr(obj, "__module__", None) == module.__name__:
            out.setdefault(settings.name, obj)
    return out


def exposed_name(fn: Any) -> str | None:
    """The name ``fn`` is exposed under when it was renamed with ``name=``, else ``None``."""
    settings = settings_of(fn)
    return settings.name if settings is not None else None


# ---------------------------------------------------------------------- per-worker state

_NO_STATE: Any = object()
_state: Any = _NO_STATE


def worker_state() -> Any:
    """What this worker's ``worker_init`` returned (whatever it is, ``None`` included).

    Raises PoolportError when no ``worker_init`` ran in this process: it is not
    configured, or the code is not running inside a poolport worker.
    """
    if _state is _NO_STATE:
        raise PoolportError(
            "poolport.worker_state(): no worker state in this process; set `worker_init: "
            '"module:function"` in the config (it runs once per worker and its return value '
            "is the state)"
        )
    return _state


def set_worker_state(state: Any) -> None:
    """Set this process's worker state (done by the worker; tests may call it too)."""
    global _state
    _state = state


def clear_worker_state() -> None:
    """Forget this process's worker state (for tests)."""
    global _state
    _state = _NO_STATE


def run_worker_init(spec: str, args: list[Any] | tuple[Any, ...] = ()) -> Any:
    """Import the module of ``"module:function"``, call ``function(*args)``, keep and return that.

    Exceptions propagate: the worker reports them and start-up fails.
    """
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise ValueError(f"worker_init must be 'module:function', got {spec!r}")
    module = importlib.import_module(module_name)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise AttributeError(f"worker_init: module {module_name!r} has no function {function!r}")
    state = fn(*args)
    set_worker_state(state)
    return state
