"""The queue of waiting items: runs may span several stdin reads, never a gap in numbering."""

from collections import deque

from hypothesis import given, strategies as st

from poolport.protocol.framing import FrameBuffer, Segment, frame
from poolport.server.pending import Pending, take_head


def segment(*payloads: bytes, skip: bytes = b"") -> Segment:
    """A segment as FrameBuffer makes it; ``skip`` bytes before the first item (bounds not at 0)."""
    data = skip + b"".join(frame(p) for p in payloads)
    bounds, pos = [len(skip)], len(skip)
    for p in payloads:
        pos += 4 + len(p)
        bounds.append(pos)
    return Segment(data, bounds)


def items(p: Pending) -> list[bytes]:
    return p.segment.items()[p.pos :]


def test_head_is_returned_untouched_when_it_has_enough():
    first = Pending(segment(b"a", b"b", b"c"), 0)
    q = deque([first, Pending(segment(b"d"), 3)])
    assert take_head(q, 2) is first
    assert len(q) == 2


def test_consecutive_entries_merge_into_one_run():
    q = deque(
        [
            Pending(segment(b"a", b"b"), 10, pos=1),
            Pending(segment(b"c", skip=b"xyz"), 11),
            Pending(segment(b"d", b"e"), 12),
        ]
    )
    head = take_head(q, 100)
    assert head.seq == 10 and head.pos == 0
    assert items(head) == [frame(x) for x in (b"b", b"c", b"d", b"e")]
    assert list(q) == [head]


def test_merging_stops_at_size_and_keeps_the_rest_queued():
    q = deque([Pending(segment(b"a"), 0), Pending(segment(b"b"), 1), Pending(segment(b"c"), 2)])
    head = take_head(q, 2)
    assert items(head) == [frame(b"a"), frame(b"b")]
    assert [items(p) for p in q] == [[frame(b"a"), frame(b"b")], [frame(b"c")]]
    assert q[1].seq == 2


def test_a_gap_in_sequence_numbers_is_never_merged():
    # seq 1 went elsewhere (an oversized frame answered by the dispatcher, or a re-run)
    q = deque([Pending(segment(b"a"), 0), Pending(segment(b"c"), 2)])
    head = take_head(q, 10)
    assert items(head) == [frame(b"a")] and len(q) == 2


@given(st.lists(st.lists(st.binary(max_size=20), min_size=1, max_size=5), min_size=1, max_size=8), st.integers(1, 30))
def test_merged_items_equal_the_originals_in_order(reads, size):
    buf, q, seq, expected = FrameBuffer(4), deque(), 0, []
    for payloads in reads:
        buf.feed(b"".join(frame(p) for p in payloads))
        for seg in buf.segments():
            q.append(Pending(seg, seq))
            seq += len(seg)
        expected.extend(frame(p) for p in payloads)
    taken = []
    while q:
        head = take_head(q, size)
        assert len(head) >= min(size, sum(len(p) for p in q))
        n = min(size, len(head))
        taken.extend(items(head)[:n])
        head.pos += n
        head.seq += n
        if not len(head):
            q.popleft()
    assert taken == expected
