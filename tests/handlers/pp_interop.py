"""Handlers for tests/test_interop.py: one result of every mapped type, and every way to fail.

``SAMPLES`` is shared with the test, which builds what an independent decoder must
read from the same values the handler returns.
"""

import os
import time

import poolport
from poolport import Atom

SAMPLES = {
    "small_int": 7,
    "negative_int": -5,
    "int32": 2**31 - 1,
    "big_int": 2**100,
    "negative_big_int": -(2**70),
    "huge_int": 2 ** (8 * 300),  # LARGE_BIG_EXT
    "float": 1.5,
    "negative_float": -0.25,
    "binary": b"\x00\xffbytes",
    "empty_binary": b"",
    "str": "Grüße, 日本",  # a UTF-8 binary
    "atom": Atom("ok"),
    "latin1_atom": Atom("café"),
    "non_latin1_atom": Atom("日本"),
    "none": None,
    "true": True,
    "false": False,
    "list": [1, Atom("a"), b"x", 2.5, 300],
    "charlist": [104, 105],  # STRING_EXT
    "empty_list": [],
    "tuple": (Atom("ok"), 1, b"x"),
    "empty_tuple": (),
    "map": {Atom("a"): 1, b"k": [1, 2], 3: None},
    "nested": {
        Atom("users"): [{Atom("name"): "Ann", Atom("tags"): (Atom("admin"), True)}],
        Atom("count"): (1, [None, False, -(2**40)]),
    },
    "nested_without_maps": [(Atom("error"), [Atom("é"), (b"x", [1.0, [[]]])]), None],
}


def value(name):
    return SAMPLES[bytes(name).decode()]


def fail(message):
    raise ValueError(message.decode())


def unencodable():
    return object()


def die():
    os._exit(3)


@poolport.handler(timeout_ms=200)
def slow():
    time.sleep(30)
