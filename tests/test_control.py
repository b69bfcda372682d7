"""The reserved '$poolport' operations: found in a segment without decoding it, cut out in order,
read; reload tickets."""

from poolport.codec import etf
from poolport.protocol.control import Control, Tickets, find, parse, split
from poolport.protocol.framing import FrameBuffer, Segment, frame
from poolport.codec.terms import Atom


def request(module, function, *args, kind="call"):
    return frame(etf.encode((Atom(kind), Atom(module), Atom(function), list(args))))


INFO = frame(etf.encode((Atom("info"), Atom("timeout"), [(Atom("ms"), 100)])))


def segment_of(*frames: bytes) -> Segment:
    buf = FrameBuffer(4, 1 << 20, attach=lambda d, s, e: d[s + 1 : s + 3] == b"h\x03")
    buf.feed(b"".join(frames))
    (seg,) = buf.segments()
    return seg


def test_a_segment_without_the_marker_has_no_operation():
    seg = segment_of(request("m", "f", 1), request("m", "g"))
    assert find(seg, 4) == []


def test_operations_are_cut_out_in_place_with_their_info_packets():
    frames = [
        request("m", "f", b"$poolport"),  # the marker in a user's payload: an ordinary call
        request("$poolport", "info"),  # answered by a worker, like any call
        INFO + request("$poolport", "stats"),
        request("m", "g"),
        request("$poolport", "resize", 3),
        request("$poolport", "reload", kind="cast"),
    ]
    seg = segment_of(*frames)
    hits = find(seg, 4)
    assert hits == [2, 4, 5]
    pieces = list(split(seg, hits))
    kinds = [type(p).__name__ for p in pieces]
    assert kinds == ["Segment", "bytes", "Segment", "bytes", "bytes"]
    assert pieces[0].items() == frames[:2]  # order and content kept
    assert pieces[1] == frames[2] and pieces[2].items() == [frames[3]]
    assert parse(pieces[1], 4) == Control("call", "stats", [])
    assert parse(pieces[3], 4) == Control("call", "resize", [3])
    assert parse(pieces[4], 4) == Control("cast", "reload", [])


def test_an_unreadable_or_huge_operation_has_no_arguments():
    huge = request("$poolport", "resize", b"x" * 10000)
    assert parse(huge, 4) == Control("call", "resize", None)
    bad_args = frame(etf.encode((Atom("call"), Atom("$poolport"), Atom("stats"), Atom("notalist"))))
    assert parse(bad_args, 4).args is None


def test_a_ticket_is_served_by_a_reload_that_starts_after_it():
    t = Tickets()
    assert t.status(1) == "unknown" and not t.due()
    first = t.request()
    assert first == 1 and t.request() == 1 and t.due()  # two asks before it starts: one reload
    assert t.status(1) == "running"
    assert t.start() == 1 and not t.due()
    second = t.request()  # asked while 1 runs: 1 may have read the files already
    assert second == 2 and t.status(2) == "running" and not t.due()
    t.finish(None)
    assert t.status(1) == "ok" and t.due() and t.status(2) == "running"
    assert t.start() == 2
    t.finish("Traceback ...")
    assert t.status(2) == ("error", "Traceback ...") and t.status(3) == "unknown"
    for _ in range(100):
        t.request()
        t.start()
        t.finish(None)
    assert t.status(1) == "unknown" and len(t.results) <= 64  # bounded
