"""poolport: call CPU-heavy Python from Erlang/Elixir in parallel through one port."""

from poolport.errors import (
    ArgumentError,
    ConfigError,
    DecodeError,
    EncodeError,
    FrameError,
    PoolportError,
    ProtocolError,
)
from poolport.codec import etf  # noqa: F401 - the codec; importing it registers how MapKey compares keys
from poolport import erlang  # noqa: F401 - poolport.erlang.call/cast: callbacks from a handler
from poolport.protocol.callbacks import ErlangError
from poolport.handlers.handler import handler, worker_state  # `poolport.handler`: the decorator
from poolport.codec.terms import Atom, BitString, Fun, ImproperList, MapKey, Opaque, Pid, Port, Ref, Reference

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "Atom",
    "BitString",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "ErlangError",
    "FrameError",
    "Fun",
    "ImproperList",
    "MapKey",
    "Opaque",
    "Pid",
    "Port",
    "PoolportError",
    "ProtocolError",
    "Ref",
    "Reference",
    "__version__",
    "handler",
    "worker_state",
]
