"""Which worker gets the next run: the least loaded, then the one most likely still awake."""

import pytest

from poolport.server.dispatcher import Slot, _load
from poolport.protocol.framing import Segment, frame
from poolport.server.ledger import Ledger
from poolport.server.progress import Progress
from portclient import PortClient, call

LEDGER = Ledger(3)


@pytest.fixture(autouse=True)
def fresh_ledger():
    global LEDGER
    LEDGER = Ledger(3)


def slot(tmp_path, index: int, idle_since: float = 0.0) -> Slot:
    s = Slot(index, str(tmp_path / f"progress-{index}"))
    s.progress = Progress(s.progress_path, create=True)
    s.idle_since = idle_since
    return s


def give_run(s: Slot, calls: int) -> None:
    f = frame(b"x")
    LEDGER.admit(Segment(f * calls, [k * len(f) for k in range(calls + 1)]))
    LEDGER.take_run(s.index, calls, 1 << 20, 0.0)


def load(s: Slot, now: float = 10.0) -> tuple[int, float]:
    return _load(s, LEDGER, now)


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
    assert load(done)[0] == 1  # one call still running
    answer(done, 1)
    assert load(done) == (0, -10.0)
    assert sorted([idle, done], key=load) == [done, idle]


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
