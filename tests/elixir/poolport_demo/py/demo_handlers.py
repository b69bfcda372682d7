"""Handlers for the Elixir smoke test (tests/elixir/poolport_demo)."""


def greet(name: str) -> str:
    """Typed: an Elixir string (a binary) arrives as str; a str goes back as a binary."""
    return f"Hello, {name}!"


def maybe(flag: bool):
    """Python None comes back as nil (none_atom: nil in the config)."""
    return "yes" if flag else None
