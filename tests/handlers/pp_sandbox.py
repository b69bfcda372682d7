"""Callables that are not functions, in an allowlisted module: none may run through a request.

Each would create the file named by its argument if it ran (the tests check it never appears).
"""

import functools
import subprocess
import time

import poolport


def touch(path):
    """The one plain function here: callable."""
    open(path, "w").close()
    return True


class Spawn(subprocess.Popen):
    """A class: calling it would run its constructor (here: a shell command)."""

    def __init__(self, path):
        super().__init__(["touch", path])


class Touch:
    def __init__(self, path):
        touch(path)


class _Callable:
    def __call__(self, path):
        return touch(path)


instance = _Callable()
partial_touch = functools.partial(touch)
bound_method = Touch.__new__(Touch).__init__


class _Sneaky:
    """Looking an attribute up on it runs code: resolving a handler must not."""

    def __getattr__(self, name):
        raise RuntimeError(f"code ran while {name!r} was looked up")

    def __call__(self, path):
        return touch(path)


sneaky = _Sneaky()


@poolport.handler(name="marked_touch")
def _marked(path):
    """Marked by its author: callable under its alias."""
    return touch(path)


@poolport.handler(timeout_ms=300)
def _found_slowly(ms):
    time.sleep(ms / 1000)
    return ms


def __getattr__(name):
    """Module-level lookup of a missing name: ``slow_to_find`` takes 3 s to be refused, so
    resolving a function is work that a call's timeout must cover; ``found_slowly`` takes
    0.5 s to be found, and only then is its own 300 ms timeout known."""
    if name == "slow_to_find":
        time.sleep(3)
    if name == "found_slowly":
        time.sleep(0.5)
        return _found_slowly
    raise AttributeError(name)
