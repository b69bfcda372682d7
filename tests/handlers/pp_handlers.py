"""Handlers used by the test-suite (allowlisted as `pp_handlers` in the tests' configs)."""

import os
import sys
import time
from os import getcwd  # noqa: F401 - imported name: must NOT be callable through a request


def echo(x):
    return x


def twice(x):
    return 2 * x


def add(a, b):
    return a + b


def fail(message=b"boom"):
    raise ValueError(message.decode() if isinstance(message, bytes) else str(message))


def sleep_ms(ms, tag=None):
    time.sleep(ms / 1000)
    return tag


def work(ms, tag):
    """Sleep, then say who did it and when (pid, start, end) so tests can see overlap."""
    start = time.time()
    time.sleep(ms / 1000)
    return (tag, os.getpid(), start, time.time())


def getpid():
    return os.getpid()


def meet(folder, n, tag, hold_ms=20, give_up_s=20.0):
    """Wait until ``n`` calls of ``meet`` on ``folder`` have started (each leaves a file there),
    then hold ``hold_ms``: ``(tag, pid, met)``. Calls on one worker can never meet: the first
    gives up after ``give_up_s`` with ``met`` False, so placement is observed, never timed."""
    folder = folder.decode() if isinstance(folder, bytes) else folder
    open(os.path.join(folder, f"{tag}-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + give_up_s
    while len(os.listdir(folder)) < n and time.monotonic() < deadline:
        time.sleep(0.002)
    met = len(os.listdir(folder)) >= n
    time.sleep(hold_ms / 1000)
    return (tag, os.getpid(), met)


def burn(steps):
    acc = 0
    for i in range(steps):
        acc = (acc * 31 + i) % 1000003
    return acc


def chatty(x):
    print("this goes to stderr, never to the port", x)
    sys.stdout.write("more noise\n")
    sys.stdout.flush()
    os.write(1, b"raw noise on fd 1\n")
    return x


def die(code=3):
    os._exit(code)


def unencodable():
    return object()


def _private():
    return "secret"


class Thing:
    pass


def segfault():
    import ctypes

    ctypes.string_at(0)


def sigkill_self():
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def close_stdout(x):
    os.close(1)
    print("printing after fd 1 was closed must not break anything")
    return x


def hog_memory(mb):
    block = bytearray(mb * 1024 * 1024)
    return len(block)
