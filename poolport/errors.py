"""One rooted error tree: every error poolport raises on purpose is a PoolportError."""

from __future__ import annotations


class PoolportError(Exception):
    """Base of every error poolport raises on purpose."""


class DecodeError(PoolportError, ValueError):
    """Raised when bytes are not a valid (or an allowed) External Term Format term."""


class EncodeError(PoolportError, TypeError):
    """Raised when a Python value has no External Term Format mapping."""


class FrameError(PoolportError):
    """Raised when a {packet,N} frame is malformed or larger than the configured limit."""


class ProtocolError(PoolportError):
    """Raised when a decoded term is not a request of the configured protocol."""


class ConfigError(PoolportError):
    """Raised when the configuration file or flags are invalid; the message names the key."""


class ArgumentError(PoolportError, TypeError):
    """Raised when a typed handler's argument does not fit its annotation (see poolport.handlers.typed).

    The message names the argument and what was expected, msgspec-style:
    ``Expected int, got binary - at age``; ``argument`` is the parameter's name.
    """

    def __init__(self, message: str, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument
