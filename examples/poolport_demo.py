"""Example handlers: plain functions, called from Erlang as poolport_demo:Function(Args)."""

import os


def burn(steps):
    """CPU-bound pure Python: what poolport parallelises across cores."""
    acc = 0
    for i in range(steps):
        acc = (acc * 31 + i) % 1000003
    return acc


def twice(x):
    return 2 * x


def hello(name):
    return f"Hello, {name.decode() if isinstance(name, bytes) else name}"


def whoami():
    """The OS pid of the worker that ran the call."""
    return os.getpid()
