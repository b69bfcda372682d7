"""Handlers for the data-path and chaos tests (allowlisted as `pp_chaos`)."""

import os
import signal
import threading
import time


class StrRaises(Exception):
    """An exception that cannot be turned into text: str() and repr() both raise."""

    def __str__(self):
        raise RuntimeError("__str__ of StrRaises raised")

    def __repr__(self):
        raise RuntimeError("__repr__ of StrRaises raised")


def keyboard_interrupt():
    raise KeyboardInterrupt("raised by a handler")


def system_exit(code=3):
    raise SystemExit(code)


def str_raises():
    raise StrRaises("never shown")


def shared_items(count, size):
    """``count`` references to one ``size``-byte binary: small in memory, huge once encoded."""
    return [b"x" * size] * count


def kill_self_after(ms, size):
    """Return ``size`` zero bytes while a thread SIGKILLs this process ``ms`` ms from now,
    so the kill lands while the result is being encoded or sent (or just after)."""

    def kill():
        time.sleep(ms / 1000)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill, daemon=True).start()
    return bytes(size)


def exit_now(code=7):
    os._exit(code)


def getpid():
    return os.getpid()


def echo(x):
    return x


def sleep_ms(ms, tag=None):
    time.sleep(ms / 1000)
    return tag
