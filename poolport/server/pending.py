"""Sans-IO queue of request items waiting for a worker.

Each stdin read yields one :class:`~poolport.protocol.framing.Segment`, often only a
few frames when the Erlang side writes one request at a time. A run sent to a
worker must not be capped by how the bytes happened to arrive, so
:func:`take_head` merges consecutive entries into one before a run is cut.
"""

from __future__ import annotations

from collections import deque

from poolport.protocol.framing import Segment


class Pending:
    """Items not yet sent: ``segment`` items from index ``pos`` on, the first numbered ``seq``;
    ``strikes``: what the worker deaths they went through count against them (see ledger);
    ``since``: when they were admitted (0: not known, e.g. re-queued after a worker died)."""

    __slots__ = ("segment", "pos", "seq", "strikes", "since")

    def __init__(self, segment: Segment, seq: int, pos: int = 0, strikes: int = 0, since: float = 0.0) -> None:
        self.segment, self.seq, self.pos, self.strikes, self.since = segment, seq, pos, strikes, since

    def __len__(self) -> int:
        return len(self.segment.bounds) - 1 - self.pos


def take_head(queue: deque[Pending], size: int) -> Pending:
    """The queue's first entry, holding at least ``size`` items if the queue has them.

    Following entries are merged into it (their bytes copied once into a new
    segment) while their sequence numbers continue the head's; an oversized
    frame or a re-queued call leaves a gap, and merging stops there, as it does between
    entries with different ``strikes``.
    """
    head = queue[0]
    if len(head) >= size or len(queue) == 1 or queue[1].seq != head.seq + len(head) or queue[1].strikes != head.strikes:
        return head
    queue.popleft()
    seg, i = head.segment, head.pos
    start = seg.bounds[i]
    parts = [seg.data[start : seg.bounds[-1]]]
    bounds = [b - start for b in seg.bounds[i:]]
    while (
        queue
        and len(bounds) - 1 < size
        and queue[0].seq == head.seq + len(bounds) - 1
        and queue[0].strikes == head.strikes
    ):
        nxt = queue.popleft()
        nb = nxt.segment.bounds
        shift = bounds[-1] - nb[nxt.pos]
        bounds.extend([b + shift for b in nb[nxt.pos + 1 :]])
        parts.append(nxt.segment.data[nb[nxt.pos] : nb[-1]])
    merged = Pending(Segment(b"".join(parts), bounds), head.seq, strikes=head.strikes, since=head.since)
    queue.appendleft(merged)
    return merged
