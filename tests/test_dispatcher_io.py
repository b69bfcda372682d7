"""The dispatcher never blocks on a peer: stdin EOF and SIGTERM are noticed whatever the Erlang
side and the workers do (invariant 3). The deadlines here only catch a wedged server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from poolport.codec import etf
from poolport.protocol.framing import frame
from portclient import HANDLERS, call

pytestmark = [pytest.mark.e2e]


def serve(tmp_path, *flags: str, grace_ms: int = 500) -> subprocess.Popen:
    config = tmp_path / "poolport.yaml"
    config.write_text(f"shutdown_grace_ms: {grace_ms}\nlog_level: WARNING\n")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "poolport",
            "serve",
            "--config",
            str(config),
            "--python-path",
            HANDLERS,
            "-m",
            "pp_handlers",
            *flags,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def exits_within(proc: subprocess.Popen, seconds: float) -> int | None:
    """The exit status, or None if the server was still running after ``seconds`` (wedged)."""
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    finally:
        for pipe in (proc.stdin, proc.stdout):
            if not pipe.closed:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


def test_stdin_eof_is_noticed_while_back_pressure_keeps_stdin_unread(tmp_path):
    """Admission is full (max_in_flight 1, a minute-long call), so stdin is not being read;
    the Erlang side goes away: the server still notices and leaves after its grace period."""
    proc = serve(tmp_path, "--workers", "1", "--max-in-flight", "1")
    requests = b"".join(frame(etf.encode(call("pp_handlers", "sleep_ms", 60_000, i))) for i in range(5))
    proc.stdin.write(requests)
    proc.stdin.flush()
    time.sleep(2)  # the first call is running, the rest wait unread in the pipe
    proc.stdin.close()
    assert exits_within(proc, 20) == 0


@pytest.mark.parametrize("stop", ["sigterm", "stdin-eof"])
def test_the_end_is_noticed_while_the_erlang_side_reads_no_replies(tmp_path, stop):
    """Replies of 4 MB pile up in a pipe nobody reads: SIGTERM or stdin EOF still ends the server."""
    proc = serve(tmp_path, "--workers", "2")
    big = os.urandom(4 << 20)
    for _ in range(8):
        proc.stdin.write(frame(etf.encode(call("pp_handlers", "echo", big))))
        proc.stdin.flush()
    time.sleep(3)  # replies are done and stuck: the stdout pipe is full
    if stop == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        proc.stdin.close()
    assert exits_within(proc, 20) == 0


def test_a_reader_that_goes_away_ends_the_server_at_once(tmp_path):
    """The port's read end closes (the Erlang VM died) while a long call runs: nothing is ever
    written again, yet the dead reader is noticed."""
    proc = serve(tmp_path, "--workers", "1", grace_ms=60_000)
    proc.stdin.write(frame(etf.encode(call("pp_handlers", "sleep_ms", 60_000))))
    proc.stdin.flush()
    time.sleep(2)
    proc.stdout.close()
    assert exits_within(proc, 20) == 0


def test_a_killed_dispatcher_leaves_nothing_behind_after_the_next_start(tmp_path):
    """kill -9 of the dispatcher cannot clean up; the next `poolport serve` removes its
    directory (and only the directories of dispatchers that are gone)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    first = subprocess.Popen(
        [sys.executable, "-m", "poolport", "serve", "--workers", "1", "--python-path", HANDLERS, "-m", "pp_handlers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    first.stdin.write(frame(etf.encode(call("pp_handlers", "twice", 1))))
    first.stdin.flush()
    assert first.stdout.read(4)  # serving: its directory exists
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("poolport-")]
    assert len(left) == 1
    foreign = tmp_path / "poolport-notapid-x"  # not ours to judge: kept
    foreign.mkdir()
    first.kill()
    first.wait()
    exits_within(first, 5)
    second = subprocess.Popen(
        [sys.executable, "-m", "poolport", "serve", "--workers", "1", "--python-path", HANDLERS, "-m", "pp_handlers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    second.stdin.write(frame(etf.encode(call("pp_handlers", "twice", 1))))
    second.stdin.flush()
    assert second.stdout.read(4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert left[0] not in names and foreign.name in names
    second.stdin.close()
    assert exits_within(second, 20) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name]
