"""Chaos over the raw port: thousands of pipelined requests of every kind (tiny and big
echoes, sleeps, crashing and poison requests, timeouts) while a thread SIGKILLs worker
processes at random instants.

Whatever dies when, the reply stream must hold exactly one reply per request, in request
order, each one its own (unique payloads) or a WorkerCrashed/Timeout error where that is
allowed; never a torn frame, a duplicate, a gap or an extra frame. The server still answers
afterwards, and stdin EOF or SIGTERM ends it with exit status 0 and no process left.

Randomness is seeded: the seed is printed; rerun one with POOLPORT_TEST_SEED=<seed>.
Deadlines only turn hangs into failures; nothing asserts speed.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import pytest

from poolport.codec import etf
from poolport.protocol.framing import frame
from chaos_client import HANG_S, OK, PROTOCOL, USER, Server, error_head, is_crashed, is_timeout, mismatch, short
from portclient import A, call

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MiB = 1 << 20
SEED = int(os.environ.get("POOLPORT_TEST_SEED") or random.randrange(1 << 30))
print(f"test_chaos: POOLPORT_TEST_SEED={SEED}")
FLAGS = ("-m", "pp_handlers", "-m", "pp_chaos", "--log-level", "ERROR")
RUN_DEADLINE_S = 300.0  # a whole storm; only to turn a hang or a restart loop into a failure


class Deadline:
    """The time left for a whole run: each read waits at most that long."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, done: int, total: int) -> float:
        left = self.end - time.monotonic()
        assert left > 0, (
            f"the run did not finish within {self.seconds:.0f}s ({done} of {total} replies): a hang or a restart loop"
        )
        return min(left, HANG_S)


@dataclass
class Req:
    kind: str
    data: bytes  # the framed request (an info frame may come first)
    ok: Callable[[Any], bool]  # the reply this request must get when it is not crashed
    innocent: bool = True  # a plain call that should normally succeed
    learn_pid: bool = False  # the reply names the worker that ran it
    expected: Any = None  # the exact reply, where there is one (for the failure message)


def _f(*terms: Any) -> bytes:
    return b"".join(frame(etf.encode(t)) for t in terms)


def _error(kind_code: tuple, classes: set[bytes]) -> Callable[[Any], bool]:
    def check(reply: Any) -> bool:
        head = error_head(reply)
        return head is not None and head[:2] == kind_code and head[2] in classes

    return check


def _is(expected: Any) -> Callable[[Any], bool]:
    return lambda reply: reply == expected


def _blob(rnd: random.Random, i: int, size: int) -> bytes:
    return i.to_bytes(8, "big") + rnd.randbytes(size - 8)


KINDS = {  # name: weight
    "tiny": 700,
    "medium": 80,
    "big": 4,
    "sleep": 80,
    "getpid": 40,
    "info": 10,
    "cast": 20,
    "die": 5,
    "bignum": 5,
    "keyboard_interrupt": 5,
    "str_raises": 5,
    "system_exit": 3,
    "huge_info_timeout": 5,
    "timeout": 3,
    "garbage": 5,
    "unencodable": 3,
}


def make_request(kind: str, i: int, rnd: random.Random) -> Req:
    """Request number ``i`` of ``kind``; its payload or tag is unique to ``i``."""
    if kind == "tiny":
        x = (i, rnd.randbytes(8))
        return Req(kind, _f(call("pp_handlers", "echo", x)), _is((OK, x)), expected=(OK, x))
    if kind in ("medium", "big"):
        size = rnd.randint(20_000, 200_000) if kind == "medium" else rnd.randint(1 * MiB, 10 * MiB)
        x = _blob(rnd, i, size)
        return Req(kind, _f(call("pp_handlers", "echo", x)), _is((OK, x)), expected=(OK, x))
    if kind == "sleep":
        return Req(kind, _f(call("pp_handlers", "sleep_ms", rnd.choice([1, 2, 5, 10, 20]), i)), _is((OK, i)))
    if kind == "getpid":
        return Req(kind, _f(call("pp_chaos", "getpid")), lambda r: r[0] == OK and type(r[1]) is int, learn_pid=True)
    if kind == "info":
        return Req(
            kind,
            _f(call("$poolport", "info")),
            lambda r: r[0] == OK and type(r[1]) is dict and A("worker_pid") in r[1],
            learn_pid=True,
        )
    if kind == "cast":
        return Req(kind, _f((A("cast"), A("pp_handlers"), A("echo"), [i])), _is((A("noreply"),)))
    if kind == "die":
        return Req(kind, _f(call("pp_handlers", "die")), lambda r: False, innocent=False)
    if kind == "bignum":
        return Req(
            kind,
            _f((A("call"), A("pp_handlers"), A("echo"), (1 << 60_000) + i)),
            _error((PROTOCOL, 2), {b"BadRequest", b"DecodeError"}),
            innocent=False,
        )
    if kind in ("keyboard_interrupt", "str_raises", "system_exit"):
        cls = {"keyboard_interrupt": b"KeyboardInterrupt", "str_raises": b"StrRaises", "system_exit": b"SystemExit"}[
            kind
        ]
        return Req(kind, _f(call("pp_chaos", kind)), _error((USER, 0), {cls}), innocent=False)
    if kind == "huge_info_timeout":  # on a call that runs a while: that deadline is pending
        return Req(
            kind,
            _f((A("info"), A("timeout"), [(A("ms"), 1 << 64)]), call("pp_handlers", "sleep_ms", 20, i)),
            _is((OK, i)),
            innocent=False,
        )
    if kind == "timeout":
        return Req(
            kind,
            _f((A("info"), A("timeout"), [(A("ms"), 100)]), call("pp_handlers", "sleep_ms", 3000, i)),
            is_timeout,
            innocent=False,
        )
    if kind == "garbage":
        return Req(
            kind,
            frame(b"\x83garbage" + i.to_bytes(4, "big")),
            _error((PROTOCOL, 2), {b"DecodeError", b"BadRequest"}),
            innocent=False,
        )
    if kind == "unencodable":
        return Req(kind, _f(call("pp_handlers", "unencodable")), _error((USER, 0), {b"EncodeError"}), innocent=False)
    raise AssertionError(kind)


def plan(n: int, seed: int, kinds: dict[str, int] | None = None) -> list[Req]:
    rnd = random.Random(seed)
    kinds = kinds or KINDS
    names, weights = list(kinds), list(kinds.values())
    return [make_request(rnd.choices(names, weights)[0], i, rnd) for i in range(n)]


def batched(reqs: list[Req], size: int = MiB):
    out, have = [], 0
    for r in reqs:
        out.append(r.data)
        have += len(r.data)
        if have >= size:
            yield b"".join(out)
            out, have = [], 0
    if out:
        yield b"".join(out)


class Killer:
    """SIGKILLs a random worker process (one that has answered a call and is still below the
    dispatcher) every 0.05-0.4 s until stopped."""

    def __init__(self, server: Server, seed: int) -> None:
        self.server = server
        self.rnd = random.Random(seed)
        self.pids: set[int] = set()
        self.lock = threading.Lock()
        self.kills: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="chaos-killer", daemon=True)

    def learn(self, pid: int) -> None:
        with self.lock:
            self.pids.add(pid)

    def _run(self) -> None:
        while not self.stop.wait(self.rnd.uniform(0.05, 0.4)):
            below = self.server.children()
            with self.lock:
                targets = sorted(self.pids & below)
            for pid in self.rnd.sample(targets, min(len(targets), self.rnd.choice([1, 1, 1, 2]))):
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.kills.append(pid)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> "Killer":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread.ident is not None:
            self.thread.join(10)


def check_reply(index: int, req: Req, reply: Any, stats: Counter) -> None:
    """The reply is the request's own answer, or WorkerCrashed (any request may meet a kill),
    or Timeout (a kill racing a timeout: counted, so a run full of them stands out)."""
    if req.ok(reply):
        stats[f"{req.kind}:ok"] += 1
    elif is_crashed(reply):
        stats[f"{req.kind}:crashed"] += 1
    elif is_timeout(reply):
        stats[f"{req.kind}:timeout"] += 1
    else:
        detail = short(reply, 400) if req.expected is None else mismatch(req.expected, reply)
        raise AssertionError(f"reply {index} ({req.kind}) is not its own: {detail}")


def learn(killer: Killer | None, req: Req, reply: Any) -> None:
    if killer is not None and req.learn_pid and reply[0] == OK:
        killer.learn(reply[1] if type(reply[1]) is int else reply[1][A("worker_pid")])


def run_chaos(n: int, seed: int, kinds: dict[str, int] | None = None, kill: bool = True, workers: int = 3) -> None:
    reqs = plan(n, seed, kinds)
    print(
        f"POOLPORT_TEST_SEED={SEED}: seed {seed}: {Counter(r.kind for r in reqs)}; "
        f"{sum(len(r.data) for r in reqs) / MiB:.0f} MB of requests"
    )
    stats: Counter = Counter()
    with Server("--workers", str(workers), *FLAGS) as s:
        s.send_async(batched(reqs))
        killer = Killer(s, seed + 1)
        if kill:
            killer.thread.start()
        deadline = Deadline(RUN_DEADLINE_S)
        try:
            for index, req in enumerate(reqs):
                reply = s.recv(deadline.left(index, n))
                check_reply(index, req, reply, stats)
                learn(killer, req, reply)
        finally:
            killer.__exit__()
        s.join_writer()
        print(f"{len(killer.kills)} worker(s) SIGKILLed; replies: {dict(sorted(stats.items()))}")
        innocent = [r.kind for r in reqs if r.innocent]
        answered = sum(stats[f"{k}:ok"] for k in set(innocent))
        assert answered >= 0.2 * len(innocent), f"only {answered} of {len(innocent)} plain calls answered normally"
        if not kill:
            assert all(stats[f"{k}:crashed"] == 0 for k in KINDS if k != "die"), "calls crashed with no worker killed"
        # -- after the storm: the pool serves normally, then ends cleanly on stdin EOF
        assert [s.request(call("pp_handlers", "twice", i)) for i in range(20)] == [(OK, 2 * i) for i in range(20)]
        assert s.finish() == 0


@pytest.mark.parametrize("storm", range(3))
def test_chaos_every_request_gets_exactly_its_own_reply_in_order(storm):
    run_chaos(4000, SEED + 1000 * storm)


@pytest.mark.parametrize("end", ["stdin-eof", "sigterm"])
def test_eof_or_sigterm_in_the_middle_of_chaos_ends_the_server_cleanly(end):
    """Stop the server mid-storm (stdin EOF after half the requests, or SIGTERM a quarter of
    the way in) while workers keep being killed: it exits 0 within its grace period (5 s by
    default) leaving no process; the replies it sent are a prefix of the right ones, with no
    torn frame."""
    seed = SEED + (2 if end == "stdin-eof" else 3)
    n = 800
    reqs = plan(n, seed)
    print(f"POOLPORT_TEST_SEED={SEED}: seed {seed}: {Counter(r.kind for r in reqs)}")
    stats: Counter = Counter()
    with Server("--workers", "3", *FLAGS) as s:
        s.children()
        sent = n // 2 if end == "stdin-eof" else n  # with EOF: half the requests, then EOF
        s.send_async(batched(reqs[:sent]), close=end == "stdin-eof")
        deadline = Deadline(RUN_DEADLINE_S)
        killer = Killer(s, seed).__enter__()
        got, stopped_at = 0, None
        try:
            while True:
                if got == n // 4 and stopped_at is None:  # a quarter in (kills go on)
                    s.children()
                    stopped_at = time.monotonic()
                    if end == "sigterm":
                        s.proc.send_signal(signal.SIGTERM)
                try:
                    reply = s.recv(deadline.left(got, n))
                except EOFError:  # stdout closed: fine at a frame boundary (finish() checks)
                    break
                assert got < sent, f"an extra reply after {sent}: {short(reply)}"
                check_reply(got, reqs[got], reply, stats)
                learn(killer, reqs[got], reply)
                got += 1
        finally:
            killer.__exit__()
        code = s.proc.wait(60)
        assert code == 0, f"exit status {code}; stderr tail:\n{s.stderr_text()[-2000:]}"
        after = "" if stopped_at is None else f" {time.monotonic() - stopped_at:.1f}s after reply {n // 4}"
        print(
            f"{end}: {got} of {sent} replies, then EOF{after}; {len(killer.kills)} kills; {dict(sorted(stats.items()))}"
        )
        if end == "stdin-eof":
            s.join_writer()
        elif s._writer is not None:  # the rest of the requests met a closed pipe: expected
            s._writer.join(30)
        assert s.finish() == 0


# ---------------------------------------------------------------------- hypothesis, no killer

SMALL_KINDS = [
    "tiny",
    "medium",
    "sleep",
    "getpid",
    "cast",
    "die",
    "bignum",
    "keyboard_interrupt",
    "str_raises",
    "system_exit",
    "huge_info_timeout",
    "garbage",
    "unencodable",
]


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)  # no shrinking: each try costs a server
@given(
    kinds=st.lists(st.sampled_from(SMALL_KINDS), min_size=1, max_size=40).filter(lambda ks: ks.count("die") <= 2),
    seed=st.integers(0, 1 << 30),
)
def test_any_mix_of_requests_gets_its_own_replies_in_order(kinds, seed):
    """Without random kills, the only crashes are the die calls: a plain call may be
    WorkerCrashed only when a die shares its batch (poison-pill rule), never otherwise."""
    run_mix(kinds, seed)


def run_mix(kinds: list[str], seed: int) -> None:
    rnd = random.Random(seed)
    reqs = [make_request(kind, i, rnd) for i, kind in enumerate(kinds)]
    with Server("--workers", "2", *FLAGS) as s:
        s.send_async(batched(reqs))
        replies = [s.recv(60) for _ in reqs]
        s.join_writer()
        for index, (req, reply) in enumerate(zip(reqs, replies)):
            if req.kind == "die":
                assert is_crashed(reply), f"reply {index} (die): {short(reply)}"
            elif not req.ok(reply):
                assert "die" in kinds and is_crashed(reply), f"reply {index} ({req.kind}): {short(reply, 400)}"
        assert s.request(call("pp_handlers", "twice", 21), 60) == (OK, 42)
        assert s.finish(60) == 0
