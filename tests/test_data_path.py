"""Data-path invariants of ``poolport serve``, provoked for real over pipes.

Every reply is checked strictly: exactly one per request, in request order, each one the
request's own (unique payloads), never a torn or extra frame. Deadlines in here only turn a
hang into a failure (``HANG_S``); nothing asserts speed. Memory bounds read the dispatcher's
``VmHWM`` (its peak resident set) from /proc.
"""

from __future__ import annotations

import functools
import os
import random
import threading
import zlib

import pytest

from poolport.codec import etf
from poolport.protocol.framing import frame
from poolport.codec.terms import ImproperList
from chaos_client import ERROR, OK, PROTOCOL, SERVER, USER, Server, encode_frames, error_head, is_crashed, short
from portclient import A, PortClient, call

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

MiB = 1 << 20
SEED = int(os.environ.get("POOLPORT_TEST_SEED") or random.randrange(1 << 30))
print(f"test_data_path: POOLPORT_TEST_SEED={SEED}")
BASE = ("--log-level", "WARNING", "-m", "pp_handlers", "-m", "pp_chaos")


def batched(frames, size: int = MiB):
    """Join framed requests into writes of about ``size`` bytes (lazily)."""
    out, have = [], 0
    for f in frames:
        out.append(f)
        have += len(f)
        if have >= size:
            yield b"".join(out)
            out, have = [], 0
    if out:
        yield b"".join(out)


@functools.lru_cache(maxsize=64)
def _noise(size: int) -> bytes:
    return random.Random(SEED * 1_000_003 + size).randbytes(size)


def blob(tag: int, size: int) -> bytes:
    """A ``size``-byte binary unique to ``tag``: the tag up front, then seeded noise."""
    return tag.to_bytes(8, "big") + _noise(max(0, size - 8))


def new_processes(server: Server, before: set[int]) -> set[int]:
    return server.children() - before


# ---------------------------------------------------------------------- 1. big payloads


BIG_PIPELINES = [
    pytest.param([10 * MiB, 10 * MiB], id="2x10MB"),
    pytest.param([3 * MiB] * 6, id="6x3MB"),
    pytest.param([40 * MiB], id="1x40MB"),
]


@pytest.mark.parametrize("sizes", BIG_PIPELINES)
def test_big_payloads_behind_a_slow_call_never_deadlock(sizes):
    """A slow call holds the reply order while another worker produces big replies: neither the
    dispatcher nor a worker may block on the other (replies are buffered or back-pressured)."""
    with Server("--workers", "2", *BASE) as s:
        payloads = [blob(i, size) for i, size in enumerate(sizes)]
        terms = [call("pp_handlers", "sleep_ms", 500, b"slow")]
        terms += [call("pp_handlers", "echo", p) for p in payloads]
        s.send_async(batched(frame(etf.encode(t)) for t in terms))
        assert s.recv() == (OK, b"slow")
        for i, p in enumerate(payloads):
            reply = s.recv()
            assert reply[0] == OK and reply[1] == p, f"reply {i + 1} is not its own payload: {short(reply)}"
        s.join_writer()
        assert s.request(call("pp_handlers", "twice", 21)) == (OK, 42)
        assert s.finish() == 0


# ---------------------------------------------------------------------- 2. poison requests


GETATTR_MODULE = '''
"""A handler module whose module-level __getattr__ raises KeyError for any missing name."""


def __getattr__(name):
    raise KeyError(name)


def present():
    return "present"
'''


def _bignum_args() -> bytes:
    return frame(etf.encode((A("call"), A("pp_handlers"), A("echo"), (1 << 60_000) - 12_345)))


def _huge_info_timeout() -> bytes:
    """A timeout of 2^64 ms (clamped, not a crash) on a call that runs a while: the dispatcher
    waits on it with that deadline pending."""
    return encode_frames(
        [(A("info"), A("timeout"), [(A("ms"), 1 << 64)]), call("pp_handlers", "sleep_ms", 300, b"slept")]
    )


def _inflates_to_a_huge_list() -> bytes:
    """``{call, pp_handlers, echo, [[[], [], ... 60 million times]]}`` compressed to ~60 KB: the
    decoded list needs ~4 GB, far over the worker's 600 MB address-space limit."""
    n = 60_000_000
    body = (
        b"h\x04w\x04callw\x0bpp_handlersw\x04echo"
        + b"l\x00\x00\x00\x01"
        + b"l"
        + n.to_bytes(4, "big")
        + b"j" * n
        + b"j"
        + b"j"
    )
    return frame(b"\x83P" + len(body).to_bytes(4, "big") + zlib.compress(body, 9))


def _one(term) -> bytes:
    return frame(etf.encode(term))


def _expect(kind_code, classes):
    """A check: an error reply of this (Type, Code) whose Class is one of ``classes``."""

    def check(reply):
        head = error_head(reply)
        return head is not None and head[:2] == kind_code and head[2] in classes

    return check


MEMORY_LIMIT = ("--max-worker-memory-mb", "600")
POISONS = [
    # (raw request bytes, flags, reply check, how many workers may be replaced)
    pytest.param(
        _bignum_args, (), _expect((PROTOCOL, 2), {b"BadRequest", b"DecodeError"}), 0, id="args-are-a-60000-bit-bignum"
    ),
    pytest.param(_huge_info_timeout, (), lambda r: r == (OK, b"slept"), 0, id="info-timeout-2^64-ms"),
    pytest.param(
        lambda: _one(call("pp_chaos", "keyboard_interrupt")),
        (),
        _expect((USER, 0), {b"KeyboardInterrupt"}),
        0,
        id="handler-raises-KeyboardInterrupt",
    ),
    pytest.param(
        lambda: _one(call("pp_chaos", "system_exit", 3)),
        (),
        _expect((USER, 0), {b"SystemExit"}),
        0,
        id="handler-raises-SystemExit",
    ),
    pytest.param(
        lambda: _one(call("pp_chaos", "str_raises")),
        (),
        _expect((USER, 0), {b"StrRaises"}),
        0,
        id="exception-whose-str-raises",
    ),
    pytest.param(
        lambda: _one(call("pp_getattr", "missing")),
        (),
        _expect((SERVER, 2), {b"NoSuchFunction"}),
        0,
        id="module-getattr-raises-KeyError",
    ),
    pytest.param(
        _inflates_to_a_huge_list,
        MEMORY_LIMIT,
        _expect((PROTOCOL, 2), {b"MemoryError", b"DecodeError"}),
        2,
        id="MemoryError-while-decoding",
    ),
    pytest.param(
        lambda: _one(call("pp_chaos", "shared_items", 2_000_000, 1000)),
        MEMORY_LIMIT,
        _expect((USER, 0), {b"MemoryError", b"EncodeError"}),
        2,
        id="MemoryError-while-encoding",
    ),
    pytest.param(lambda: _one(call("pp_chaos", "exit_now")), (), is_crashed, 2, id="handler-os._exit-every-time"),
]


@pytest.mark.parametrize(("poison", "flags", "check", "replaced"), POISONS)
def test_poison_request_gets_one_error_and_the_pool_carries_on(tmp_path, poison, flags, check, replaced):
    (tmp_path / "pp_getattr.py").write_text(GETATTR_MODULE)
    with Server("--workers", "2", *BASE, "-m", "pp_getattr", "--python-path", str(tmp_path), *flags) as s:
        # -- both workers up and serving before the baseline of processes is taken
        s.send_async([encode_frames([call("pp_handlers", "sleep_ms", 300, i) for i in range(4)])])
        assert [s.recv() for _ in range(4)] == [(OK, i) for i in range(4)]
        s.join_writer()
        assert s.request(call("pp_getattr", "present")) == (OK, b"present")
        before = s.children()
        seen: set[int] = set()
        stop = threading.Event()

        def sample() -> None:  # short-lived replacement workers are caught here
            while not stop.is_set():
                seen.update(new_processes(s, before))
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            after = [call("pp_handlers", "twice", i) for i in range(20)]
            s.send_async([poison() + encode_frames(after)])
            reply = s.recv(timeout=60)
            assert check(reply), f"unexpected reply to the poison request: {short(reply, 600)}"
            if reply[0] == ERROR:
                detail = reply[1][3]
                assert type(detail) is bytes and detail.decode("utf-8"), "the error says nothing"
            replies = [s.recv() for _ in after]
            assert replies == [(OK, 2 * i) for i in range(20)], (
                f"calls after the poison: {[short(r, 120) for r in replies]}"
            )
            s.join_writer()
            # the pool still serves everything, and did not loop restarting workers
            s.send_async([encode_frames([call("pp_handlers", "sleep_ms", 50, i) for i in range(40)])])
            assert [s.recv() for _ in range(40)] == [(OK, i) for i in range(40)]
            s.join_writer()
        finally:
            stop.set()
            sampler.join(5)
        seen.update(new_processes(s, before))
        assert len(seen) <= replaced, (
            f"{len(seen)} new worker process(es) (at most {replaced} expected): {sorted(seen)}"
        )
        assert s.finish() == 0


def test_a_request_that_kills_every_worker_it_reaches_is_not_rerun_forever():
    """Poison pill: the calls queued behind a crashing call on the same worker are re-run and
    answered normally; the crashing call itself is answered WorkerCrashed exactly once."""
    with Server("--workers", "1", *BASE) as s:
        terms = [call("pp_handlers", "echo", (b"before", i)) for i in range(10)]
        terms += [call("pp_chaos", "exit_now")]
        terms += [call("pp_handlers", "echo", (b"after", i)) for i in range(30)]
        s.send_async([encode_frames(terms)])
        replies = [s.recv() for _ in terms]
        assert replies[:10] == [(OK, (b"before", i)) for i in range(10)]
        assert is_crashed(replies[10]), short(replies[10])
        assert replies[11:] == [(OK, (b"after", i)) for i in range(30)]
        s.join_writer()
        assert s.request(call("pp_handlers", "twice", 2)) == (OK, 4)
        assert s.finish() == 0


def test_stdin_eof_right_behind_a_crash_still_answers_every_request():
    """The port closes stdin right after its requests; the worker dies on one of them while the
    server is draining: the calls queued behind the crash are still re-run and answered (a
    replacement worker is started while closing), then the server exits 0."""
    with Server("--workers", "1", *BASE) as s:
        terms = [call("pp_handlers", "echo", (b"before", i)) for i in range(3)]
        terms += [call("pp_chaos", "exit_now")]
        terms += [call("pp_handlers", "echo", (b"after", i)) for i in range(5)]
        s.send_async([encode_frames(terms)], close=True)
        replies = [s.recv() for _ in terms]
        assert replies[:3] == [(OK, (b"before", i)) for i in range(3)]
        assert is_crashed(replies[3]), short(replies[3])
        assert replies[4:] == [(OK, (b"after", i)) for i in range(5)]
        s.join_writer()
        assert s.finish() == 0


# ---------------------------------------------------------------------- 3. killed mid-reply


KILL_AFTER_MS = [0, 50, 100, 150, 300, 500, 800, 1000, 1200]  # from during encoding to mid-send
BIG_RESULT = 150 * MiB


def test_a_worker_killed_while_sending_a_big_reply_never_tears_the_stream():
    """SIGKILL lands while a 150 MB result is being encoded or sent: the stream stays whole
    (no partial frame, duplicate or gap) and every request gets exactly one reply, in order.
    The replies are read slowly (~1 MB per 5 ms), so sending a big one takes a while."""
    with Server("--workers", "2", *BASE) as s:
        s.slow_read = (MiB, 0.005)
        plan: list[tuple] = []  # (term, kind, expected)
        tag = 0
        for ms in [None, *KILL_AFTER_MS]:  # normal calls, then a killer call and normal calls...
            if ms is not None:
                plan.append((call("pp_chaos", "kill_self_after", ms, BIG_RESULT), "kill", ms))
            for _ in range(4):
                payload = blob(tag, 64 + tag * 997 % 5000)
                plan.append((call("pp_handlers", "echo", payload), "echo", payload))
                tag += 1
        first_kill = next(i for i, p in enumerate(plan) if p[1] == "kill")
        s.send_async(batched(frame(etf.encode(t)) for t, _, _ in plan))
        outcome = {"killed": 0, "survived": 0, "late-kill victims": 0}
        for index, (_term, kind, expected) in enumerate(plan):
            reply = s.recv()
            where = f"reply {index} ({kind})"
            if kind == "kill":
                if is_crashed(reply):
                    outcome["killed"] += 1
                else:
                    assert reply[0] == OK and type(reply[1]) is bytes, f"{where}: {short(reply)}"
                    body = reply[1]
                    assert len(body) == BIG_RESULT and body.count(0) == BIG_RESULT, (
                        f"{where}: a {len(body)}-byte result that is not {BIG_RESULT} zero bytes: "
                        f"the stream is torn (a partial frame swallowed what came after it); "
                        f"first non-zero byte at {len(body) - len(body.lstrip(bytes(1)))}"
                    )
                    outcome["survived"] += 1
            elif reply != (OK, expected):
                # -- a kill landing after its call was done hits whichever call runs next
                assert index > first_kill and is_crashed(reply), f"{where}: {short(reply)}"
                outcome["late-kill victims"] += 1
        print("kill_self_after outcomes:", outcome)
        s.join_writer()
        assert [s.request(call("pp_handlers", "twice", i)) for i in range(10)] == [(OK, 2 * i) for i in range(10)]
        assert s.finish() == 0


# ---------------------------------------------------------------------- 5. memory in bytes


def test_in_flight_bytes_bound_the_dispatcher_memory():
    """750 MB of 256 KB echo requests behind a 2 s call, with --max-in-flight-bytes 32 MiB:
    stdin is not read beyond the budget, so the dispatcher's peak RSS stays bounded."""
    budget = 32 * MiB
    count, size = 3000, 256 * 1024
    with Server("--workers", "2", *BASE, "--max-in-flight-bytes", str(budget)) as s:
        s.send_async(_slow_then_echoes(count, size))
        assert s.recv() == (OK, b"slow")
        for i in range(count):
            reply = s.recv()
            assert reply[0] == OK and reply[1] == blob(i, size), f"echo {i}: {short(reply)}"
        s.join_writer()
        peak = s.vm_hwm_mb()
        bound = (budget + 64 * MiB) / MiB + 150
        print(f"dispatcher VmHWM {peak:.0f} MB (bound {bound:.0f} MB)")
        assert peak < bound, f"dispatcher peak RSS {peak:.0f} MB over {bound:.0f} MB"
        assert s.finish() == 0


def _slow_then_echoes(count: int, size: int):
    def frames():
        yield frame(etf.encode(call("pp_handlers", "sleep_ms", 2000, b"slow")))
        for i in range(count):
            yield frame(etf.encode(call("pp_handlers", "echo", blob(i, size))))

    return batched(frames())


# ---------------------------------------------------------------------- 6. info frames


INFO_FLOODS = [
    # (frames, size of each info payload, extra flags, dispatcher VmHWM bound in MB)
    pytest.param(100_000, 100, (), 200, id="100k-small-info-frames"),
    pytest.param(
        3_000, 100_000, ("--max-in-flight-bytes", str(32 * MiB)), 32 + 64 + 150, id="300MB-of-100KB-info-frames"
    ),
    pytest.param(
        40, 8 * MiB, ("--max-in-flight-bytes", str(2 * MiB)), 2 + 64 + 150, id="info-frames-bigger-than-the-budget"
    ),
    pytest.param(
        1, 3_000_000, ("--max-in-flight-bytes", str(2 * MiB)), 2 + 64 + 150, id="one-info-frame-bigger-than-the-budget"
    ),
]


@pytest.mark.parametrize(("frames", "size", "flags", "bound"), INFO_FLOODS)
def test_info_frames_count_and_never_grow_memory_without_bound(frames, size, flags, bound):
    with Server("--workers", "2", *BASE, *flags) as s:
        filler = b"i" * size

        def flood():
            for k in range(frames):
                yield frame(etf.encode((A("info"), A("cache"), [(A("validation"), filler), (A("n"), k)])))
            yield frame(etf.encode(call("pp_handlers", "echo", b"after the flood")))

        s.send_async(batched(flood(), 4 * MiB))
        assert s.recv() == (OK, b"after the flood")
        s.join_writer()
        assert s.request(call("pp_handlers", "twice", 4)) == (OK, 8)
        peak = s.vm_hwm_mb()
        print(f"dispatcher VmHWM {peak:.0f} MB (bound {bound} MB)")
        assert peak < bound, f"dispatcher peak RSS {peak:.0f} MB over {bound} MB"
        assert s.finish() == 0


# ---------------------------------------------------------------------- 7. decoding


def _deep_iolist(depth: int, inner: int, seed: int) -> ImproperList:
    """``[[[Inner | <<b1>>] | <<b2>>] ...]``, ``depth`` levels of one-item improper lists with
    distinct tails around a list of ``inner`` integers (cheap to send compressed)."""
    rnd = random.Random(seed)
    term = [1000] * inner
    for _ in range(depth):
        term = ImproperList([term], rnd.randbytes(12))
    return term


@pytest.mark.parametrize(
    ("inner", "timeout_ms"),
    [
        pytest.param(50_000, 1000, id="3KB-compressed-1s-timeout"),
        pytest.param(1_000_000, 10_000, id="minutes-if-quadratic-10s-timeout"),
    ],
)
def test_a_deep_improper_iolist_decodes_within_the_timeout(inner, timeout_ms):
    """A few KB of compressed request nesting 190 improper lists around ``inner`` integers:
    decoding must be linear, so the call is answered with its own term inside its timeout,
    not Timeout (a decoder that re-decodes every level's subtree takes ~190x as long: seconds
    for the first case, minutes, i.e. past the hang deadline, for the second)."""
    print(f"POOLPORT_TEST_SEED={SEED}")
    iolist = _deep_iolist(190, inner, SEED)
    request = etf.encode((A("call"), A("pp_handlers"), A("echo"), [iolist]), compressed=9)
    assert len(request) < 16_000, len(request)
    with Server("--workers", "1", *BASE, "--timeout-ms", str(timeout_ms)) as s:
        s.write_all(frame(request) + frame(etf.encode(call("pp_handlers", "twice", 5))))
        data = s.recv_frame()
        if data != etf.encode((OK, iolist)):  # the bytes, to spare this side a slow decoder
            reply = etf.decode(data)
            assert error_head(reply) is None, f"an error instead of its own term: {short(reply)}"
            assert reply == (OK, iolist), f"not its own term: {short(reply)}"
        assert s.recv() == (OK, 10)
        assert s.finish() == 0


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_decoding_counts_towards_the_call_timeout(compressed):
    """12 million integers take far longer than 50 ms to decode (allocating them alone does):
    with {info, timeout, [{ms, 50}]} the call is answered Timeout, and serving goes on."""
    args = [[100_000] * 12_000_000]
    request = etf.encode((A("call"), A("pp_handlers"), A("echo"), args), compressed=6 if compressed else 0)
    assert len(request) < 64 * MiB
    with Server("--workers", "1", *BASE, "--max-term-elements", "20000000") as s:
        s.send_async(
            batched(
                [
                    frame(etf.encode((A("info"), A("timeout"), [(A("ms"), 50)]))),
                    frame(request),
                    frame(etf.encode(call("pp_handlers", "twice", 6))),
                ],
                4 * MiB,
            )
        )
        reply = s.recv()
        assert error_head(reply) == (SERVER, 3, b"Timeout"), short(reply)
        assert s.recv() == (OK, 12)
        s.join_writer()
        assert s.finish() == 0


# ---------------------------------------------------------------------- compressed info packets


def test_a_compressed_info_packet_gets_no_reply_and_shifts_nothing():
    """term_to_binary({info, timeout, ...}, [compressed]) is still an info packet: it rides with
    its call (and sets its timeout), and gets no reply of its own."""
    info = (A("info"), A("timeout"), [(A("ms"), 300), (A("pad"), b"p" * 300)])
    packet = etf.encode(info, compressed=6)
    assert packet[1] == 80
    with PortClient("--workers", "2", "-m", "pp_handlers", "--log-level", "WARNING") as c:
        c.send_raw(frame(packet))
        c.send(call("pp_handlers", "sleep_ms", 2000, 1))  # the compressed timeout applies to it
        c.send(call("pp_handlers", "twice", 21))
        kind, (typ, code, cls, *_rest) = c.recv(timeout=60)
        assert (kind, typ, code, cls) == (A("error"), A("server"), 3, b"Timeout")
        assert c.recv(timeout=60) == (OK, 42)
        assert c.request(call("pp_handlers", "twice", 2)) == (OK, 4)
