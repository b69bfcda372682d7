"""The worker's request fast path answers exactly like the full path, in any mix of requests."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from hypothesis import given, settings, strategies as st

from poolport.codec import etf
from poolport.config import Config
from poolport.protocol.framing import frame
from poolport.codec.terms import Atom
from poolport.server.worker import Worker, serve_run


def request(kind: str, module: str, function: str, args: list) -> bytes:
    return etf.encode((Atom(kind), Atom(module), Atom(function), args))


sys.path.insert(0, str(Path(__file__).parent / "handlers"))  # as worker_main does for python_path

REQUESTS = {
    "echo": request("call", "pp_handlers", "echo", [(7, b"abc")]),
    "echo-other": request("call", "pp_handlers", "echo", [[1.5, {Atom("k"): None}]]),
    "add": request("call", "pp_handlers", "add", [2, 3]),
    "add-wrong-arity": request("call", "pp_handlers", "add", [2]),
    "cast": request("cast", "pp_handlers", "echo", [1]),
    "unknown-function": request("call", "pp_handlers", "nope", []),
    "not-allowed": request("call", "os", "getcwd", []),
    "args-not-a-list": etf.encode((Atom("call"), Atom("pp_handlers"), Atom("echo"), 5)),
    "truncated": request("call", "pp_handlers", "echo", [b"xyz"])[:-2],
    "trailing-bytes": request("call", "pp_handlers", "echo", [1]) + b"\x00",
    "zero-byte": b"\x00\x01\x02",
    "builtin-info": request("call", "$poolport", "info", []),
    "info-packet": etf.encode((Atom("info"), Atom("timeout"), 5000)),
}


def worker() -> Worker:
    return Worker(Config(modules=["pp_handlers"]), {"workers": 1})


def slow_answer(w: Worker, payload: bytes) -> bytes | None:
    return w.handle(payload)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(sorted(REQUESTS)), min_size=1, max_size=25))
def test_fast_path_answers_like_the_full_path(names):
    fast, slow = worker(), worker()
    for name in names:
        payload = REQUESTS[name]
        data = b"pad" + payload + b"tail"  # requests sit inside a bigger buffer
        got = fast.answer(data, 3, 3 + len(payload))
        want = slow_answer(slow, payload)
        if want is not None and b"worker_pid" in want:  # $poolport:info names the process
            assert got == want
            continue
        assert got == want, name
    if any(names.count(n) > 1 for n in ("echo", "echo-other", "add", "add-wrong-arity", "cast")):
        assert fast._fast  # the fast path was really taken (from a function's second call on)


def test_a_run_of_mixed_frames_gets_one_reply_per_call_in_order():
    names = ["echo", "add", "info-packet", "echo", "unknown-function", "echo", "cast", "add"]
    run = b"".join(frame(REQUESTS[n]) for n in names)
    parts: list[bytes] = []
    serve_run(worker(), run, 4, lambda _count, out: parts.extend(out))
    replies = [etf.decode(p) for p in parts[1::2]]
    assert len(replies) == len(names) - 1  # the info packet gets no reply
    assert replies[0] == (Atom("reply"), (7, b"abc")) and replies[1] == (Atom("reply"), 5)
    assert replies[3][0] == Atom("error") and replies[5] == (Atom("noreply"),)


@pytest.mark.parametrize(
    ("atom_encoding", "reply_head"),
    [
        ("latin1", b"\x83h\x02d\x00\x05reply"),  # what OTP 25 writes: every BERT client reads it
        ("utf8", b"\x83h\x02w\x05reply"),
    ],
)
def test_every_reply_writes_atoms_the_configured_way(atom_encoding, reply_head):
    w = Worker(Config(modules=["pp_handlers"], atom_encoding=atom_encoding), {"workers": 1})
    for name, payload in REQUESTS.items():
        for reply in (w.answer(payload, 0, len(payload)), w.answer(payload, 0, len(payload)), w.handle(payload)):
            if reply is None:
                continue
            # the whole reply, its atoms included, is what encode() writes in this setting
            assert reply == etf.encode(etf.decode(reply), atom_encoding=atom_encoding), name
    echo = REQUESTS["echo"]
    assert w.answer(echo, 0, len(echo)) == reply_head + etf.encode((7, b"abc"))[1:]
    assert w._out_of_memory == etf.encode(etf.decode(w._out_of_memory), atom_encoding=atom_encoding)
    assert w.too_big(10, 1).startswith(b"\x83h\x02" + etf.encode(Atom("error"), atom_encoding=atom_encoding)[1:])


NOT_FUNCTIONS = ["Spawn", "Touch", "instance", "partial_touch", "bound_method", "sneaky"]


@pytest.mark.parametrize("name", NOT_FUNCTIONS)
def test_only_functions_are_callable_nothing_else_runs(tmp_path, name):
    """Classes, instances, partials, bound methods: NoSuchFunction, and none of their code ran
    (each would create the file if it did)."""
    target = tmp_path / "ran"
    w = Worker(Config(modules=["pp_sandbox"]), {"workers": 1})
    reply = etf.decode(w.handle(request("call", "pp_sandbox", name, [str(target).encode()])))
    kind, (typ, code, cls, detail, _trace) = reply
    assert (kind, typ, code, cls) == (Atom("error"), Atom("server"), 2, b"NoSuchFunction")
    assert b"only functions can be called" in detail
    time.sleep(0.2)  # a spawned process would have had time to create it
    assert not target.exists()


@pytest.mark.parametrize("name", ["touch", "marked_touch"])
def test_functions_and_marked_handlers_are_callable(tmp_path, name):
    target = tmp_path / "ran"
    w = Worker(Config(modules=["pp_sandbox"]), {"workers": 1})
    reply = etf.decode(w.handle(request("call", "pp_sandbox", name, [str(target).encode()])))
    assert reply == (Atom("reply"), True) and target.exists()
