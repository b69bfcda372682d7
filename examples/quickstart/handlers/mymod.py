"""The Quick start's handler module (README.md): plain functions, called as mymod:Function(Args)."""


def twice(x):
    return 2 * x

def greet(name: str) -> str:   # annotated: a binary, a charlist or an atom arrives as str
    return f"Hello, {name}"
