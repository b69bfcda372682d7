"""The Quick start's handler module (README.md): plain functions, called as mymod:Function(Args)."""


def twice(x):
    return 2 * x

def greet(name: str) -> str:   # annotated: a binary, a charlist or an atom arrives as str
    return f"Hello, {name}"

def countdown(n):              # a generator: call it with poolport:stream/4
    while n > 0:
        yield n
        n -= 1

def price(item):               # looks the item up in an ETS table of the Erlang node
    from poolport import Atom, erlang
    [(_, euros)] = erlang.call("ets", "lookup", [Atom("prices"), item])
    return euros
