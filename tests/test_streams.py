"""Streams end to end: a real ``poolport serve`` driven over pipes with the raw frames of the
README's protocol section (``{stream, ...}``, ``stream_item``, ``stream_credit``, ...)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from poolport.codec import etf
from poolport.protocol import streams
from poolport.protocol.framing import frame
from portclient import ROOT, A, PortClient, call

pytestmark = [pytest.mark.e2e]

FIXTURES = str(ROOT / "erlang" / "test" / "fixtures")
STREAM, ITEM, END, FAIL, REPLY, ERROR = (
    A(a) for a in ("stream", "stream_item", "stream_end", "stream_error", "reply", "error")
)


def pool(*flags: str, workers: int = 2) -> PortClient:
    return PortClient(
        "--workers", str(workers), "--python-path", FIXTURES, "-m", "pp_streams", "-m", "pp_handlers", *flags
    )


def stream(function: str, *args, window: int = 64, idle_ms: int | None = None) -> tuple:
    options = [(A("window"), window)] + ([(A("idle_ms"), idle_ms)] if idle_ms else [])
    return (STREAM, A("pp_streams"), A(function), list(args), options)


def credit(sid: int, n: int) -> tuple:
    return (A("stream_credit"), sid, n)


def cancel(sid: int) -> tuple:
    return (A("stream_cancel"), sid)


def drain(client: PortClient, sid: int, credit_every: int = 0) -> tuple[list, tuple]:
    """Items of stream ``sid`` up to its last frame (granting credit as they are taken)."""
    items, taken = [], 0
    while True:
        term = client.recv(120)
        assert term[:2] in ((ITEM, sid), (END, sid), (FAIL, sid)), term
        if term[0] != ITEM:
            return items, term
        items.append(term[2])
        taken += 1
        if credit_every and taken == credit_every:
            client.send(credit(sid, taken))
            taken = 0


@pytest.fixture
def server():
    with pool() as client:
        yield client


def test_a_stream_starts_in_its_place_then_its_items_follow_in_order(server):
    assert server.request(stream("count", 5)) == (STREAM, 0)
    assert drain(server, 0) == ([0, 1, 2, 3, 4], (END, 0))
    assert server.request(stream("rows", 2)) == (STREAM, 1)  # any iterable
    assert drain(server, 1) == ([{b"row": 0}, {b"row": 1}], (END, 1))  # str goes out as a binary


def test_a_stream_behind_a_slow_call_never_shows_an_item_before_its_start(server):
    server.send(call("pp_handlers", "sleep_ms", 500, 1), stream("count", 3))
    assert server.recv() == (REPLY, 1)
    assert server.recv() == (STREAM, 1)
    assert drain(server, 1) == ([0, 1, 2], (END, 1))


def test_the_window_is_respected_until_credit_comes(server, tmp_path):
    produced = tmp_path / "produced"
    assert server.request(stream("counted", 100, str(produced), window=3)) == (STREAM, 0)
    assert [server.recv() for _ in range(3)] == [(ITEM, 0, i) for i in range(3)]
    assert server.request(call("pp_handlers", "echo", 7)) == (REPLY, 7)  # other calls go on meanwhile
    server.send(credit(0, 2))
    assert [server.recv() for _ in range(2)] == [(ITEM, 0, 3), (ITEM, 0, 4)]
    server.send(cancel(0))
    assert server.recv() == (END, 0)
    assert produced.read_text() == "5"  # never an item past the credit


def test_cancel_runs_the_generators_finally_and_frees_the_worker(tmp_path):
    marker = tmp_path / "closed"
    with pool(workers=1) as client:
        assert client.request(stream("guarded", 1000, str(marker), window=2)) == (STREAM, 0)
        assert [client.recv(), client.recv()] == [(ITEM, 0, 0), (ITEM, 0, 1)]
        client.send(call("pp_handlers", "echo", 1))  # waits: the only worker is streaming
        client.send(cancel(0))
        assert client.recv() == (END, 0)
        assert client.recv() == (REPLY, 1)
        assert marker.read_text() == "closed"


def test_errors_mid_stream_and_unencodable_items_end_the_stream_only(server):
    assert server.request(stream("fail_after", 2)) == (STREAM, 0)
    items, last = drain(server, 0)
    assert items == [0, 1]
    assert last[:2] == (FAIL, 0) and last[2][:3] == (A("user"), 0, b"ValueError")
    assert last[2][3] == b"failed after 2 items" and last[2][4]
    assert server.request(stream("unencodable", 1)) == (STREAM, 1)
    items, last = drain(server, 1)
    assert items == [0] and last[2][:3] == (A("user"), 0, b"EncodeError")
    assert server.request(call("pp_handlers", "echo", 3)) == (REPLY, 3)


def test_wrong_kinds_and_bad_options_are_answered_in_order(server):
    assert server.request(call("pp_streams", "count", 3))[1][:3] == (A("server"), 6, b"IsStream")
    assert server.request(stream("not_a_stream"))[1][:3] == (A("server"), 6, b"NotAStream")
    assert server.request(stream("count", 3, window=0))[1][:3] == (A("protocol"), 2, b"BadRequest")
    assert server.request((STREAM, A("os"), A("getcwd"), [], []))[1][:2] == (A("server"), 1)
    assert server.request(stream("count", 1)) == (STREAM, 4)
    assert drain(server, 4) == ([0], (END, 4))


def test_a_worker_crash_mid_stream_is_its_last_frame_and_the_pool_heals(server):
    for sid in range(3):
        first = server.request(stream("crash_after", 3))
        if first == (STREAM, sid):
            items, last = drain(server, sid)
            assert items == [0, 1, 2][: len(items)]
            assert last[:2] == (FAIL, sid) and last[2][:3] == (A("server"), 4, b"WorkerCrashed")
        else:  # the worker died before the dispatcher took its start reply: the call's own error
            assert first[1][:3] == (A("server"), 4, b"WorkerCrashed")
    assert [server.request(call("pp_handlers", "twice", i)) for i in range(4)] == [(REPLY, 2 * i) for i in range(4)]
    assert server.request(stream("count", 2)) == (STREAM, 7)
    assert drain(server, 7) == ([0, 1], (END, 7))


def test_a_worker_killed_while_it_waits_for_credit():
    with pool(workers=1) as client:
        pid = client.request(call("$poolport", "info"))[1][A("worker_pid")]
        assert client.request(stream("forever", window=2)) == (STREAM, 1)
        assert [client.recv(), client.recv()] == [(ITEM, 1, 0), (ITEM, 1, 1)]
        os.kill(pid, signal.SIGKILL)
        last = client.recv()
        assert last[:2] == (FAIL, 1) and last[2][:3] == (A("server"), 4, b"WorkerCrashed")
        client.send(cancel(1), credit(1, 5))  # too late: ignored, and no sequence number taken
        assert client.request(call("pp_handlers", "echo", 9)) == (REPLY, 9)
        assert client.request(stream("count", 1)) == (STREAM, 3)


def test_the_timeout_applies_per_item():
    with pool() as client:
        client.send((A("info"), A("timeout"), [(A("ms"), 1500)]), stream("slow", 3, 200))
        assert client.recv() == (STREAM, 0)  # 3 items of 200 ms: over 1500 ms in all, not each
        assert drain(client, 0) == ([0, 1, 2], (END, 0))
        client.send((A("info"), A("timeout"), [(A("ms"), 300)]), stream("slow", 3, 5000))
        assert client.recv() == (STREAM, 1)
        items, last = drain(client, 1)
        assert items == [] and last[2][:3] == (A("server"), 3, b"Timeout")
        assert client.request(call("pp_handlers", "echo", 1)) == (REPLY, 1)


def test_a_consumer_that_never_pulls_is_cut_off_after_idle_ms(tmp_path):
    marker = tmp_path / "closed"
    with pool(workers=1) as client:
        assert client.request(stream("guarded", 100, str(marker), window=2, idle_ms=200)) == (STREAM, 0)
        items, last = drain(client, 0)
        assert items == [0, 1] and last[2][:3] == (A("server"), 3, b"Timeout")
        assert b"idle_ms" in last[2][3]
        assert marker.read_text() == "closed"
        assert client.request(call("pp_handlers", "echo", 1)) == (REPLY, 1)


def test_tagged_replies_tag_every_stream_frame_with_its_stream():
    with pool("--reply-tags") as client:
        client.send(call("pp_handlers", "echo", 1), stream("count", 2), call("pp_handlers", "echo", 2))
        frames = [client.recv_frame() for _ in range(6)]
        tagged = [(int.from_bytes(f[:8], "big"), etf.decode(f[8:])) for f in frames]
        assert (0, (REPLY, 1)) in tagged and (2, (REPLY, 2)) in tagged
        own = [t for t in tagged if t[0] == 1]
        assert own == [(1, (STREAM, 1)), (1, (ITEM, 1, 0)), (1, (ITEM, 1, 1)), (1, (END, 1))]
        assert tagged.index((0, (REPLY, 1))) < tagged.index((1, (STREAM, 1))) < tagged.index((2, (REPLY, 2)))


def test_a_client_that_never_streams_never_sees_a_stream_frame(server):
    replies = [server.request(call("pp_handlers", "echo", b"stream_credit")) for _ in range(3)]
    assert replies == [(REPLY, b"stream_credit")] * 3


@pytest.mark.slow
def test_100000_small_items_with_calls_interleaved(server):
    assert server.request(stream("count", 100_000, window=500)) == (STREAM, 0)
    items, taken, calls, seq = [], 0, 0, 1
    while True:
        term = server.recv(120)
        if term[0] == REPLY:
            assert term == (REPLY, calls)
            calls += 1
            continue
        if term[0] == END:
            break
        assert term[:2] == (ITEM, 0)
        items.append(term[2])
        taken += 1
        if taken == 250:
            server.send(credit(0, taken), call("pp_handlers", "echo", seq - 1))
            seq += 1
            taken = 0
    while calls < seq - 1:
        assert server.recv() == (REPLY, calls)
        calls += 1
    assert items == list(range(100_000))


@pytest.mark.slow
def test_200_items_of_1_mb(server):
    assert server.request(stream("blobs", 200, 1 << 20, window=8)) == (STREAM, 0)
    items, last = drain(server, 0, credit_every=4)
    assert last == (END, 0)
    assert [int.from_bytes(b[:4], "big") for b in items] == list(range(200))
    assert {len(b) for b in items} == {1 << 20}


def test_control_frames_are_recognised_without_decoding_anything_else():
    payload = etf.encode(credit(5, 3))
    assert streams.is_control(payload, 0, len(payload))
    assert streams.parse_control(etf.decode(payload)) == (5, 3)
    assert streams.parse_control(etf.decode(etf.encode(cancel(5)))) == (5, streams.CANCEL_CREDIT)
    assert streams.parse_control(etf.decode(etf.encode(credit(5, 0)))) is None
    request = etf.encode(stream("count", 1))
    assert streams.is_stream_request(request, 0, len(request))
    assert not streams.is_control(request, 0, len(request))
    data = frame(etf.encode((A("info"), A("timeout"), 5))) + frame(request)
    assert streams.item_kinds(data, [0, len(data)], 0, 1, 4, streams.is_stream_request) == [0]


def test_held_frames_leave_once_their_start_has(tmp_path: Path):
    held = streams.Held()
    held.add(5, b"a")
    held.add(3, b"b")
    held.add(5, b"c")
    assert held.ready(4) == [b"b"] and held.size == 2
    assert held.ready(6) == [b"a", b"c"] and not held and held.size == 0


def test_cancel_at_any_point_ends_the_stream_once_and_in_order(server):
    """Cancel after 0..n items taken, with credit sent or not: the items before the end are a
    prefix of the stream, the end comes once, and the next request is answered in its place."""
    sid = 0
    for taken in (0, 1, 2, 3, 5, 8, 13):
        for grant in (False, True):
            server.send(stream("count", 20, window=4))
            assert server.recv() == (STREAM, sid)
            items = [server.recv()[2] for _ in range(min(taken, 4))]
            if grant:
                server.send(credit(sid, 2))
            server.send(cancel(sid), call("pp_handlers", "echo", sid))
            rest, last = [], None
            reply = None
            while last is None or reply is None:
                term = server.recv()
                if term[0] == REPLY:
                    reply = term
                elif term[0] == END:
                    assert last is None
                    last = term
                else:
                    assert term[:2] == (ITEM, sid) and last is None
                    rest.append(term[2])
            assert last == (END, sid) and reply == (REPLY, sid)
            assert items + rest == list(range(len(items) + len(rest)))
            assert len(items) + len(rest) <= 4 + (2 if grant else 0)
            sid += 2
