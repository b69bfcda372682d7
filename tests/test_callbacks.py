"""Callbacks end to end over raw frames: a handler's ``poolport.erlang.call`` reaches the port as
``{callback, ...}`` and its ``{callback_reply, ...}`` goes back to that worker only."""

from __future__ import annotations

import pytest

from poolport import ErlangError, erlang
from poolport.protocol import callbacks
from poolport.codec import etf
from portclient import ROOT, A, PortClient, call

FIXTURES = str(ROOT / "erlang" / "test" / "fixtures")
REPLY, CALLBACK = A("reply"), A("callback")


def reply(request: tuple, answer) -> tuple:
    return (A("callback_reply"), request[1], request[2], answer)


@pytest.mark.e2e
def test_a_callback_goes_out_and_its_reply_comes_back_to_its_worker():
    with PortClient("--workers", "2", "--python-path", FIXTURES, "-m", "pp_callbacks", "-m", "pp_handlers") as client:
        client.send(
            call("pp_handlers", "echo", 1), call("pp_callbacks", "lookup", A("t"), 7), call("pp_handlers", "echo", 2)
        )
        frames = [client.recv() for _ in range(2)]
        request = next(f for f in frames if f[0] == CALLBACK)
        assert request[3:] == (A("call"), A("ets"), A("lookup"), [A("t"), 7], callbacks.DEFAULT_TIMEOUT_MS)
        assert (REPLY, 1) in frames
        client.send(reply((None, request[1] + 1, request[2]), (A("ok"), "not mine")))  # no such worker: dropped
        client.send(reply(request, (A("ok"), [(7, 49)])))
        assert client.recv() == (REPLY, [(7, 49)])  # the callback's call, in its place
        assert client.recv() == (REPLY, 2)
        assert client.request(call("pp_handlers", "echo", 3)) == (REPLY, 3)  # no number was taken


@pytest.mark.e2e
def test_an_error_reply_is_raised_as_erlang_error_and_a_cast_waits_for_its_receipt():
    with PortClient("--workers", "1", "--python-path", FIXTURES, "-m", "pp_callbacks") as client:
        client.send(call("pp_callbacks", "failing"))
        request = client.recv()
        client.send(reply(request, (A("error"), A("error"), b"boom", b"[{m,f,1}]")))
        assert client.recv() == (REPLY, [b"error", b"boom", True])
        client.send(call("pp_callbacks", "notify", 1, A("hi")))
        request = client.recv()
        assert request[3:6] == (A("cast"), A("erlang"), A("send"))
        client.send(reply(request, A("ok")))
        assert client.recv() == (REPLY, b"sent")


def test_outside_a_worker_there_is_no_erlang_node_to_call():
    with pytest.raises(ErlangError, match="inside a handler"):
        erlang.call("erlang", "node", [])


def test_a_reply_is_addressed_without_decoding_its_result():
    payload = etf.encode((A("callback_reply"), 70000, 5, (A("ok"), b"x" * 1000)))
    assert callbacks.is_reply(payload, 0, len(payload))
    assert callbacks.reply_target(payload, 0, len(payload)) == (70000, 5)
    assert callbacks.result(etf.decode(payload)) == b"x" * 1000
    with pytest.raises(ErlangError) as info:
        callbacks.result((A("callback_reply"), 1, 1, (A("error"), A("exit"), b"timeout", b"")))
    assert (info.value.erlang_class, info.value.reason) == ("exit", "timeout")
    assert callbacks.result((A("callback_reply"), 1, 1, A("ok"))) is None
