"""Which worker gets the next run: the least loaded, then the one most likely still awake."""

from poolport.dispatcher import Run, Slot, _load
from poolport.framing import Segment
from poolport.progress import Progress


def slot(tmp_path, index: int, idle_since: float = 0.0) -> Slot:
    s = Slot(index, str(tmp_path / f"progress-{index}"))
    s.progress = Progress(s.progress_path, create=True)
    s.idle_since = idle_since
    return s


def give_run(s: Slot, calls: int) -> None:
    s.runs.append(Run(s.sent, Segment(b"", [0] * (calls + 1)), 0, calls, s.sent, 0.0))
    s.sent += calls


def answer(s: Slot, calls: int) -> None:
    for _ in range(calls):
        s.progress.begin()
        s.progress.end()


def test_fewer_unanswered_runs_first(tmp_path):
    idle, busy, busier = slot(tmp_path, 0), slot(tmp_path, 1), slot(tmp_path, 2)
    give_run(busy, 3)
    give_run(busier, 3)
    give_run(busier, 3)
    assert sorted([busier, busy, idle], key=lambda s: _load(s, 10.0)) == [idle, busy, busier]


def test_among_idle_workers_the_most_recently_active_first(tmp_path):
    old, recent = slot(tmp_path, 0, idle_since=1.0), slot(tmp_path, 1, idle_since=5.0)
    assert sorted([old, recent], key=lambda s: _load(s, 10.0)) == [recent, old]


def test_a_worker_that_answered_everything_counts_as_idle_and_hottest(tmp_path):
    # its replies went to the port, the report saying so is not read yet: it is still polling
    done, idle = slot(tmp_path, 0), slot(tmp_path, 1, idle_since=9.0)
    give_run(done, 2)
    answer(done, 1)
    assert _load(done, 10.0)[0] == 1  # one call still running
    answer(done, 1)
    assert _load(done, 10.0) == (0, -10.0)
    assert sorted([idle, done], key=lambda s: _load(s, 10.0)) == [done, idle]
