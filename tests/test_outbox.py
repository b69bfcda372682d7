"""Outbox: bytes for a non-blocking peer leave whole and in order, whatever the peer takes."""

from __future__ import annotations

import pytest

from poolport.server.outbox import Outbox


class Peer:
    """A non-blocking peer taking at most ``room`` bytes per write (0: would block)."""

    def __init__(self, room: int) -> None:
        self.room, self.got = room, bytearray()

    def _take(self, data: bytes) -> int:
        if self.room == 0:
            raise BlockingIOError
        n = min(self.room, len(data))
        self.got += data[:n]
        return n

    def write(self, data) -> int:
        return self._take(bytes(data))

    def writev(self, parts) -> int:
        return self._take(b"".join(bytes(p) for p in parts))


@pytest.mark.parametrize("room", [1, 3, 7, 1000])
def test_parts_leave_whole_and_in_order_however_little_the_peer_takes(room):
    out, peer = Outbox(), Peer(room)
    out.push(b"abc", b"", memoryview(b"defg"), bytearray(b"h"))
    assert out.size == 8
    while not out.flush(peer.writev):
        pass
    assert bytes(peer.got) == b"abcdefgh" and out.size == 0 and not out


def test_a_peer_that_takes_nothing_keeps_everything_waiting():
    out, peer = Outbox(), Peer(0)
    assert not out.write_now(b"abc", peer.write)
    assert not out.flush(peer.writev) and out.size == 3
    peer.room = 2
    assert out.write_now(b"de", peer.write) is False  # behind what waits: queued, not written
    while not out.flush(peer.writev):
        pass
    assert bytes(peer.got) == b"abcde"


def test_write_now_writes_at_once_and_keeps_the_rest():
    out, peer = Outbox(), Peer(4)
    assert out.write_now(b"abc", peer.write) and not out
    assert not out.write_now(b"defghi", peer.write) and out.size == 2
    assert out.flush(peer.writev) and bytes(peer.got) == b"abcdefghi"


def test_a_gone_peer_is_an_error_for_the_caller():
    def broken(_data) -> int:
        raise BrokenPipeError

    out = Outbox()
    with pytest.raises(BrokenPipeError):
        out.write_now(b"x", broken)
    out.push(b"y")
    with pytest.raises(BrokenPipeError):
        out.flush(broken)
