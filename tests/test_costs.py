"""Cost per function and where runs are cut, without processes: a cold pool spreads its first
calls one per run, a cheap function learns it is cheap from one run, a heavy call never waits
behind others in a run, busy workers are sent cheap calls only, and the table stays bounded."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolport.codec import etf
from poolport.server.costs import (
    MAX_PREFIXES,
    PIPELINE_COST_S,
    RUN_TARGET_S,
    SHARE_MIN_S,
    SMOOTHING,
    CostTable,
    NameReader,
    cut,
)
from poolport.protocol.framing import Segment, frame
from poolport.server.ledger import Ledger
from poolport.codec.terms import Atom

TINY, HEAVY, OTHER = ("m", "tiny"), ("m", "heavy"), ("m", "other")


def call(fn: tuple[str, str], arg: object = 0, kind: str = "call", atom_encoding: str = "utf8") -> bytes:
    return frame(etf.encode((Atom(kind), Atom(fn[0]), Atom(fn[1]), [arg]), atom_encoding=atom_encoding))


def items(*frames: bytes) -> tuple[bytes, list[int]]:
    bounds = [0]
    for f in frames:
        bounds.append(bounds[-1] + len(f))
    return b"".join(frames), bounds


def names_of(data: bytes, bounds: list[int]) -> list[object]:
    reader = NameReader(4)
    return [reader(data, bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def runs(table: CostTable, data: bytes, bounds: list[int], size: int = 10_000, share: int | None = None) -> list[int]:
    """The lengths of the runs an idle pool would be sent, in order."""
    reader = NameReader(4)
    lengths, i = [], 0
    while i < len(bounds) - 1:
        end, _ = cut(table, reader, data, bounds, i, min(i + size, len(bounds) - 1), share=share)
        assert i < end
        lengths.append(end - i)
        i = end
    return lengths


def known(**costs: float) -> CostTable:
    table = CostTable()
    for fn, seconds in costs.items():
        table.learn([(("m", fn), 1, 0.0)], seconds)
    return table


# ---------------------------------------------------------------- the table


def test_a_function_never_measured_is_unknown_and_one_run_measures_it():
    table = CostTable()
    assert table.cost(TINY) is None
    table.learn([(TINY, 400, 0.0)], 0.002)
    assert table.cost(TINY) == pytest.approx(5e-6)
    table.learn([(TINY, 1, 5e-6)], 3e-5)  # one call, slower: one smoothing step
    assert table.cost(TINY) == pytest.approx(SMOOTHING * 3e-5 + (1 - SMOOTHING) * 5e-6)
    table.learn([(TINY, 2, 1e-5)], 2 * 4e-5)  # two calls: two steps
    assert table.cost(TINY) == pytest.approx(
        (1 - (1 - SMOOTHING) ** 2) * 4e-5 + (1 - SMOOTHING) ** 2 * (SMOOTHING * 3e-5 + (1 - SMOOTHING) * 5e-6)
    )
    table.learn([(TINY, 2000, 1e-5)], 2000 * 1e-6)  # a long run: as good as the truth
    assert table.cost(TINY) == pytest.approx(1e-6)
    assert table.cost(HEAVY) is None


def test_a_lone_call_faster_than_feared_is_believed_at_once():
    """A tiny function measured alone on busy cores: its calls' times are mostly wake-ups, which
    only ever add. The fastest lone call says the most; slower ones move the estimate slowly."""
    table = CostTable()
    for seconds in (4e-3, 1.5e-3, 2.6e-3):  # wake-ups of milliseconds: "heavy" so far
        table.learn([(TINY, 1, table.cost(TINY) or 0.0)], seconds)
        assert table.cost(TINY) >= PIPELINE_COST_S
    table.learn([(TINY, 1, table.cost(TINY))], 2e-4)
    assert table.cost(TINY) == pytest.approx(2e-4)  # cheap: its next run holds several calls
    table.learn([(TINY, 1, 2e-4)], 3e-3)
    assert table.cost(TINY) == pytest.approx(SMOOTHING * 3e-3 + (1 - SMOOTHING) * 2e-4)
    assert table.cost(TINY) < PIPELINE_COST_S
    table.learn([(TINY, 5, 2e-4), (OTHER, 5, 2e-4)], 10 * 5e-6)  # runs of several calls: smoothed
    assert table.cost(TINY) > 1e-4  # not believed at once: only a lone call is


def test_a_mixed_run_shares_its_time_in_proportion_to_what_each_was_expected_to_cost():
    table = known(tiny=1e-5, other=1e-4)
    # expected: 1 x 10 µs + 1 x 100 µs = 110 µs; it took twice that
    table.learn([(TINY, 1, 1e-5), (OTHER, 1, 1e-4)], 2.2e-4)
    assert table.cost(TINY) == pytest.approx(SMOOTHING * 2e-5 + (1 - SMOOTHING) * 1e-5)
    assert table.cost(OTHER) == pytest.approx(SMOOTHING * 2e-4 + (1 - SMOOTHING) * 1e-4)


def test_the_table_is_bounded_and_forgets_the_least_recently_measured():
    table = CostTable(limit=3)
    for fn in ("a", "b", "c"):
        table.learn([(("m", fn), 1, 0.0)], 0.001)
    table.learn([(("m", "a"), 1, 0.001)], 0.001)  # measured again: now the most recent
    for k in range(1000):  # a flood of names
        table.learn([(("m", f"x{k}"), 1, 0.0)], 0.001)
        assert len(table) <= 3
    assert table.cost(("m", "a")) is None and table.cost(("m", "x999")) == pytest.approx(0.001)
    table = CostTable(limit=3)
    for fn in ("a", "b", "c"):
        table.learn([(("m", fn), 1, 0.0)], 0.001)
    table.learn([(("m", "a"), 1, 0.001)], 0.001)
    table.learn([(("m", "d"), 1, 0.0)], 0.001)
    assert table.cost(("m", "b")) is None  # the oldest measurement went first
    assert table.cost(("m", "a")) is not None and len(table) == 3


def test_nothing_is_learned_from_an_empty_mix_or_a_clock_that_went_back():
    table = CostTable()
    table.learn([], 1.0)
    table.learn([(TINY, 1, 0.0)], -1.0)
    assert len(table) == 0


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("atom_encoding", ["utf8", "latin1"])
@pytest.mark.parametrize("kind", ["call", "cast"])
def test_the_function_is_read_from_the_head_of_each_request(kind: str, atom_encoding: str):
    data, bounds = items(
        call(TINY, 1, kind, atom_encoding),
        call(HEAVY, b"x" * 300, kind, atom_encoding),
        call(("mod_ü" * 40, "fn"), 3, kind, atom_encoding),  # a long atom: ATOM_EXT / ATOM_UTF8_EXT
        call(TINY, 2, kind, atom_encoding),
    )
    assert names_of(data, bounds) == [TINY, HEAVY, ("mod_ü" * 40, "fn"), TINY]


def test_requests_that_are_not_plain_calls_are_read_the_slow_way_or_name_nothing():
    info = frame(etf.encode((Atom("info"), Atom("timeout"), [(Atom("ms"), 5)])))
    compressed = frame(etf.encode((Atom("call"), Atom("m"), Atom("z"), [b"a" * 5000]), compressed=6))
    bare = frame(etf.encode((Atom("twice"), 21)))
    data, bounds = items(info + call(TINY), compressed, bare)
    assert names_of(data, bounds) == [TINY, ("m", "z"), None]
    assert NameReader(4, bare=True)(data, bounds[0], bounds[1]) is None


def test_remembered_heads_are_bounded():
    reader = NameReader(4)
    for k in range(MAX_PREFIXES + 10):
        data = call(("m", f"f{k}"))
        assert reader(data, 0, len(data)) == ("m", f"f{k}")
        assert len(reader._names) <= MAX_PREFIXES


# ---------------------------------------------------------------- cutting


def test_a_cold_pool_sends_every_call_alone_until_its_function_is_measured():
    data, bounds = items(*[call(HEAVY, k) for k in range(16)])
    assert runs(CostTable(), data, bounds) == [1] * 16


def test_a_cheap_function_travels_in_runs_of_about_the_target_work():
    table = known(tiny=RUN_TARGET_S / 100.5)  # 100 calls fit, 101 do not
    data, bounds = items(*[call(TINY, k) for k in range(250)])
    assert runs(table, data, bounds) == [100, 100, 50]
    assert runs(table, data, bounds, size=30) == [30] * 8 + [10]  # the share caps it too


def test_a_share_is_not_cut_before_it_holds_share_min_s_of_work():
    """An even share of the queue per worker, unless that leaves each less work than a wake-up
    costs: then the run takes on calls until it holds SHARE_MIN_S (one worker keeps them)."""
    assert SHARE_MIN_S <= PIPELINE_COST_S  # a heavy call is never "done soon": nothing waits behind it
    assert 1.5 * SHARE_MIN_S <= RUN_TARGET_S
    data, bounds = items(*[call(TINY, k) for k in range(60)])
    assert runs(known(tiny=SHARE_MIN_S / 100), data, bounds, share=30) == [60]  # 0.6 × SHARE_MIN_S
    assert runs(known(tiny=SHARE_MIN_S / 20), data, bounds, share=5) == [20, 20, 20]
    assert runs(known(tiny=SHARE_MIN_S / 10), data, bounds, share=15) == [15] * 4  # 1.5 × SHARE_MIN_S
    assert runs(known(tiny=SHARE_MIN_S / 20), data, bounds, share=5, size=8) == [8] * 7 + [4]
    table = known(tiny=SHARE_MIN_S / 100, heavy=0.02)
    data, bounds = items(*[call(TINY, k) for k in range(10)], call(HEAVY), call(TINY))
    assert runs(table, data, bounds, share=2) == [10, 1, 1]  # a heavy call still goes alone


def test_expected_seconds_of_a_mix_and_calls_in_a_time():
    table = known(tiny=1e-5, other=3e-5)
    assert table.expected([(TINY, 3, 0.0), (OTHER, 2, 0.0)]) == pytest.approx(9e-5)  # today's costs
    assert table.expected([(TINY, 3, 0.0), (HEAVY, 1, 0.0)]) == math.inf  # never measured
    table.learn([(HEAVY, 1, 0.0)], PIPELINE_COST_S)
    assert table.expected([(TINY, 3, 0.0), (HEAVY, 1, 0.0)]) == math.inf  # heavy
    assert table.expected(None) == table.expected([]) == math.inf
    assert table.calls_in(TINY, 1e-4) == 10
    assert table.calls_in(TINY, 1.5e-5) == 2
    assert table.calls_in(OTHER, 1e-5) == table.calls_in(("m", "never"), 1.0) == 1


def test_a_heavy_call_never_rides_behind_others_nor_others_behind_it():
    table = known(tiny=1e-6, heavy=0.02)
    frames = [call(TINY, k) for k in range(5)] + [call(HEAVY)] + [call(TINY, k) for k in range(5)]
    frames += [call(HEAVY), call(HEAVY), call(OTHER), call(TINY)]  # OTHER: never measured
    data, bounds = items(*frames)
    assert runs(table, data, bounds) == [5, 1, 5, 1, 1, 1, 1]


def test_interleaved_tiny_and_heavy_calls_put_every_heavy_call_in_a_run_of_its_own():
    table = known(tiny=1e-6, heavy=0.02)
    frames = []
    for k in range(20):
        frames += [call(TINY, k)] * 7 + [call(HEAVY, k)]
    data, bounds = items(*frames)
    assert runs(table, data, bounds) == [7, 1] * 20


def test_cheap_calls_of_several_functions_share_a_run_up_to_the_target():
    table = known(tiny=RUN_TARGET_S / 10, other=RUN_TARGET_S / 2.5)
    assert RUN_TARGET_S / 2.5 < PIPELINE_COST_S  # other is cheap, if barely
    data, bounds = items(*[call(TINY)] * 4, *[call(OTHER)] * 3, *[call(TINY)] * 3)
    # in tenths of the target: 4 × 1 + 4 ≤ 10 < + 4; 4 + 4 + 1 + 1 ≤ 10 < + 1; the last
    assert runs(table, data, bounds) == [5, 4, 1]


def test_a_busy_worker_is_sent_only_calls_known_to_be_cheap():
    table = known(tiny=1e-6, heavy=PIPELINE_COST_S)
    reader = NameReader(4)
    data, bounds = items(call(TINY), call(TINY), call(HEAVY), call(TINY))
    assert cut(table, reader, data, bounds, 0, 4, busy=True) == (2, [(TINY, 2, 1e-6)])
    assert cut(table, reader, data, bounds, 2, 4, busy=True) == (2, [])  # heavy: wait for an idle one
    assert cut(table, reader, data, bounds, 2, 4) == (3, [(HEAVY, 1, PIPELINE_COST_S)])
    data, bounds = items(call(OTHER), call(TINY))
    assert cut(table, reader, data, bounds, 0, 2, busy=True) == (0, [])  # unknown: as heavy
    assert cut(table, reader, data, bounds, 0, 2) == (1, [(OTHER, 1, 0.0)])


def test_the_mix_of_a_run_counts_each_function_and_teaches_the_table():
    table = known(tiny=1e-5, other=2e-5)
    reader = NameReader(4)
    data, bounds = items(call(TINY), call(TINY, kind="cast"), call(OTHER), call(OTHER), call(TINY))
    end, mix = cut(table, reader, data, bounds, 0, 5)
    assert end == 5 and mix == [(TINY, 2, 1e-5), (OTHER, 2, 2e-5), (TINY, 1, 1e-5)]
    table.learn(mix, 2 * (3e-5 + 4e-5))  # took twice what was expected
    weight = 1 - (1 - SMOOTHING) ** 3  # three calls of TINY in the run: one update, three steps
    assert table.cost(TINY) == pytest.approx(weight * 2e-5 + (1 - weight) * 1e-5)


def test_a_cold_stream_of_tiny_calls_travels_in_long_runs_after_a_run_or_two():
    table = CostTable()
    reader = NameReader(4)
    data, bounds = items(*[call(TINY, k) for k in range(3000)])
    first, mix = cut(table, reader, data, bounds, 0, 3000)
    assert first == 1
    table.learn(mix, 190e-6)  # one lone call's round trip
    second, _ = cut(table, reader, data, bounds, 1, 3000)
    assert second - 1 == 10  # 2 ms of calls of 190 µs: already batched
    table.learn([(TINY, 10, 190e-6)], 10 * 5e-6)  # and it was far cheaper than feared
    third, _ = cut(table, reader, data, bounds, second, 3000)
    assert third - second > 50  # 10 calls weigh nearly 90 %: about 25 µs each now


def test_the_ledger_takes_what_cut_says_and_nothing_when_it_says_none():
    table = known(tiny=1e-6, heavy=0.02)
    reader = NameReader(4)
    ledger = Ledger(2)
    data, bounds = items(call(HEAVY, 0), *[call(TINY, k) for k in range(6)], call(HEAVY, 1), call(TINY))
    ledger.admit(Segment(data, bounds))

    def cut_for(busy: bool):
        return lambda d, b, i, j: cut(table, reader, d, b, i, j, busy=busy)

    first = ledger.take_run(0, 100, 1 << 20, 0.0, cut=cut_for(False))
    assert first is not None and (first.start, first.count) == (0, 1) and first.note == [(HEAVY, 1, 0.02)]
    assert ledger.take_run(1, 100, 1 << 20, 0.0, strict=True, cut=cut_for(True)) is not None  # tiny: pipelined
    assert ledger.take_run(1, 100, 1 << 20, 0.0, strict=True, cut=cut_for(True)) is None  # heavy next
    assert ledger.queued == 2  # nothing was taken
    second = ledger.take_run(0, 100, 1 << 20, 0.0, cut=cut_for(False))
    assert second is not None and (second.start, second.count) == (7, 1)
    with pytest.raises(ValueError, match="past the run's limit"):
        ledger.take_run(1, 1, 1 << 20, 0.0, cut=lambda d, b, i, j: (j + 1, None))
    assert ledger.queued == 1


def test_a_head_inside_the_arguments_neither_splits_a_run_nor_hides_another_function():
    table = known(tiny=1e-6, heavy=0.02)
    head = NameReader(4).head(call(TINY), 0, len(call(TINY)))
    assert head is not None
    data, bounds = items(call(TINY, head), call(TINY), call(TINY, head * 3), call(TINY))
    assert runs(table, data, bounds) == [4]  # more heads than calls: each call checked
    data, bounds = items(call(TINY), call(TINY, head), call(HEAVY), call(TINY, head), call(TINY))
    assert runs(table, data, bounds) == [2, 1, 2]


FUNCTIONS = [("m", f"f{k}") for k in range(5)]


@settings(max_examples=300, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.integers(0, 4), st.sampled_from(["call", "cast"]), st.binary(max_size=60)), max_size=40
    ),
    costs=st.lists(st.none() | st.floats(0.0, 0.01), min_size=5, max_size=5),
    size=st.integers(1, 50),
    busy=st.booleans(),
    share=st.none() | st.integers(1, 50),
)
def test_every_run_holds_what_its_mix_says_and_keeps_heavy_calls_alone(calls, costs, size, busy, share):
    table = CostTable()
    for fn, seconds in zip(FUNCTIONS, costs):
        if seconds is not None:
            table.learn([(fn, 1, 0.0)], seconds)
    data, bounds = items(*[call(FUNCTIONS[f], arg, kind) for f, kind, arg in calls])
    truth = [FUNCTIONS[f] for f, _, _ in calls]
    reader = NameReader(4)
    i = 0
    while i < len(calls):
        j = min(i + size, len(calls))
        end, mix = cut(table, reader, data, bounds, i, j, busy=busy, share=share)
        assert i <= end <= j
        if end == i:  # only a busy worker is refused, and only a call not known to be cheap
            assert busy and (table.cost(truth[i]) is None or table.cost(truth[i]) >= PIPELINE_COST_S)
            i += 1
            continue
        held = truth[i:end]
        assert [fn for fn, n, _ in mix for _ in range(n)] == held  # the mix is the run, in order
        prices = [table.cost(fn) for fn in held]
        if len(held) > 1 or busy:
            assert all(p is not None and p < PIPELINE_COST_S for p in prices)  # cheap calls only
        if len(held) > 1:
            assert sum(prices) <= RUN_TARGET_S * (1 + 1e-9)
        if share is not None and len(held) > share:  # past its share only while short of SHARE_MIN_S
            assert sum(prices[:-1]) < SHARE_MIN_S
        i = end
