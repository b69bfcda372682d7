"""Sans-IO bookkeeping of every request between stdin and stdout: the one owner of reply order.

::

    admit ─▶ pending (queued) ─take_run─▶ runs[slot] (sent) ─answered─▶ reorder ─release─▶ stdout
                  ▲                              │
                  └──────── lost: re-queued ─────┤  (the rest of a dead worker's runs)
                         lost: error reply ◀─────┘  (the call it was running; a second death)

Every request gets a sequence number when its frame is complete. From then on
it is in exactly one place: queued, in a run sent to one slot, or answered (a
reply waiting in the reorder buffer or already released). Replies leave only
through :meth:`Ledger.release`, in sequence order, so exactly one reply per
request in request order is this module's invariant; the dispatcher around it
only moves bytes. ``ReorderBuffer.add`` refuses a second reply for any number,
so a bookkeeping error fails loudly instead of shifting the stream.

The poison-pill rule lives here too. The request a worker was running when it
died is answered with an error at once. The others it held are re-run, and
charged *strikes*: two when the death could not be blamed on a call (it
happened between calls, or while replies were being sent: any of them may
have caused it), one when another call was blamed (they are bystanders). A
request with ``MAX_STRIKES`` is answered with an error instead of being re-run,
so no request can keep killing workers: one that does it between calls is
answered after its second death, and a bystander is re-run at most three times.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from typing import Any, Callable

from poolport.protocol.framing import Segment
from poolport.server.pending import Pending, take_head
from poolport.server.reorder import Buffer, ReorderBuffer

MAX_STRIKES = 4  # a request with this many is answered with an error, not re-run again
SUSPECT = 2  # strikes for each request a worker held when it died and no call could be blamed
BYSTANDER = 1  # strikes for each request it held when the call it was running was blamed


class Run:
    """Requests ``start .. start + count - 1``, their frames in ``data``, sent to one slot.

    ``data[bounds[k]:bounds[k + 1]]`` is request ``start + k`` (its ``{info, ...}`` frames
    included); ``base`` is how many requests the slot's process had been sent before.
    """

    __slots__ = (
        "start",
        "data",
        "bounds",
        "count",
        "size",
        "done",
        "base",
        "sent_at",
        "strikes",
        "waited",
        "stream",
        "note",
    )

    def __init__(
        self, start: int, data: bytes, bounds: list[int], base: int, sent_at: float, strikes: int, waited: float = 0.0
    ) -> None:
        self.start, self.data, self.bounds = start, data, bounds
        self.count = len(bounds) - 1
        self.size = len(data)
        self.done = 0  # requests answered so far, in order
        self.base = base
        self.sent_at = sent_at
        self.strikes = strikes  # from the worker deaths these requests have been through
        self.waited = waited  # seconds its first request waited between admission and this run
        self.stream = False  # a stream request, alone in its run
        self.note: Any = None  # what ``cut`` said of it (the scheduler reads it back when answered)


FindStream = Callable[[bytes, list[int], int, int], "int | None"]
"""``find_stream(data, bounds, i, j)``: the index of the first stream request among items
``i .. j - 1``, or None."""

Cut = Callable[[bytes, list[int], int, int], "tuple[int, Any]"]
"""``cut(data, bounds, i, j)``: where a run of items ``i .. j - 1`` ends (``i < end <= j``, or
``i``: no run now), and a note kept as ``Run.note``."""

Blame = Callable[[int, str], bytes]
"""``blame(seq, why)``: the framed error reply for a request lost with its worker;
``why`` is ``"running"`` (the worker died or was killed during it) or ``"again"``
(its worker died a second time while it was queued there)."""


class Ledger:
    """Where every admitted request is, and the replies waiting for their turn.

    Slots are named by ids that are never reused (slots ``0 .. slots - 1`` at first);
    :meth:`add_slot` and :meth:`remove_slot` change the pool's size."""

    def __init__(self, slots: int) -> None:
        self.pending: deque[Pending] = deque()
        self.queued = 0  # requests in pending
        self.queued_bytes = 0
        self.runs: dict[int, deque[Run]] = {i: deque() for i in range(slots)}
        self.sent = dict.fromkeys(range(slots), 0)  # requests sent to each slot's current process
        self.run_bytes = 0
        self.reorder = ReorderBuffer()
        self.reply_bytes = 0
        self.next_seq = 0
        self.reruns = 0  # requests re-queued after their worker died
        self.abandoned = 0  # requests answered with an error after a second death

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet released to stdout."""
        return self.next_seq - self.reorder.next_seq

    @property
    def held_bytes(self) -> int:
        """Request and reply bytes held: what ``max_in_flight_bytes`` bounds."""
        return self.queued_bytes + self.run_bytes + self.reply_bytes

    # ------------------------------------------------------------------ slots

    def add_slot(self, slot: int) -> None:
        if slot in self.runs:
            raise ValueError(f"slot {slot} exists already")
        self.runs[slot] = deque()
        self.sent[slot] = 0

    def remove_slot(self, slot: int) -> None:
        """Forget a slot that owes nothing (its runs answered, or handed back by :meth:`lost`)."""
        if self.runs[slot]:
            raise ValueError(f"slot {slot} still owes {len(self.runs[slot])} run(s)")
        del self.runs[slot], self.sent[slot]

    # ------------------------------------------------------------------ in

    def admit(self, segment: Segment, now: float = 0.0) -> None:
        """Number the requests of a segment and queue them (``now``: when, for the queue wait)."""
        count = len(segment)
        self.pending.append(Pending(segment, self.next_seq, since=now))
        self.next_seq += count
        self.queued += count
        self.queued_bytes += segment.bounds[-1] - segment.bounds[0]

    def answer_now(self, reply: bytes) -> int:
        """Number a request that is answered without a worker (an oversized frame)."""
        seq = self.next_seq
        self.next_seq += 1
        self._add(seq, 1, reply)
        return seq

    # ------------------------------------------------------------------ to workers

    def take_run(
        self,
        slot: int,
        size: int,
        max_bytes: int,
        now: float,
        strict: bool = False,
        find_stream: FindStream | None = None,
        cut: Cut | None = None,
    ) -> Run | None:
        """Cut a run of up to ``size`` requests (at most ``max_bytes``, but always at least one,
        unless ``strict``: then ``None`` if the first request alone is over ``max_bytes``).

        With ``find_stream``, a stream request goes alone in its run (``Run.stream``), and only
        to a slot that holds no run (``strict`` is False): the worker serves nothing else
        while the stream is open, so nothing may wait behind it.

        With ``cut``, the run ends where it says within those limits (a stream request
        still goes alone); if it says ``i``, nothing is taken."""
        if not self.pending:
            return None
        head = take_head(self.pending, size)
        seg, i = head.segment, head.pos
        bounds = seg.bounds
        last = len(bounds) - 1
        j = min(i + size, last)
        stream = False
        if find_stream is not None:
            k = find_stream(seg.data, bounds, i, j)
            if k == i:
                if strict or self.runs[slot]:
                    return None
                j, stream = i + 1, True
            elif k is not None:
                j = k
        start = bounds[i]
        if bounds[j] - start > max_bytes:
            j = max(i + 1, bisect_right(bounds, start + max_bytes, i + 1, j) - 1)
            if bounds[j] - start > max_bytes and strict:
                return None
        note = None
        if cut is not None and not stream:
            end, note = cut(seg.data, bounds, i, j)
            if end <= i:
                return None
            if end > j:
                raise ValueError(f"cut past the run's limit: item {end} of {i} .. {j}")
            j = end
        run = Run(
            head.seq,
            seg.data[start : bounds[j]],
            [0, bounds[j] - start] if j == i + 1 else [b - start for b in bounds[i : j + 1]],
            self.sent[slot],
            now,
            head.strikes,
            now - head.since if head.since else 0.0,
        )
        run.stream, run.note = stream, note
        head.pos, head.seq = j, head.seq + run.count
        if j == last:
            self.pending.popleft()
        self.queued -= run.count
        self.queued_bytes -= run.size
        self.run_bytes += run.size
        self.sent[slot] += run.count
        self.runs[slot].append(run)
        return run

    # ------------------------------------------------------------------ from workers

    def answered(self, slot: int, count: int, data: Buffer) -> Run | None:
        """A chunk of ``count`` replies from ``slot``, answering its oldest unanswered requests.

        Returns the run if this chunk completed it. Raises ``ValueError`` for a chunk that
        answers more than the slot's current run holds (a worker that broke the link protocol).
        """
        runs = self.runs[slot]
        if not runs or count < 1 or count > runs[0].count - runs[0].done:
            raise ValueError(
                f"slot {slot} sent {count} replies; it owes "
                f"{runs[0].count - runs[0].done if runs else 0} in its current run"
            )
        run = runs[0]
        self._add(run.start + run.done, count, data)
        run.done += count
        if run.done < run.count:
            return None
        runs.popleft()
        self.run_bytes -= run.size
        return run

    def holds_head(self, slot: int) -> bool:
        """True if ``slot`` owes the reply that stdout waits for: its replies must be read."""
        seq = self.reorder.next_seq
        return any(run.start + run.done <= seq < run.start + run.count for run in self.runs[slot])

    def index_of(self, slot: int, index: int) -> int | None:
        """Sequence number of the ``index``-th request sent to the slot's current process."""
        for run in self.runs[slot]:
            if run.base <= index < run.base + run.count:
                return run.start + index - run.base
        return None

    def item(self, slot: int, index: int) -> bytes | None:
        """The bytes (frames with headers) of the ``index``-th request sent to the slot's process."""
        for run in self.runs[slot]:
            if run.base <= index < run.base + run.count:
                k = index - run.base
                return run.data[run.bounds[k] : run.bounds[k + 1]]
        return None

    def lost(self, slot: int, running: int | None, blame: Blame) -> int:
        """The slot's process is gone: answer the request it was running (its ``running``-th,
        if known) with ``blame``, re-queue the rest with their strikes, answer those that have
        ``MAX_STRIKES`` with ``blame``. Returns how many requests were re-queued."""
        requeue: list[Pending] = []
        charge = SUSPECT if running is None else BYSTANDER
        for run in self.runs[slot]:
            strikes = run.strikes + charge
            k = run.done
            while k < run.count:
                seq = run.start + k
                if run.base + k == running:
                    self._add(seq, 1, blame(seq, "running"))
                    k += 1
                elif strikes >= MAX_STRIKES:
                    self._add(seq, 1, blame(seq, "again"))
                    self.abandoned += 1
                    k += 1
                else:  # the longest stretch up to the running request goes back as one entry
                    end = run.count
                    if running is not None and run.base + k < running < run.base + run.count:
                        end = running - run.base
                    requeue.append(Pending(Segment(run.data, run.bounds[k : end + 1]), seq, strikes=strikes))
                    self.queued += end - k
                    self.queued_bytes += run.bounds[end] - run.bounds[k]
                    self.reruns += end - k
                    k = end
            self.run_bytes -= run.size
        self.runs[slot].clear()
        self.sent[slot] = 0
        self.pending.extendleft(reversed(requeue))
        return sum(len(p) for p in requeue)

    # ------------------------------------------------------------------ out

    def release(self) -> list[Buffer]:
        """Every reply chunk whose turn has come, in order."""
        ready = self.reorder.pop_ready()
        for data in ready:
            self.reply_bytes -= len(data)
        return ready

    def _add(self, seq: int, count: int, data: Buffer) -> None:
        self.reorder.add(seq, count, data)
        self.reply_bytes += len(data)
