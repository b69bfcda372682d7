"""End to end: a real ``poolport serve`` process driven over pipes like an Erlang port."""

from __future__ import annotations

import os
import random
import signal
import time
import zlib

import pytest

from poolport.codec import etf
from poolport.protocol.framing import frame
from portclient import SEED_CONFIG, A, PortClient, call

pytestmark = [pytest.mark.e2e]

OK = A("reply")
ERROR = A("error")


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def server():
    with PortClient("--workers", "2", "-m", "pp_handlers") as client:
        yield client


def test_call_reply_and_errors(server):
    assert server.request(call("pp_handlers", "twice", 21)) == (OK, 42)
    kind, (typ, code, cls, detail, trace) = server.request(call("pp_handlers", "fail", b"bad thing"))
    assert (kind, typ, code, cls, detail) == (ERROR, A("user"), 0, b"ValueError", b"bad thing")
    assert trace[-1] == b"ValueError: bad thing" and all(type(line) is bytes for line in trace)
    assert server.request((A("cast"), A("pp_handlers"), A("echo"), [1])) == (A("noreply"),)


@pytest.mark.parametrize(
    ("module", "function", "code"),
    [
        pytest.param("os", "getcwd", 1, id="module-not-allowed"),
        pytest.param("pp_handlers_nope", "x", 1, id="module-missing"),
        pytest.param("pp_handlers", "nope", 2, id="no-function"),
        pytest.param("pp_handlers", "_private", 2, id="private"),
        pytest.param("pp_handlers", "__class__", 2, id="dunder"),
        pytest.param("pp_handlers", "getcwd", 2, id="imported-name"),
        pytest.param("pp_handlers", "os", 2, id="imported-module"),
    ],
)
def test_server_errors(server, module, function, code):
    kind, (typ, got_code, *_rest) = server.request(call(module, function))
    assert (kind, typ, got_code) == (ERROR, A("server"), code)


def test_module_outside_allowlist_is_never_imported(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef f(): return 1\n")
    with PortClient("--workers", "1", "-m", "pp_handlers", "--python-path", str(tmp_path)) as c:
        assert c.request(call("evil_mod", "f"))[1][:2] == (A("server"), 1)
    assert not marker.exists()


def test_replies_stay_in_request_order_under_random_durations(server):
    rnd = random.Random(1234)
    n = 2000
    terms = [call("pp_handlers", "sleep_ms", rnd.choice([0, 0, 0, 1, 3]), i) for i in range(n)]
    server.send(*terms)
    assert [server.recv() for _ in range(n)] == [(OK, i) for i in range(n)]


@pytest.mark.parametrize("spin_us", ["0", "5000"])
def test_sleeping_or_spinning_when_idle_changes_no_reply(spin_us):
    rnd = random.Random(int(spin_us))
    with PortClient("--workers", "2", "-m", "pp_handlers", "--idle-spin-us", spin_us) as c:
        for burst in range(30):  # bursts with idle gaps between them: every wait path is taken
            n = rnd.choice([1, 1, 2, 50])
            c.send(*[call("pp_handlers", "echo", (burst, i)) for i in range(n)])
            assert [c.recv() for _ in range(n)] == [(OK, (burst, i)) for i in range(n)]
            time.sleep(rnd.choice([0, 0.001, 0.01]))


def test_two_workers_really_run_two_calls_at_once(server):
    server.send(*[call("pp_handlers", "work", 300, i) for i in range(4)])
    results = [server.recv()[1] for _ in range(4)]
    assert [r[0] for r in results] == [0, 1, 2, 3]
    assert len({r[1] for r in results}) == 2, "both worker processes served calls"
    spans = sorted((r[2], r[3]) for r in results)
    assert any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "some calls overlapped in time"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"\x83garbage", id="not-etf"),
        pytest.param(b"\x84a\x01", id="wrong-version"),
        pytest.param(b"\x83\xff", id="unknown-tag"),
        pytest.param(b"\x83m\xff\xff\xff\xffabc", id="binary-length-beyond-frame"),
        pytest.param(b"\x83l\x7f\xff\xff\xffj", id="list-length-beyond-frame"),
        pytest.param(b"\x83h\x04w\x04call", id="truncated"),
        pytest.param(b"", id="empty-frame"),
        pytest.param(etf.encode((A("call"), b"m", A("f"), [])), id="binary-module"),
        pytest.param(etf.encode((A("call"), A("m"), A("f"), A("notalist"))), id="args-not-list"),
        pytest.param(etf.encode(42), id="not-a-request"),
        pytest.param(b"\x83" + b"l\x00\x00\x00\x01" * 100_000 + b"jj", id="deep-nesting"),
    ],
)
def test_bad_input_gets_a_protocol_error_and_serving_goes_on(server, raw):
    server.send_raw(frame(raw))
    kind, (typ, code, *_rest) = server.recv()
    assert (kind, typ, code) == (ERROR, A("protocol"), 2)
    assert server.request(call("pp_handlers", "twice", 2)) == (OK, 4)


def test_oversized_frame_is_skipped_with_a_protocol_error():
    with PortClient("--workers", "1", "-m", "pp_handlers", "--max-frame-bytes", "1000") as c:
        c.send(call("pp_handlers", "echo", b"x" * 5000), call("pp_handlers", "echo", b"small"))
        kind, (typ, code, cls, *_rest) = c.recv()
        assert (kind, typ, code, cls) == (ERROR, A("protocol"), 1, b"FrameTooLarge")
        assert c.recv() == (OK, b"small")


def _echo_of(arg: bytes) -> bytes:
    """The ETF body (no version byte) of {call, pp_handlers, echo, [Arg]}, Arg given encoded."""
    return b"h\x04w\x04callw\x0bpp_handlersw\x04echol\x00\x00\x00\x01" + arg + b"j"


def _empty_lists(n: int) -> bytes:
    """A list of ``n`` empty lists: 1 byte each on the wire, ~64 bytes each in Python."""
    return b"l" + n.to_bytes(4, "big") + b"j" * n + b"j"


def test_element_amplification_is_refused_before_it_is_built():
    """A 60 KB compressed frame that inflates to 60 million `[]` once made a worker peak at
    4.3 GB. Under a 1 GiB worker memory limit it must be a DecodeError naming the limit (not
    a MemoryError), plain or compressed, and the pool serves on; at the limit it decodes."""
    with PortClient(
        "--workers", "1", "-m", "pp_handlers", "--max-worker-memory-mb", "1024", "--max-term-elements", "1000"
    ) as c:
        body = _echo_of(_empty_lists(60_000_000))
        bomb = b"\x83P" + len(body).to_bytes(4, "big") + zlib.compress(body, 9)
        assert len(bomb) < 100_000
        over = b"\x83" + _echo_of(_empty_lists(996))  # 4 + 1 + 996 elements
        for raw in (bomb, over, b"\x83" + _echo_of(_empty_lists(995))) * 2:  # full path, then fast
            c.send_raw(frame(raw))
            if raw is not bomb and raw is not over:
                assert c.recv() == (OK, [[]] * 995)  # 4 + 1 + 995 = 1000: at the limit
                continue
            kind, (typ, code, cls, detail, _trace) = c.recv()
            assert (kind, typ, code, cls) == (ERROR, A("protocol"), 2, b"DecodeError")
            assert b"max_term_elements" in detail, detail
        assert c.request(call("pp_handlers", "twice", 2)) == (OK, 4)


def test_print_in_a_handler_never_reaches_the_port(server):
    assert server.request(call("pp_handlers", "chatty", 7)) == (OK, 7)
    assert server.request(call("pp_handlers", "twice", 1)) == (OK, 2)


def test_unencodable_result_is_a_clear_error(server):
    kind, (typ, _code, cls, detail, _trace) = server.request(call("pp_handlers", "unencodable"))
    assert (kind, typ, cls) == (ERROR, A("user"), b"EncodeError")
    assert b"object" in detail


def test_info_timeout_stops_the_call_and_the_pool_carries_on(server):
    timeout = (A("info"), A("timeout"), [(A("ms"), 200)])
    server.send(timeout, call("pp_handlers", "sleep_ms", 30_000, b"late"), call("pp_handlers", "twice", 5))
    kind, (typ, code, cls, *_rest) = server.recv(timeout=20)
    assert (kind, typ, code, cls) == (ERROR, A("server"), 3, b"Timeout")
    assert server.recv() == (OK, 10)
    assert server.request(call("pp_handlers", "twice", 6)) == (OK, 12)


def test_config_timeout_applies_per_function(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("functions: {pp_handlers.sleep_ms: {timeout_ms: 200}}\n")
    with PortClient("--workers", "1", "-m", "pp_handlers", config=str(cfg)) as c:
        c.send(call("pp_handlers", "sleep_ms", 30_000), call("pp_handlers", "work", 0, 1))
        assert c.recv(timeout=20)[1][:3] == (A("server"), 3, b"Timeout")
        assert c.recv()[1][0] == 1


def test_worker_crash_blames_one_call_and_reruns_the_others(server):
    pids = {server.request(call("pp_handlers", "getpid"))[1] for _ in range(20)}
    server.send(
        *[call("pp_handlers", "sleep_ms", 50, i) for i in range(6)],
        call("pp_handlers", "die"),
        *[call("pp_handlers", "sleep_ms", 50, i) for i in range(6, 12)],
    )
    replies = [server.recv(timeout=60) for _ in range(13)]
    assert replies[:6] == [(OK, i) for i in range(6)]
    kind, (typ, code, cls, *_rest) = replies[6]
    assert (kind, typ, code, cls) == (ERROR, A("server"), 4, b"WorkerCrashed")
    assert replies[7:] == [(OK, i) for i in range(6, 12)]
    assert server.request(call("pp_handlers", "twice", 4)) == (OK, 8)
    assert any(gone(pid, 0.5) for pid in pids) or len(pids) == 1


def test_stdin_eof_finishes_in_flight_calls_then_exits_0_leaving_no_workers(server):
    pids = set()
    for _ in range(30):
        pids.add(server.request(call("pp_handlers", "getpid"))[1])
    server.send(*[call("pp_handlers", "sleep_ms", 100, i) for i in range(4)])
    assert server.proc.stdin is not None
    server.proc.stdin.close()
    assert [server.recv() for _ in range(4)] == [(OK, i) for i in range(4)]
    assert server.proc.wait(30) == 0
    assert all(gone(pid) for pid in pids), "worker processes left behind"


def test_sigterm_exits_quickly_and_cleanly(server):
    pid = server.request(call("pp_handlers", "getpid"))[1]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert gone(pid)


@pytest.mark.parametrize("packet", [1, 2, 4])
def test_every_packet_size(packet):
    with PortClient("--workers", "1", "-m", "pp_handlers", packet=packet) as c:
        assert c.request(call("pp_handlers", "echo", b"x" * 100)) == (OK, b"x" * 100)


def test_looking_a_function_up_is_inside_its_calls_timeout():
    """The first call to a function resolves it (an import, a module's ``__getattr__``):
    that work runs under the call's timeout too, on the fast path as on the slow one."""
    with PortClient("--workers", "1", "-m", "pp_sandbox", "--timeout-ms", "500") as c:
        start = time.monotonic()
        kind, (typ, code, cls, *_rest) = c.request(call("pp_sandbox", "slow_to_find"))
        assert (kind, typ, code, cls) == (ERROR, A("server"), 3, b"Timeout")
        assert time.monotonic() - start < 2.5
        kind, (typ, code, cls, *_rest) = c.request(call("pp_sandbox", "touch"))  # no argument
        assert (kind, typ, code, cls) == (ERROR, A("user"), 0, b"TypeError")


def test_a_worker_stopped_between_calls_is_replaced_and_its_calls_answered():
    """SIGSTOP an idle worker, then send it calls: no call ever starts, so no timeout can
    fire. The stall watchdog must replace it, and every call is answered, in order."""
    with PortClient("--workers", "1", "-m", "pp_handlers") as c:
        kind, info = c.request(call("$poolport", "info"))
        pid = info[A("worker_pid")]
        os.kill(pid, signal.SIGSTOP)
        try:
            c.send(*[call("pp_handlers", "twice", i) for i in range(3)])
            assert [c.recv(timeout=20) for _ in range(3)] == [(OK, 0), (OK, 2), (OK, 4)]
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # replaced, as it should be
        kind, info = c.request(call("$poolport", "info"))
        assert info[A("worker_pid")] != pid and info[A("worker_deaths")] == 1, info
        assert "has run none and sent nothing" in c.stderr_text()


def test_a_functions_own_timeout_applies_when_it_is_learnt_after_the_call_began():
    """A call begins before its function is resolved (here: a 0.5 s lookup), so the function's
    own timeout (@poolport.handler(timeout_ms=300)) is set after the dispatcher first saw the
    call running with none: the dispatcher must look again, and stop it."""
    with PortClient("--workers", "1", "-m", "pp_sandbox") as c:
        start = time.monotonic()
        kind, (typ, code, cls, *_rest) = c.request(call("pp_sandbox", "found_slowly", 20_000), timeout=15)
        assert (kind, typ, code, cls) == (ERROR, A("server"), 3, b"Timeout")
        assert time.monotonic() - start < 10
        kind, info = c.request(call("$poolport", "info"))  # a fresh worker serves on
        assert kind == OK and info[A("timeouts")] == 1, info


def test_a_named_pool_names_itself_in_every_log_line():
    """Several pools log to one node's stderr: --name (the OTP client passes a named pool's
    name) labels the dispatcher's lines and the workers'."""
    with PortClient("--workers", "1", "-m", "pp_handlers", "--name", "pricing") as c:
        assert c.request((A("cast"), A("pp_handlers"), A("fail"), [b"logged by a worker"])) == (A("noreply"),)
        deadline = time.monotonic() + 10
        while "logged by a worker" not in c.stderr_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [ln for ln in c.stderr_text().splitlines() if " poolport[" in ln]
    assert any("poolport[pricing " in ln and "serving" in ln for ln in lines), lines
    assert any("poolport[pricing worker 0 pid " in ln and "cast pp_handlers.fail raised" in ln for ln in lines)
    assert all("poolport[pricing " in ln for ln in lines), lines


def test_builtin_info_call(server):
    kind, info = server.request(call("$poolport", "info"))
    assert kind == OK and info[A("workers")] == 2 and info[A("os_pid")] == server.proc.pid


def test_bare_mode_speaks_the_seed_protocol():
    with PortClient(config=SEED_CONFIG, packet=2) as c:
        assert c.request((A("twice"), 21)) == 42
        assert c.request((A("sum"), 1, 2)) == 3
        assert c.request((A("hello"), list(b"World"))) == b"Hello, World"
        assert c.request((A("nope"), 1)) == (
            ERROR,
            (A("server"), b"NoSuchFunction", b"seed_handlers.nope is not a public function"),
        )


def test_the_smallest_timeout_set_applies_even_when_the_caller_sends_a_longer_one():
    """The OTP client sends {info, timeout, ...} with its own (longer) timeout before every
    call: the YAML's shorter timeout_ms must still stop the call."""
    with PortClient("--workers", "1", "-m", "pp_handlers", "--timeout-ms", "500") as c:
        c.send((A("info"), A("timeout"), [(A("ms"), 5000)]), call("pp_handlers", "sleep_ms", 3000, 1))
        kind, (typ, code, cls, _detail, _trace) = c.recv(timeout=60)
        assert (kind, typ, code, cls) == (A("error"), A("server"), 3, b"Timeout")
        c.send((A("info"), A("timeout"), [(A("ms"), 200)]), call("pp_handlers", "sleep_ms", 1000, 2))
        kind, (typ, code, cls, _detail, _trace) = c.recv(timeout=60)  # the caller's shorter one too
        assert (kind, typ, code, cls) == (A("error"), A("server"), 3, b"Timeout")
        assert c.request(call("pp_handlers", "sleep_ms", 10, 3)) == (A("reply"), 3)


def test_caller_timeout_ms_is_the_timeout_of_a_call_sent_without_a_packet():
    """With --caller-timeout-ms (the OTP client's default call timeout), a call with no
    {info, timeout, ...} packet is stopped at it; a packet still overrides it for one call,
    longer (the next call is back to the default) or none at all (ms 0)."""
    no_limit = (A("info"), A("timeout"), [(A("ms"), 0)])
    longer = (A("info"), A("timeout"), [(A("ms"), 5000)])
    with PortClient("--workers", "1", "-m", "pp_handlers", "--caller-timeout-ms", "300") as c:
        c.send(call("pp_handlers", "sleep_ms", 3000, 1))
        kind, (typ, code, cls, _detail, _trace) = c.recv(timeout=60)
        assert (kind, typ, code, cls) == (A("error"), A("server"), 3, b"Timeout")
        c.send(longer, call("pp_handlers", "sleep_ms", 600, 2), call("pp_handlers", "sleep_ms", 3000, 3))
        assert c.recv(timeout=60) == (A("reply"), 2)
        kind, (typ, code, cls, _detail, _trace) = c.recv(timeout=60)  # the default again
        assert (kind, typ, code, cls) == (A("error"), A("server"), 3, b"Timeout")
        c.send(no_limit, call("pp_handlers", "sleep_ms", 600, 4))
        assert c.recv(timeout=60) == (A("reply"), 4)
        assert c.request(call("pp_handlers", "sleep_ms", 10, 5)) == (A("reply"), 5)
