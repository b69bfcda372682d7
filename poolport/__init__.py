"""poolport: call CPU-heavy Python from Erlang/Elixir in parallel through one port."""

from .errors import (
    ConfigError,
    DecodeError,
    EncodeError,
    FrameError,
    PoolportError,
    ProtocolError,
)
from .terms import Atom, BitString, Fun, ImproperList, Opaque, Pid, Port, Ref, Reference

__version__ = "0.1.0"

__all__ = [
    "Atom",
    "BitString",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "FrameError",
    "Fun",
    "ImproperList",
    "Opaque",
    "Pid",
    "Port",
    "PoolportError",
    "ProtocolError",
    "Ref",
    "Reference",
    "__version__",
]
