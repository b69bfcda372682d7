"""Failure modes provoked for real: crashing workers, hostile bytes, dead peers, overload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poolport.protocol import bert
from poolport.codec import etf
from poolport.protocol.framing import frame
from portclient import HANDLERS, ROOT, A, PortClient, call
from test_serve import gone

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

OK, ERROR = A("reply"), A("error")

CRASHES = [
    pytest.param("die", id="os._exit"),
    pytest.param("sigkill_self", id="SIGKILL"),
    pytest.param("segfault", id="segfault-via-ctypes"),
]


@pytest.fixture(scope="module")
def server():
    with PortClient("--workers", "2", "-m", "pp_handlers", "--log-level", "WARNING") as client:
        yield client


@pytest.mark.parametrize("crash", CRASHES)
def test_a_crashing_call_gets_worker_crashed_and_innocent_calls_their_answer(server, crash):
    before = [call("pp_handlers", "sleep_ms", 20, i) for i in range(8)]
    after = [call("pp_handlers", "sleep_ms", 20, i) for i in range(8, 16)]
    server.send(*before, call("pp_handlers", crash), *after)
    replies = [server.recv(timeout=60) for _ in range(17)]
    assert replies[:8] == [(OK, i) for i in range(8)]
    kind, (typ, code, cls, detail, _trace) = replies[8]
    assert (kind, typ, code, cls) == (ERROR, A("server"), 4, b"WorkerCrashed")
    assert b"died during this call" in detail
    assert replies[9:] == [(OK, i) for i in range(8, 16)]
    assert server.request(call("pp_handlers", "twice", 21)) == (OK, 42)


def test_memory_blow_up_under_the_worker_limit_is_an_error_not_a_dead_pool():
    with PortClient("--workers", "1", "-m", "pp_handlers", "--max-worker-memory-mb", "600") as c:
        kind, (typ, _code, cls, *_rest) = c.request(call("pp_handlers", "hog_memory", 2000), timeout=60)
        assert (kind, typ) == (ERROR, A("user")) and cls == b"MemoryError"
        assert c.request(call("pp_handlers", "hog_memory", 10)) == (OK, 10 * 1024 * 1024)


def test_closing_fd_1_in_a_handler_cannot_touch_the_reply_stream(server):
    assert server.request(call("pp_handlers", "close_stdout", 5)) == (OK, 5)
    assert [server.request(call("pp_handlers", "twice", i)) for i in range(20)] == [(OK, 2 * i) for i in range(20)]


def _mutations():
    valid = [
        etf.encode(call("pp_handlers", "echo", [1, 2.5, b"bin", A("atom"), {A("k"): (1, [])}])),
        etf.encode((A("info"), A("timeout"), [(A("ms"), 100)])),
        etf.encode(call("pp_handlers", "twice", 7)),
    ]
    return st.tuples(
        st.sampled_from(valid),
        st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
        st.integers(0, 200),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_mutations())
def test_fuzz_mutated_frames_never_kill_or_hang_the_server(server, case):
    payload, flips, cut = case
    data = bytearray(payload)
    for index, value in flips:
        if data:
            data[index % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % 4)]) if cut % 3 == 0 else bytes(data)
    server.send_raw(frame(data))
    server.send(call("pp_handlers", "twice", 21))
    if not bert.is_info(data):  # an info packet has no reply of its own
        first = server.recv(timeout=30)
        assert first[0] in (OK, ERROR)
        if first[0] == ERROR:
            assert first[1][0] in (A("protocol"), A("server"), A("user"))
    last = server.recv(timeout=30)
    # a mutated info packet may have given the call a tiny timeout: that is an answer too
    assert last == (OK, 42) or last[1][:3] == (A("server"), 3, b"Timeout")
    assert server.proc.poll() is None


def test_zip_bomb_is_refused():
    import zlib

    inner = b"m" + (50_000_000).to_bytes(4, "big") + bytes(50_000_000)
    bomb = b"\x83P" + len(inner).to_bytes(4, "big") + zlib.compress(inner, 9)
    with PortClient("--workers", "1", "-m", "pp_handlers", "--max-frame-bytes", "1000000") as c:
        c.send_raw(frame(bomb))
        kind, (typ, code, *_rest) = c.recv()
        assert (kind, typ, code) == (ERROR, A("protocol"), 2)
        assert c.request(call("pp_handlers", "twice", 1)) == (OK, 2)


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_back_pressure_keeps_dispatcher_memory_flat_under_overload():
    """300 MB of requests against max_in_flight=200: the dispatcher must not buffer them."""
    with PortClient("--workers", "1", "-m", "pp_handlers", "--max-in-flight", "200", "--log-level", "WARNING") as c:
        c.request(call("pp_handlers", "twice", 1))
        baseline = _rss_kb(c.proc.pid)
        request = frame(etf.encode(call("pp_handlers", "sleep_ms", 0, b"x" * 30_000)))
        total = 10_000  # ~300 MB
        writer = threading.Thread(
            target=lambda: c.send_raw(request * 1000) or [c.send_raw(request * 1000) for _ in range(total // 1000 - 1)],
            daemon=True,
        )
        writer.start()
        peak = baseline
        for i in range(total):
            reply = c.recv(timeout=60)
            assert reply == (OK, b"x" * 30_000)
            if i % 500 == 0:
                peak = max(peak, _rss_kb(c.proc.pid))
        writer.join(60)
        growth_mb = (peak - baseline) / 1024
        assert growth_mb < 60, f"dispatcher grew by {growth_mb:.0f} MB under a 300 MB overload"


def test_killing_the_erlang_vm_with_sigkill_leaves_no_poolport_process(tmp_path):
    script = (
        'P = open_port({spawn_executable, "' + sys.executable + '"}, '
        '[{args, ["-m", "poolport", "serve", "--workers", "2", "--module", "pp_handlers", '
        '"--python-path", "' + HANDLERS + '"]}, {packet, 4}, binary, exit_status]), '
        "{os_pid, OsPid} = erlang:port_info(P, os_pid), "
        "Pids = [begin port_command(P, term_to_binary({call, pp_handlers, sleep_ms, [200, x]})), "
        "port_command(P, term_to_binary({call, pp_handlers, getpid, []})), "
        "receive {P, {data, _}} -> ok end, receive {P, {data, D}} -> {reply, W} = binary_to_term(D), W end "
        "end || _ <- lists:seq(1, 6)], "
        'io:format("pids ~w ~w~n", [OsPid, lists:usort(Pids)]), '
        "port_command(P, term_to_binary({call, pp_handlers, sleep_ms, [60000, x]})), "
        "timer:sleep(infinity)."
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    erl = subprocess.Popen(["erl", "-noshell", "-eval", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while not line.startswith("pids") and time.monotonic() < deadline:
            line = erl.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("pids"), "the Erlang side never got its replies"
        dispatcher, workers = line.split(" ", 2)[1:]
        pids = [int(dispatcher)] + [int(p) for p in workers.strip("[]\n").split(",")]
        assert len(pids) >= 2
        erl.send_signal(signal.SIGKILL)
        erl.wait(10)
        assert all(gone(pid, within=15) for pid in pids), "poolport outlived the Erlang VM"
    finally:
        if erl.poll() is None:
            erl.kill()
        erl.stdout.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_finish_in_flight_calls_then_exit_0(sig):
    with PortClient("--workers", "2", "-m", "pp_handlers") as c:
        pid = c.request(call("pp_handlers", "getpid"))[1]
        c.send(*[call("pp_handlers", "sleep_ms", 300, i) for i in range(2)])
        time.sleep(0.1)
        c.proc.send_signal(sig)
        assert [c.recv(timeout=30) for _ in range(2)] == [(OK, 0), (OK, 1)]
        assert c.proc.wait(30) == 0
        assert gone(pid)


def test_workers_exit_when_the_dispatcher_is_killed_even_mid_call():
    with PortClient("--workers", "2", "-m", "pp_handlers", "--log-level", "WARNING") as c:
        pids = {c.request(call("pp_handlers", "getpid"))[1] for _ in range(30)}
        c.send(*[call("pp_handlers", "sleep_ms", 60_000, i) for i in range(2)])
        time.sleep(0.3)
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(10)
        assert all(gone(pid, within=10) for pid in pids), "workers outlived their dispatcher"
