"""The ledger's promises, attacked by a model: fake workers take runs, answer them in chunks of
any size, and die at any instant (running a call or between calls), and slots come and go
(resize, reload), in every order hypothesis finds. Whatever happens, every request gets exactly
one reply, released in request order, no request is handed to workers more than MAX_STRIKES
times, and nothing is held once all is done.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from poolport.protocol.framing import Segment, frame
from poolport.server.ledger import MAX_STRIKES, Ledger

SLOTS = 3


def segment(first: int, count: int) -> Segment:
    """``count`` request frames whose payloads name their sequence numbers."""
    frames = [frame(b"q%d" % seq) for seq in range(first, first + count)]
    bounds = [0]
    for f in frames:
        bounds.append(bounds[-1] + len(f))
    return Segment(b"".join(frames), bounds)


def requests_of(run) -> list[int]:
    """What a worker reads in a run: the sequence numbers in its request frames."""
    return [int(bytes(run.data[run.bounds[k] + 4 : run.bounds[k + 1]])[1:]) for k in range(run.count)]


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(SLOTS)
        self.out = bytearray()
        self.handed = Counter()  # seq -> times sent to a worker
        self.running_at_death: set[int] = set()
        self.next_slot = SLOTS

    def slot(self, pick: int) -> int:
        ids = sorted(self.ledger.runs)
        return ids[pick % len(ids)]

    @rule()
    def add_slot(self) -> None:
        self.ledger.add_slot(self.next_slot)
        assert not self.ledger.runs[self.next_slot] and self.ledger.sent[self.next_slot] == 0
        self.next_slot += 1

    @rule(pick=st.integers(0, 99))
    def remove_slot(self, pick: int) -> None:
        """A retired slot goes once it owes nothing; one that owes runs is refused."""
        slot = self.slot(pick)
        if len(self.ledger.runs) == 1:
            return
        if self.ledger.runs[slot]:
            with pytest.raises(ValueError):
                self.ledger.remove_slot(slot)
        else:
            self.ledger.remove_slot(slot)
            assert slot not in self.ledger.runs and slot not in self.ledger.sent

    @rule(count=st.integers(1, 6))
    def admit(self, count: int) -> None:
        self.ledger.admit(segment(self.ledger.next_seq, count))

    @rule()
    def oversized(self) -> None:
        seq = self.ledger.next_seq
        assert self.ledger.answer_now(b"o%d;" % seq) == seq

    @rule(
        pick=st.integers(0, 99),
        size=st.integers(1, 8),
        max_bytes=st.integers(1, 64),
        strict=st.booleans(),
        cut_after=st.none() | st.integers(0, 8),
    )
    def take_run(self, pick: int, size: int, max_bytes: int, strict: bool, cut_after: int | None) -> None:
        """``cut_after``: a scheduler that ends the run after that many requests (0: none now)."""
        slot = self.slot(pick)
        if len(self.ledger.runs[slot]) >= 2:
            return
        limits: list[int] = []

        def cut(data: bytes, bounds: list[int], i: int, j: int) -> tuple[int, str]:
            assert cut_after is not None
            limits.append(j - i)
            return min(i + cut_after, j), "note"

        run = self.ledger.take_run(slot, size, max_bytes, 0.0, strict, cut=None if cut_after is None else cut)
        if run is None:
            return
        got = requests_of(run)
        assert got == list(range(run.start, run.start + run.count))  # a run is consecutive requests
        assert 1 <= run.count <= size
        if cut_after is not None:
            assert run.count == min(cut_after, limits[0]) and run.note == "note"
        for seq in got:
            self.handed[seq] += 1
            assert self.handed[seq] <= MAX_STRIKES, f"request {seq} handed out {self.handed[seq]} times"
            assert self.ledger.index_of(slot, run.base + seq - run.start) == seq

    @rule(pick=st.integers(0, 99), data=st.data())
    def answer(self, pick: int, data: st.DataObject) -> None:
        slot = self.slot(pick)
        runs = self.ledger.runs[slot]
        if not runs:
            return
        run = runs[0]
        count = data.draw(st.integers(1, run.count - run.done))
        seqs = requests_of(run)[run.done : run.done + count]
        self.ledger.answered(slot, count, b"".join(b"r%d;" % s for s in seqs))

    @rule(pick=st.integers(0, 99), while_running=st.booleans())
    def die(self, pick: int, while_running: bool) -> None:
        slot = self.slot(pick)
        runs = self.ledger.runs[slot]
        running = None
        if while_running and runs:  # the call it was running: the first one not answered
            running = runs[0].base + runs[0].done
            self.running_at_death.add(runs[0].start + runs[0].done)
        self.ledger.lost(slot, running, lambda seq, why: b"e%d;" % seq)
        assert not self.ledger.runs[slot] and self.ledger.sent[slot] == 0

    @rule()
    def release(self) -> None:
        for chunk in self.ledger.release():
            self.out += chunk

    @invariant()
    def replies_are_exactly_once_and_in_order(self) -> None:
        tokens = bytes(self.out).split(b";")[:-1]
        assert [int(t[1:]) for t in tokens] == list(range(len(tokens)))
        assert len(tokens) == self.ledger.reorder.next_seq
        for t in tokens:
            seq = int(t[1:])
            if t[:1] == b"e":  # an error only for a call that was running, or re-run already
                assert seq in self.running_at_death or self.handed[seq] >= 2

    @invariant()
    def every_request_is_in_exactly_one_place(self) -> None:
        ledger = self.ledger
        queued = sum(len(p) for p in ledger.pending)
        in_runs = sum(r.count - r.done for runs in ledger.runs.values() for r in runs)
        answered = sum(count for count, _ in ledger.reorder._chunks.values())
        assert queued == ledger.queued
        assert queued + in_runs + answered == ledger.in_flight
        assert ledger.queued_bytes == sum(p.segment.bounds[-1] - p.segment.bounds[p.pos] for p in ledger.pending)
        assert ledger.run_bytes == sum(r.size for runs in ledger.runs.values() for r in runs)
        assert ledger.reply_bytes == sum(len(d) for _, d in ledger.reorder._chunks.values())

    @rule()
    def drain(self) -> None:
        """Healthy workers finish everything: all admitted requests are answered, nothing held."""
        ledger = self.ledger
        while ledger.pending or any(ledger.runs.values()):
            for slot in list(ledger.runs):
                if ledger.pending and len(ledger.runs[slot]) < 2:
                    ledger.take_run(slot, 4, 1 << 20, 0.0)
                if ledger.runs[slot]:
                    run = ledger.runs[slot][0]
                    seqs = requests_of(run)[run.done :]
                    ledger.answered(slot, len(seqs), b"".join(b"r%d;" % s for s in seqs))
        self.release()
        assert ledger.in_flight == 0 and ledger.held_bytes == 0


LedgerMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=60, deadline=None, suppress_health_check=list(HealthCheck)
)
test_ledger_model = LedgerMachine.TestCase


def blame(seq: int, why: str) -> bytes:
    return b"e%d:%s;" % (seq, why.encode())


def test_the_call_a_worker_was_running_is_blamed_and_its_bystanders_rerun():
    ledger = Ledger(2)
    ledger.admit(segment(0, 5))
    run = ledger.take_run(0, 5, 1 << 20, 0.0)
    assert run is not None and run.count == 5
    ledger.answered(0, 1, b"r0;")
    assert ledger.lost(0, 2, blame) == 3  # 2 was running: blamed; 1, 3, 4 re-queued
    rerun = ledger.take_run(1, 5, 1 << 20, 0.0)
    assert rerun is not None and requests_of(rerun) == [1]  # the stretch before the culprit ...
    rerun2 = ledger.take_run(1, 5, 1 << 20, 0.0)
    assert rerun2 is not None and requests_of(rerun2) == [3, 4]  # ... and after it: not merged over the gap
    ledger.answered(1, 1, b"r1;")
    ledger.answered(1, 2, b"r3;r4;")
    assert b"".join(ledger.release()) == b"r0;r1;e2:running;r3;r4;"
    assert ledger.abandoned == 0 and ledger.reruns == 3


def test_requests_held_through_two_unblamed_deaths_are_answered_not_rerun():
    """A worker that dies between calls (no call to blame) makes every request it held a
    suspect: a second such death answers them instead of handing them out again."""
    ledger = Ledger(2)
    ledger.admit(segment(0, 3))
    ledger.take_run(0, 3, 1 << 20, 0.0)
    assert ledger.lost(0, None, blame) == 3
    ledger.take_run(1, 3, 1 << 20, 0.0)
    assert ledger.lost(1, None, blame) == 0
    assert b"".join(ledger.release()) == b"e0:again;e1:again;e2:again;"
    assert ledger.abandoned == 3 and ledger.reruns == 3


def test_a_bystander_is_rerun_at_most_three_times():
    """Each time, another call is blamed for the death (say a poison call that ran after it was
    cut from the run): the innocent request goes back, but not forever."""
    ledger = Ledger(1)
    ledger.admit(segment(0, 1))
    handed = 0
    while ledger.queued:
        run = ledger.take_run(0, 1, 1 << 20, 0.0)
        handed += 1
        ledger.lost(0, run.base + 1, blame)  # the call after it was running: it is a bystander
    assert handed == MAX_STRIKES
    assert b"".join(ledger.release()) == b"e0:again;"


def test_a_second_reply_for_a_request_is_refused_loudly():
    ledger = Ledger(1)
    ledger.admit(segment(0, 2))
    ledger.take_run(0, 2, 1 << 20, 0.0)
    ledger.answered(0, 2, b"r0;r1;")
    try:
        ledger.answered(0, 1, b"r1;")
    except ValueError as exc:
        assert "owes 0" in str(exc)
    else:
        raise AssertionError("a chunk nobody waited for was accepted")


def test_holds_head_names_the_worker_owing_the_next_reply():
    ledger = Ledger(2)
    ledger.admit(segment(0, 4))
    ledger.take_run(0, 1, 1 << 20, 0.0)  # seq 0: slow call on slot 0
    ledger.take_run(1, 3, 1 << 20, 0.0)  # seqs 1-3 on slot 1
    assert ledger.holds_head(0) and not ledger.holds_head(1)
    ledger.answered(1, 3, b"r1;r2;r3;")
    assert ledger.release() == []  # held behind the slow call
    ledger.answered(0, 1, b"r0;")
    assert b"".join(ledger.release()) == b"r0;r1;r2;r3;"


def test_a_slot_is_added_empty_and_removed_only_once_it_owes_nothing():
    ledger = Ledger(1)
    ledger.add_slot(7)
    with pytest.raises(ValueError):
        ledger.add_slot(7)
    ledger.admit(segment(0, 3))
    run = ledger.take_run(7, 3, 1 << 20, 0.0)
    assert run is not None and run.count == 3
    with pytest.raises(ValueError, match="owes 1 run"):
        ledger.remove_slot(7)
    assert ledger.item(7, 1) == frame(b"q1")
    ledger.answered(7, 3, b"r0;r1;r2;")
    ledger.remove_slot(7)
    assert list(ledger.runs) == [0] and list(ledger.sent) == [0]
    assert ledger.release() == [b"r0;r1;r2;"]


def test_a_run_knows_how_long_its_first_request_waited():
    ledger = Ledger(1)
    ledger.admit(segment(0, 2), now=10.0)
    ledger.admit(segment(2, 1), now=11.0)
    run = ledger.take_run(0, 3, 1 << 20, 12.5)
    assert run is not None and run.count == 3 and run.waited == 2.5  # merged: the oldest counts
    ledger.lost(0, None, blame)  # re-queued: how long it waited before is not known any more
    assert ledger.take_run(0, 3, 1 << 20, 20.0).waited == 0.0


def test_a_stream_request_goes_alone_and_only_to_a_slot_holding_no_run():
    """``find_stream`` marks stream requests: a run stops before one, and one is a run of its own,
    never queued behind another run (its worker serves nothing else while it is open)."""
    ledger = Ledger(2)
    ledger.admit(segment(0, 6))
    streams = {2, 3}

    def find(data: bytes, bounds: list[int], i: int, j: int) -> int | None:
        return next((k for k in range(i, j) if int(data[bounds[k] + 5 : bounds[k + 1]]) in streams), None)

    first = ledger.take_run(0, 6, 1 << 20, 0.0, find_stream=find)
    assert first is not None and requests_of(first) == [0, 1] and not first.stream
    assert ledger.take_run(0, 6, 1 << 20, 0.0, find_stream=find) is None  # slot 0 holds a run
    assert ledger.take_run(1, 6, 1 << 20, 0.0, strict=True, find_stream=find) is None  # a busy slot
    alone = ledger.take_run(1, 6, 1 << 20, 0.0, find_stream=find)
    assert alone is not None and requests_of(alone) == [2] and alone.stream
    ledger.answered(0, 2, b"r0;r1;")
    second = ledger.take_run(0, 6, 1 << 20, 0.0, find_stream=find)
    assert second is not None and requests_of(second) == [3] and second.stream
    ledger.answered(1, 1, b"s2;")
    rest = ledger.take_run(1, 6, 1 << 20, 0.0, find_stream=find)
    assert rest is not None and requests_of(rest) == [4, 5] and not rest.stream
