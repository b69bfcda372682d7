"""Configuration schema (msgspec Structs) and pure loading from YAML bytes.

Only the CLI opens files; :func:`load_config` takes the bytes and the directory
they came from, so relative ``python_path`` entries resolve next to the YAML.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Union

import loky
import msgspec
import yaml

from poolport.config_errors import explain
from poolport.errors import ConfigError
from poolport.codec.etf import AtomEncoding

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
ModuleName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", description="a module name like 'pkg.mod'"
    ),
]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
InitSpec = Annotated[
    str,
    msgspec.Meta(  # worker_init: "module:function" (see poolport.handler)
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$",
        description="'module:function', e.g. 'handlers.setup:load_model'",
    ),
]


class FunctionSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Per-function overrides, keyed ``"module.function"`` (or ``"module"`` for a whole module)."""

    timeout_ms: Union[NonNegativeInt, None] = None


class ReloadSettings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """``reload:``; with ``watch`` the dispatcher reloads the workers when a ``.py`` file under
    the allowlisted modules changes (polled every ``poll_ms``)."""

    watch: bool = False
    poll_ms: PositiveInt = 1000


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Everything ``poolport serve`` can be told; every key has a default, so ``{}`` is valid."""

    workers: Union[PositiveInt, Literal["auto"]] = "auto"
    packet: Literal[1, 2, 4] = 4
    protocol: Literal["bert", "bare"] = "bert"
    modules: list[ModuleName] = []
    python_path: list[str] = []
    bare_module: Union[ModuleName, None] = None
    timeout_ms: NonNegativeInt = 0  # 0 = no limit unless the call or `functions` sets one
    functions: dict[str, FunctionSettings] = {}
    max_frame_bytes: PositiveInt = 64 * 1024 * 1024
    max_in_flight: PositiveInt = 10_000
    max_in_flight_bytes: PositiveInt = 256 << 20  # request + reply bytes held; beyond it stdin waits
    max_term_depth: PositiveInt = 512
    max_term_elements: PositiveInt = 4_000_000  # list/tuple/map/string elements of one request
    shutdown_grace_ms: NonNegativeInt = 5_000
    max_worker_memory_mb: NonNegativeInt = 0  # address-space limit per worker (RLIMIT_AS); 0 = none
    none_atom: str = "undefined"
    atom_encoding: AtomEncoding = "latin1"  # how replies write atoms: OTP 25 style, or "utf8" (OTP 26+)
    log_level: LogLevel = "INFO"
    name: str = ""  # the pool's name in every log line (the OTP client passes a named pool's name)
    reply_tags: bool = False  # each reply frame starts with its request's 8-byte sequence number
    caller_timeout_ms: NonNegativeInt = 0  # the caller's timeout of a call sent without an info packet
    idle_spin_us: NonNegativeInt = 100  # poll this long before sleeping when out of work (see spin.py)
    worker_init: Union[InitSpec, None] = None  # "module:function" run once per worker; its result
    worker_init_args: list[Any] = []  # is poolport.worker_state(); called as function(*args)
    reload: ReloadSettings = ReloadSettings()  # automatic reload when handler files change

    @property
    def worker_count(self) -> int:
        return loky.cpu_count() if self.workers == "auto" else self.workers  # honours cgroups and affinity

    def allowed(self, module: str) -> bool:
        """True if ``module`` is an allowlisted module or one of its submodules."""
        return any(module == m or module.startswith(m + ".") for m in self.modules)

    def timeout_for(self, module: str, function: str, handler_ms: int | None = None) -> int:
        """Timeout in ms for a function (0 = none): the smallest of those set among the
        function's (its ``functions:`` entry, else ``handler_ms`` from
        ``@poolport.handler(timeout_ms=...)``), its module's entry and the global one."""
        entry = self.functions.get(f"{module}.{function}")
        own = entry.timeout_ms if entry is not None and entry.timeout_ms is not None else handler_ms
        entry = self.functions.get(module)
        return smallest_timeout(own, entry.timeout_ms if entry is not None else None, self.timeout_ms)


# Keys '$poolport':reload_config() applies to a running pool (see apply_live); the others
# need a restart of `poolport serve`. WORKER_KEYS are read by workers when they start, so
# a change to one of them rolls the workers (a reload).
LIVE_KEYS = (
    "workers",
    "timeout_ms",
    "functions",
    "max_frame_bytes",
    "max_in_flight",
    "max_in_flight_bytes",
    "max_term_depth",
    "max_term_elements",
    "shutdown_grace_ms",
    "max_worker_memory_mb",
    "log_level",
    "idle_spin_us",
    "reload",
)
WORKER_KEYS = frozenset(
    ("timeout_ms", "functions", "max_frame_bytes", "max_term_depth", "max_term_elements", "max_worker_memory_mb")
    + ("log_level", "idle_spin_us")
)


def apply_live(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """``(config, applied, needs_restart)``: ``old`` with the live keys ``new`` changes,
    the names of those, and the names of changed keys that need a restart."""
    changed = [k for k in Config.__struct_fields__ if getattr(old, k) != getattr(new, k)]
    applied = [k for k in changed if k in LIVE_KEYS]
    config = msgspec.structs.replace(old, **{k: getattr(new, k) for k in applied})
    return config, applied, [k for k in changed if k not in LIVE_KEYS]


def smallest_timeout(*timeouts_ms: int | None) -> int:
    """The smallest of the timeouts that are set (``None`` and ``0`` are not); 0 if none is."""
    return min((t for t in timeouts_ms if t), default=0)


def load_config(
    data: bytes | str, base_dir: str = ".", overrides: dict[str, Any] | None = None, source: str = "config"
) -> Config:
    """Parse YAML ``data`` into a validated :class:`Config`; ``overrides`` (CLI flags) win."""
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {explain(raw, Config) or exc}") from None
    if config.protocol == "bare" and config.bare_module is None:
        raise ConfigError(f"{source}: protocol: 'bare' needs bare_module: the module that answers bare requests")
    paths = [os.path.normpath(os.path.join(base_dir, p)) for p in config.python_path]
    modules = list(config.modules)
    if config.bare_module and not config.allowed(config.bare_module):
        modules.append(config.bare_module)
    return msgspec.structs.replace(config, python_path=paths, modules=modules)
