"""Live operations on a real ``poolport serve``: reload (request, SIGHUP, file watch), resize,
statistics, with workers killed at unlucky instants meanwhile. Every reply must still be its
request's own, in order, exactly once."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from portclient import A, PortClient, call

pytestmark = [pytest.mark.e2e]

OK = A("reply")
ERROR = A("error")
DEADLOCK = 60.0  # only catches a hang


def handler(tmp_path, version: int) -> None:
    # another size per version: Python's bytecode cache checks mtime (in seconds) and size
    (tmp_path / "pp_live.py").write_text(
        f"import os, time\nVERSION = {version}\n"
        "def version():\n    return VERSION\n"
        "def sleep_ms(ms, tag):\n    time.sleep(ms / 1000)\n    return (VERSION, tag)\n"
        "def pid_after(ms):\n    time.sleep(ms / 1000)\n    return os.getpid()\n" + "#" * version + "\n"
    )


def serve(tmp_path, *flags: str, yaml: str = "", modules: str = "pp_live") -> PortClient:
    handler(tmp_path, 1)
    config = tmp_path / "pool.yaml"
    config.write_text(f"modules: [{modules}]\npython_path: [{str(tmp_path)!r}]\n{yaml}")
    client = PortClient(*flags, config=str(config))
    wait_for(lambda: stats(client)["ready"] == stats(client)["workers"])
    return client


def op(client: PortClient, function: str, *args):
    reply = client.request(call("$poolport", function, *args), timeout=DEADLOCK)
    assert reply[0] == OK, reply
    return reply[1]


def worker_pids(client: PortClient) -> list[int]:
    """The pids of the workers, from calls pipelined so that every worker gets some."""
    client.send(*[call("pp_live", "pid_after", 30) for _ in range(24)])
    return sorted({client.recv(timeout=DEADLOCK)[1] for _ in range(24)})


def stats(client: PortClient) -> dict:
    return {str(k): v for k, v in op(client, "stats").items()}


def wait_for(predicate, what: str = "condition") -> None:
    deadline = time.monotonic() + DEADLOCK
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {DEADLOCK} s"
        time.sleep(0.02)


def reload(client: PortClient) -> object:
    ticket = op(client, "reload")
    wait_for(lambda: op(client, "reload_status", ticket) != A("running"), "end of the reload")
    return op(client, "reload_status", ticket)


def test_a_reload_replaces_every_worker_and_the_new_code_answers(tmp_path):
    with serve(tmp_path, "--workers", "3") as client:
        old = set(worker_pids(client))
        assert len(old) == 3
        handler(tmp_path, 2)
        assert reload(client) == A("ok")
        assert [client.request(call("pp_live", "version")) for _ in range(10)] == [(OK, 2)] * 10
        new = set(worker_pids(client))
        assert not old & new
        s = stats(client)
        assert (s["workers"], s["reloads"], s["worker_restarts"][A("reload")]) == (3, 1, 3)
        wait_for(lambda: stats(client)["processes"] == 3, "old workers gone")


def test_sighup_reloads(tmp_path):
    with serve(tmp_path, "--workers", "2") as client:
        handler(tmp_path, 5)
        client.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: stats(client)["reloads"] == 1 and not stats(client)["reloading"], "reload on SIGHUP")
        assert client.request(call("pp_live", "version")) == (OK, 5)


def test_a_watched_file_that_changes_reloads_the_workers(tmp_path):
    with serve(tmp_path, "--workers", "1", yaml="reload: {watch: true, poll_ms: 50}\n") as client:
        assert client.request(call("pp_live", "version")) == (OK, 1)
        handler(tmp_path, 7)
        wait_for(lambda: client.request(call("pp_live", "version")) == (OK, 7), "the new code")
        assert stats(client)["reloads"] == 1


def test_workers_killed_at_random_instants_during_reloads_lose_no_reply(tmp_path):
    rng = random.Random(18)
    with serve(tmp_path, "--workers", "3") as client:
        for version in (2, 3, 4):
            pids = worker_pids(client)
            handler(tmp_path, version)
            calls = [call("pp_live", "sleep_ms", rng.choice([0, 1, 5]), i) for i in range(300)]
            client.send(*calls[:150], call("$poolport", "reload"), *calls[150:])
            for pid in rng.sample(pids, 2):
                time.sleep(rng.random() * 0.3)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            replies = [client.recv(timeout=DEADLOCK) for _ in range(301)]
            ticket = replies.pop(150)
            assert ticket[0] == OK and isinstance(ticket[1], int)
            for i, reply in enumerate(replies):  # its own answer, or the crash of the call it ran
                if reply[0] == OK:
                    assert reply[1][1] == i and reply[1][0] in (version - 1, version)
                else:
                    assert reply[1][2] == b"WorkerCrashed", reply
            assert sum(r[0] == ERROR for r in replies) <= 2
            wait_for(lambda: op(client, "reload_status", ticket[1]) != A("running"), "end of the reload")
            assert op(client, "reload_status", ticket[1]) == A("ok")
            assert client.request(call("pp_live", "version")) == (OK, version)
        assert stats(client)["workers"] == 3


def test_shrinking_lets_busy_workers_finish_their_calls(tmp_path):
    with serve(tmp_path, "--workers", "3") as client:
        client.send(*[call("pp_live", "sleep_ms", 800, i) for i in range(3)], call("$poolport", "resize", 1))
        replies = [client.recv(timeout=DEADLOCK) for _ in range(4)]
        assert replies == [(OK, (1, 0)), (OK, (1, 1)), (OK, (1, 2)), (OK, A("ok"))]
        assert stats(client)["workers"] == 1
        wait_for(lambda: stats(client)["processes"] == 1, "retired workers gone")
        assert op(client, "resize", 4) == A("ok")
        assert stats(client)["workers"] == 4
        replies = [client.request(call("pp_live", "sleep_ms", 1, i)) for i in range(20)]
        assert replies == [(OK, (1, i)) for i in range(20)]


def test_operations_answer_in_their_turn_among_pipelined_calls(tmp_path):
    with serve(tmp_path, "--workers", "2") as client:
        client.send(
            call("pp_live", "sleep_ms", 300, "first"),
            call("$poolport", "stats"),
            call("pp_live", "sleep_ms", 0, b"$poolport"),
            (A("cast"), A("$poolport"), A("resize"), [2]),
            call("$poolport", "resize", 0),
            call("$poolport", "nonsense"),
        )
        first, st, marker, cast, bad, nonsense = [client.recv(timeout=DEADLOCK) for _ in range(6)]
        assert first == (OK, (1, b"first"))
        assert st[0] == OK and st[1][A("in_flight")] >= 1
        assert marker == (OK, (1, b"$poolport"))
        assert cast == (A("noreply"),)
        assert bad[0] == ERROR and bad[1][2] == b"BadRequest"
        assert nonsense[0] == ERROR  # not an operation: a worker says no such module
        assert nonsense[1][:2] == (A("server"), 1)


def test_a_new_worker_that_fails_after_the_probe_passed_fails_the_reload_and_the_old_ones_serve(tmp_path):
    # worker_init fails on its 4th run only: 2 workers at start, the probe (3rd), the first new worker
    counter = tmp_path / "inits"
    (tmp_path / "pp_init.py").write_text(
        "import os\n"
        f"COUNTER = {str(counter)!r}\n"
        "def init():\n"
        "    fd = os.open(COUNTER, os.O_WRONLY | os.O_APPEND | os.O_CREAT)\n"
        "    os.write(fd, b'x')\n"
        "    os.close(fd)\n"
        "    if os.path.getsize(COUNTER) == 4:\n"
        "        raise RuntimeError('the 4th init fails')\n"
    )
    with serve(tmp_path, "--workers", "2", yaml="worker_init: 'pp_init:init'\n", modules="pp_live, pp_init") as client:
        assert counter.read_bytes() == b"xx"
        old = worker_pids(client)
        status = reload(client)
        assert status[0] == A("error") and b"a new worker could not start" in status[1], status
        assert counter.read_bytes() == b"xxxx"
        assert worker_pids(client) == old  # the old workers serve on
        wait_for(lambda: stats(client)["processes"] == 2, "the failed worker gone")
        restarts = stats(client)["worker_restarts"]
        assert (restarts[A("reload")], restarts[A("crash")]) == (0, 0)
        assert reload(client) == A("ok")  # the 5th and 6th inits pass
        assert not set(worker_pids(client)) & set(old)
