import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolport.errors import FrameError
from poolport.protocol.bert import is_info
from poolport.protocol.framing import MAX_ATTACHED, FrameBuffer, Oversized, frame

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


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50), st.sampled_from([2, 4]))
def test_any_split_of_the_stream_gives_the_same_frames(payloads, step, packet):
    wire = b"".join(frame(p, packet) for p in payloads)
    assert feed_all(FrameBuffer(packet), wire, step) == [frame(p, packet) for p in payloads]


def _attach_if_starts_with_i(data: bytes, start: int, end: int) -> bool:
    return data[start : start + 1] == b"i"


@pytest.mark.parametrize("step", [None, 1, 5])
def test_attached_frames_travel_with_the_next_frame(step):
    frames = [
        frame(b"ia", 2),
        frame(b"call1", 2),
        frame(b"call2", 2),
        frame(b"ib", 2),
        frame(b"ic", 2),
        frame(b"call3", 2),
        frame(b"id", 2),
    ]
    buf = FrameBuffer(2, attach=_attach_if_starts_with_i)
    items = feed_all(buf, b"".join(frames), step)
    assert items == [frames[0] + frames[1], frames[2], frames[3] + frames[4] + frames[5]]
    assert len(buf) == len(frames[6])  # a trailing info frame waits for its call
    buf.feed(frame(b"call4", 2))
    assert buf.drain() == [frames[6] + frame(b"call4", 2)]


def test_segments_share_one_buffer_and_know_their_bounds():
    buf = FrameBuffer(4)
    buf.feed(frame(b"a") + frame(b"bb") + frame(b"ccc")[:3])
    (seg,) = buf.segments()
    assert len(seg) == 2 and seg.bounds == [0, 5, 11]
    assert seg.items() == [frame(b"a"), frame(b"bb")]
    assert buf.wanted() == 1  # the rest of the next header


def test_big_frame_parts_are_joined_once_complete():
    buf = FrameBuffer(4)
    payload = bytes(range(256)) * 4000
    wire = frame(payload)
    for i in range(0, len(wire), 65536):
        buf.feed(wire[i : i + 65536])
        if i + 65536 < len(wire):
            assert buf.segments() == []
            assert buf.wanted() == len(wire) - min(len(wire), i + 65536)
    assert buf.drain() == [wire]


def test_info_frames_before_an_oversized_frame_are_dropped_with_it():
    buf = FrameBuffer(4, max_frame=10, attach=_attach_if_starts_with_i)
    buf.feed(frame(b"ia") + frame(b"x" * 50) + frame(b"ok"))
    assert buf.drain() == [Oversized(50), frame(b"ok")]


def test_info_frames_are_scanned_once_and_a_flood_keeps_only_the_latest():
    """15 MB of info packets before one call: each frame is looked at once (not once per read),
    and what waits for the call stays bounded (the latest info frames, not all of them)."""
    info = frame(b"\x83h\x03w\x04infow\x05cachejx" + bytes(130))
    call = frame(b"\x83h\x04w\x04call" + bytes(20))
    seen = []

    def attach(data: bytes, start: int, end: int) -> bool:
        seen.append(start)
        return is_info(data, start, end)

    fb = FrameBuffer(4, 1 << 20, attach=attach)
    floods = 15_000_000 // len(info)
    peak = 0
    for _ in range(floods):
        fb.feed(info)
        assert fb.segments() == []
        peak = max(peak, fb.held)
    fb.feed(call)
    (segment,) = fb.segments()
    assert len(seen) <= 2 * (floods + 1)  # every frame examined at most twice, not once per read
    assert peak <= MAX_ATTACHED + len(info) and fb.dropped > 0
    item = segment.items()[0]
    assert item.endswith(call) and item.startswith(info) and len(item) <= MAX_ATTACHED + len(info) + len(call)
    assert fb.held == 0 and len(fb) == 0


def test_last_frame_is_the_request_after_the_frames_that_travel_with_it():
    from poolport.protocol.framing import last_frame

    for packet in (1, 2, 4):
        info, call = b"\x83h\x03info...", b"\x83h\x04call..."
        item = frame(info, packet) + frame(info, packet) + frame(call, packet)
        start, end = last_frame(item, packet)
        assert item[start:end] == call
        padded = b"xx" + item + b"yy"
        assert padded[slice(*last_frame(padded, packet, 2, len(padded) - 2))] == call
        assert last_frame(frame(call, packet), packet) == (packet, packet + len(call))
