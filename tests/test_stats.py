"""Per-function statistics: fixed-bucket histograms, worker reports, the dispatcher's sums."""

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolport.codec import etf
from poolport.protocol.framing import frame
from poolport.server.stats import (
    BUCKETS,
    SETTLE_AFTER,
    MAX_FUNCTIONS,
    OTHER,
    CallRecorder,
    Histogram,
    StatsTable,
    bucket,
    upper_us,
)
from poolport.protocol.bert import request_name
from poolport.codec.terms import Atom


def test_buckets_are_four_per_doubling_and_bounded():
    assert bucket(0.0) == bucket(0.99) == 0
    assert bucket(1.0) == 1
    assert bucket(2.0) == 5 and bucket(4.0) == 9
    assert [bucket(us) for us in (8, 9.9, 10, 11, 12, 14, 15.9, 16)] == [13, 13, 14, 14, 15, 16, 16, 17]
    assert bucket(1e30) == BUCKETS - 1


@given(st.floats(1, 2**41))
def test_a_value_is_below_its_buckets_upper_bound_and_above_the_one_before(us):
    index = bucket(us)
    assert us <= upper_us(index)
    assert index == 1 or upper_us(index - 1) <= int(us) + 1
    assert upper_us(index) <= max(1.25 * us + 1, 2)  # a bucket is at most 25 % wide (+ rounding)


@given(st.lists(st.floats(0, 1e9), min_size=1, max_size=300))
def test_percentiles_are_ordered_and_within_a_bucket_of_the_truth(values):
    h = Histogram()
    for v in values:
        h.add(v)
    assert h.total == len(values) and h.max_us == int(max(values))
    p50, p99 = h.percentile(0.5), h.percentile(0.99)
    assert p50 <= p99 <= max(h.max_us, 1)
    true = sorted(values)[-(-len(values) // 2) - 1]  # the median rank, as percentile counts it
    assert p50 >= min(int(true), h.max_us)  # the bucket's upper bound: never below the value
    assert p50 <= max(1.25 * true + 1, 2)  # ... and at most one bucket (25 %) above it, rounded up


def test_an_empty_histogram_says_zero():
    assert Histogram().summary() == {Atom("p50_us"): 0, Atom("p99_us"): 0, Atom("max_us"): 0}


def test_reports_add_up_exactly_in_the_table():
    table = StatsTable()
    for _ in range(3):
        rec = CallRecorder()
        assert not rec
        for k in range(100):
            rec.record("m", "f", k / 1e6, error=k % 10 == 0)
        rec.record("m", "g", 0.5, error=False)
        table.merge(rec.take())
        assert not rec and rec.take() == CallRecorder().take()  # taken: empty again
    table.failed(("m", "f"), timeout=True)
    table.failed(("m", "h"), timeout=False)
    term = table.functions_term()
    f = term[(Atom("m"), Atom("f"))]
    assert (f[Atom("calls")], f[Atom("errors")], f[Atom("timeouts")], f[Atom("crashes")]) == (301, 30, 1, 0)
    assert f[Atom("max_us")] == 99 and f[Atom("p50_us")] <= f[Atom("p99_us")] <= 99
    assert term[(Atom("m"), Atom("g"))][Atom("max_us")] == 500000
    assert term[(Atom("m"), Atom("h"))][Atom("crashes")] == 1
    etf.encode(term)  # a term the port can carry


def test_a_report_that_is_not_one_is_refused():
    with pytest.raises(ValueError):
        StatsTable().merge(b"\xc1garbage")


def test_the_table_is_bounded_in_functions():
    table = StatsTable()
    for k in range(MAX_FUNCTIONS + 5):
        table.failed(("m", f"f{k}"), timeout=False)
    assert len(table.functions) == MAX_FUNCTIONS + 1
    assert table.functions[OTHER].calls == 5


def call_frame(module, function, args=(), compressed=False, atom_encoding="utf8"):
    term = (Atom("call"), Atom(module), Atom(function), list(args))
    payload = etf.encode(term, atom_encoding=atom_encoding)
    if compressed:
        body = payload[1:]
        payload = b"\x83P" + len(body).to_bytes(4, "big") + zlib.compress(body)
    return frame(payload)


@pytest.mark.parametrize("atom_encoding", ["utf8", "latin1"])
@pytest.mark.parametrize("compressed", [False, True])
def test_the_name_of_a_request_is_read_from_its_head(atom_encoding, compressed):
    item = call_frame("mod.sub", "fün", [b"x" * 5000], compressed, atom_encoding)
    assert request_name(item, 4) == ("mod.sub", "fün")
    info = frame(etf.encode((Atom("info"), Atom("timeout"), [(Atom("ms"), 5)])))
    assert request_name(info + item, 4) == ("mod.sub", "fün")  # the info packet is skipped
    assert request_name(info, 4) is None
    assert request_name(frame(etf.encode((Atom("twice"), 21))), 4) is None  # bare mode
    assert request_name(frame(b"\x83h\x04d\x00"), 4) is None  # cut short


@given(st.floats(0, 2**50))
def test_the_recorder_puts_a_call_in_the_bucket_the_table_reads(us):
    rec = CallRecorder()
    rec.record("m", "f", us / 1e6, error=False)
    table = StatsTable()
    table.merge(rec.take())
    counts = table.functions[("m", "f")].latency.counts
    assert counts[bucket(int(us / 1e6 * 1e6))] == 1  # what the worker measured, in µs


def test_reports_received_are_read_when_settled_or_when_too_many_wait():
    table = StatsTable()
    rec = CallRecorder()
    rec.record("m", "f", 0.001, error=False)
    table.receive(rec.take())
    table.receive(b"\xc1not a report")
    table.waited(0.002, 3)
    assert not table.functions and table.queue_wait.total == 0  # kept, not read yet
    table.settle()
    assert table.functions[("m", "f")].calls == 1 and table.bad_reports == 1
    assert table.queue_wait.total == 3 and table.queue_wait.max_us == 2000
    for _ in range(SETTLE_AFTER):
        rec.record("m", "f", 0.001, error=False)
        table.receive(rec.take())
        table.waited(0.001, 1)
    assert table.functions[("m", "f")].calls == 1 + SETTLE_AFTER  # read on the way: bounded memory
    assert len(table._reports) < SETTLE_AFTER and len(table._waits) < SETTLE_AFTER
    table.settle()
    assert table.queue_wait.total == 3 + SETTLE_AFTER
