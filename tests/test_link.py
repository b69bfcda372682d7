"""The dispatcher <-> worker link and the shared-memory records, in one process."""

from __future__ import annotations

import socket
import threading

import pytest

from poolport.server.link import BIG_MESSAGE, MessageReader, send_message
from poolport.server.progress import LOOK_AGAIN_S, MAX_TIMEOUT_MS, Counters, Progress


def _read_all(reader: MessageReader, sock: socket.socket, want: int) -> list:
    out: list = []
    while len(out) < want:
        got = reader.read_from(sock)
        assert got is not None, "peer closed early"
        out.extend((count, bytes(data)) for count, data in got)
    return out


@pytest.mark.parametrize(
    "size",
    [0, 10, 70_000, BIG_MESSAGE - 1, BIG_MESSAGE, 5 * BIG_MESSAGE + 3],
    ids=["empty", "small", "over-one-read", "just-small", "big", "bigger"],
)
def test_messages_of_every_size_arrive_whole_and_in_order(size):
    a, b = socket.socketpair()
    with a, b:
        payloads = [bytes([i % 251]) * size for i in range(3)]
        sender = threading.Thread(
            target=lambda: [send_message(a, i + 1, [p[: size // 2], p[size // 2 :]]) for i, p in enumerate(payloads)]
        )
        sender.start()
        got = _read_all(MessageReader(), b, 3)
        sender.join()
    assert got == [(i + 1, p) for i, p in enumerate(payloads)]


def test_reader_reports_a_closed_peer():
    a, b = socket.socketpair()
    a.close()
    with b:
        assert MessageReader().read_from(b) is None


def test_progress_is_shared_between_mappings(tmp_path):
    path = str(tmp_path / "progress")
    worker, dispatcher = Progress(path, create=True), Progress(path)
    assert not dispatcher.read().running
    worker.begin(250)
    snap = dispatcher.read()
    assert snap.running and snap.started == 1 and snap.timeout_ms == 250 and snap.started_at > 0
    worker.set_timeout(10)
    assert dispatcher.read().timeout_ms == 10
    worker.end()
    assert not dispatcher.read().running and dispatcher.read().finished == 1
    worker.close()
    dispatcher.close()


def test_counters_are_shared_between_mappings(tmp_path):
    path = str(tmp_path / "counters")
    mine, theirs = Counters(path, create=True), Counters(path)
    assert theirs.read() == dict.fromkeys(Counters.NAMES, 0)
    mine.add("worker_deaths")
    mine.add("worker_deaths", 2)
    mine.set("reruns", 12345)
    assert theirs.read()["worker_deaths"] == 3 and theirs.read()["reruns"] == 12345
    mine.close()
    theirs.close()


def test_a_timeout_of_any_size_is_recorded_capped(tmp_path):
    path = str(tmp_path / "progress")
    worker, dispatcher = Progress(path, create=True), Progress(path)
    worker.begin(timeout_ms=1 << 64)  # from a hostile {info, timeout, ...}: must not raise
    assert dispatcher.read().timeout_ms == MAX_TIMEOUT_MS
    worker.set_timeout(1 << 70)
    assert dispatcher.read().timeout_ms == MAX_TIMEOUT_MS
    worker.close()
    dispatcher.close()


def test_progress_says_when_to_look_again(tmp_path):
    path = str(tmp_path / "progress")
    worker, dispatcher = Progress(path, create=True), Progress(path)
    assert dispatcher.wake_at(100.0) == 100.0 + LOOK_AGAIN_S  # nothing running: a call may start
    worker.begin(timeout_ms=250)
    started = dispatcher.read().started_at
    assert dispatcher.wake_at(1e9) == started + 0.25  # the running call's deadline
    worker.end()
    worker.begin(timeout_ms=0)
    assert dispatcher.wake_at(5.0) == 5.0 + LOOK_AGAIN_S  # no limit yet: resolving may set one
    worker.end()
    assert dispatcher.wake_at(5.0) == 5.0 + LOOK_AGAIN_S
    worker.close()
    dispatcher.close()
