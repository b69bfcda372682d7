import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolport.errors import FrameError
from poolport.framing import FrameBuffer, Oversized, frame, split_frames

PAYLOADS = [b"", b"a", b"hello world", bytes(range(256)) * 3]


def feed_all(buf: FrameBuffer, data: bytes, step: int | None = None) -> list:
    out = []
    step = step or max(1, len(data))
    for i in range(0, len(data), step):
        buf.feed(data[i : i + step])
        out += buf.drain()
    return out


@pytest.mark.parametrize("packet", [1, 2, 4])
@pytest.mark.parametrize("step", [None, 1, 7], ids=["whole", "byte-at-a-time", "7-bytes"])
def test_frames_come_out_whole_with_their_header(packet, step):
    payloads = [p[: (1 << (8 * packet)) - 1] for p in PAYLOADS]
    wire = b"".join(frame(p, packet) for p in payloads)
    out = feed_all(FrameBuffer(packet), wire, step)
    assert out == [frame(p, packet) for p in payloads]


def test_partial_frame_waits_and_trailing_bytes_stay():
    buf = FrameBuffer(2)
    buf.feed(frame(b"abc", 2) + b"\x00\x05ab")
    assert buf.drain() == [b"\x00\x03abc"]
    assert len(buf) == 4
    assert buf.wanted() == 3
    buf.feed(b"cde")
    assert buf.drain() == [b"\x00\x05abcde"]


@pytest.mark.parametrize("step", [None, 1, 3])
def test_oversized_frame_is_skipped_and_stream_stays_in_sync(step):
    wire = frame(b"ok", 4) + frame(b"x" * 100, 4) + frame(b"after", 4)
    out = feed_all(FrameBuffer(4, max_frame=10), wire, step)
    assert out == [frame(b"ok", 4), Oversized(100), frame(b"after", 4)]


def test_oversized_frame_is_never_buffered():
    buf = FrameBuffer(4, max_frame=10)
    buf.feed((1 << 30).to_bytes(4, "big") + b"y" * 1000)
    assert buf.drain() == []
    assert len(buf) == 0


def test_bad_packet_size_and_too_big_payload():
    with pytest.raises(FrameError):
        FrameBuffer(3)
    with pytest.raises(FrameError, match="does not fit"):
        frame(b"x" * 256, 1)


def test_split_frames():
    data = frame(b"a") + frame(b"") + frame(b"bc")
    assert [bytes(p) for p in split_frames(data)] == [b"a", b"", b"bc"]
    with pytest.raises(FrameError, match="claims 9 bytes"):
        split_frames(b"\x00\x00\x00\x09abc")


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50), st.sampled_from([2, 4]))
def test_any_split_of_the_stream_gives_the_same_frames(payloads, step, packet):
    wire = b"".join(frame(p, packet) for p in payloads)
    assert feed_all(FrameBuffer(packet), wire, step) == [frame(p, packet) for p in payloads]
