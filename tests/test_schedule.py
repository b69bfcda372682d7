"""Which worker gets the next run: one that is free, or will be within ``SHARE_MIN_S`` (cheap
work stays on as few workers as keep up), then the idle one most likely still awake, then the
least loaded."""

import pytest

from poolport.server.costs import PIPELINE_COST_S, SHARE_MIN_S, CostTable
from poolport.server.dispatcher import BUSY, FREE, IDLE, SOON, Slot, _load
from poolport.protocol.framing import Segment, frame
from poolport.server.ledger import Ledger
from poolport.server.progress import Progress
from portclient import PortClient, call

LEDGER = Ledger(3)
COSTS = CostTable()
TINY = ("m", "tiny")


@pytest.fixture(autouse=True)
def fresh_ledger():
    global LEDGER, COSTS
    LEDGER = Ledger(3)
    COSTS = CostTable()


def slot(tmp_path, index: int, idle_since: float = 0.0) -> Slot:
    s = Slot(index, str(tmp_path / f"progress-{index}"))
    s.progress = Progress(s.progress_path, create=True)
    s.idle_since = idle_since
    return s


def give_run(
    s: Slot, calls: int, seconds_each: float | None = None, fn: tuple[str, str] = TINY, at: float = 10.0
) -> None:
    """A run of ``calls`` calls of ``fn`` sent ``at``, known to cost ``seconds_each`` (None: never measured)."""
    f = frame(b"x")
    LEDGER.admit(Segment(f * calls, [k * len(f) for k in range(calls + 1)]))
    if seconds_each is not None:
        COSTS.learn([(fn, 1, 0.0)], seconds_each)
    LEDGER.take_run(s.index, calls, 1 << 20, at, cut=lambda d, b, i, j: (j, [(fn, j - i, seconds_each or 0.0)]))


def load(s: Slot, now: float = 10.0) -> tuple[int, float]:
    return _load(s, LEDGER, COSTS, now)


def answer(s: Slot, calls: int) -> None:
    for _ in range(calls):
        s.progress.begin()
        s.progress.end()


def test_fewer_unanswered_runs_first(tmp_path):
    idle, busy, busier = slot(tmp_path, 0), slot(tmp_path, 1), slot(tmp_path, 2)
    give_run(busy, 3)
    give_run(busier, 3)
    give_run(busier, 3)
    assert sorted([busier, busy, idle], key=load) == [idle, busy, busier]


def test_among_idle_workers_the_most_recently_active_first(tmp_path):
    old, recent = slot(tmp_path, 0, idle_since=1.0), slot(tmp_path, 1, idle_since=5.0)
    assert sorted([old, recent], key=load) == [recent, old]


def test_a_worker_that_answered_everything_counts_as_idle_and_hottest(tmp_path):
    # its replies went to the port, the report saying so is not read yet: it is still polling
    done, idle = slot(tmp_path, 0), slot(tmp_path, 1, idle_since=9.0)
    give_run(done, 2)
    answer(done, 1)
    assert load(done)[0] == BUSY  # one call still running (of a function never measured)
    answer(done, 1)
    assert load(done) == (FREE, -10.0)
    assert sorted([idle, done], key=load) == [done, idle]


def test_a_worker_done_within_share_min_s_goes_before_waking_an_idle_one(tmp_path):
    # 40 calls of 10 µs: 0.4 ms of work left, cheaper than another worker's wake-up and spin
    idle, soon = slot(tmp_path, 0, idle_since=9.0), slot(tmp_path, 1)
    give_run(soon, 40, seconds_each=SHARE_MIN_S / 50)
    assert load(soon) == (SOON, 1)
    assert load(idle)[0] == IDLE
    assert sorted([idle, soon], key=load) == [soon, idle]


def test_a_worker_with_more_work_than_share_min_s_or_unknown_work_is_busy(tmp_path):
    longer, unknown, heavy = slot(tmp_path, 0), slot(tmp_path, 1), slot(tmp_path, 2)
    give_run(longer, 60, seconds_each=SHARE_MIN_S / 50)  # 1.2 × SHARE_MIN_S
    give_run(unknown, 1, fn=("m", "never_measured"))
    give_run(heavy, 1, seconds_each=PIPELINE_COST_S, fn=("m", "heavy"))  # nothing waits behind it
    assert load(longer) == load(unknown) == load(heavy) == (BUSY, 0.0)
    assert load(longer, now=10.0 + 0.4 * SHARE_MIN_S) == (SOON, 0)  # what is left counts: 0.8 × SHARE_MIN_S


def test_a_worker_late_on_its_estimate_is_not_trusted_to_be_done_soon(tmp_path):
    # a function known as 10 µs a call, called with arguments that make it slow: nothing more
    # is queued behind it while another worker idles
    late, idle = slot(tmp_path, 0), slot(tmp_path, 1, idle_since=9.0)
    give_run(late, 2, seconds_each=1e-5)
    assert load(late, now=10.0 + SHARE_MIN_S / 2) == (SOON, 0)  # a little late: estimates are rough
    assert load(late, now=10.0 + 2 * SHARE_MIN_S) == (BUSY, 0.0)
    assert sorted([late, idle], key=lambda s: load(s, now=10.1)) == [idle, late]


def test_among_workers_done_soon_the_lowest_index_keeps_the_trickle(tmp_path):
    a, b = slot(tmp_path, 0), slot(tmp_path, 1)
    give_run(b, 2, seconds_each=1e-6)
    give_run(a, 2, seconds_each=1e-6)
    assert sorted([b, a], key=load) == [a, b]


def test_heavy_calls_among_many_tiny_ones_go_to_different_workers(tmp_path):
    """Two heavy calls sent between hundreds of tiny ones, on 2 workers: each goes alone to an
    idle worker, cold (never measured) and once both functions are known. ``meet`` returns only
    when both heavy calls have started, so two on one worker would report ``met`` False."""
    with PortClient("--workers", "2", "-m", "pp_handlers") as c:
        for r in range(3):
            folder = tmp_path / f"round-{r}"
            folder.mkdir()
            requests, expected = [], []
            for k in range(300):
                if k in (10, 20):
                    requests.append(call("pp_handlers", "meet", str(folder), 2, k))
                else:
                    requests.append(call("pp_handlers", "echo", [r, k]))
                    expected.append([r, k])
            c.send(*requests)
            replies = [c.recv(timeout=60) for _ in requests]
            heavy = [replies[10][1], replies[20][1]]
            assert [tag for tag, _, _ in heavy] == [10, 20]  # in order, each its own
            assert all(met for _, _, met in heavy), f"round {r}: heavy calls did not run at once: {heavy}"
            assert heavy[0][1] != heavy[1][1]
            assert [reply[1] for k, reply in enumerate(replies) if k not in (10, 20)] == expected
