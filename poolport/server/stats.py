"""Per-function call statistics in fixed buckets: recorded in workers, summed in the dispatcher.

A worker times each handler call and keeps, per ``(module, function)``, the
calls, the errors and a histogram of bucket counts since its last report
(:class:`CallRecorder`). It sends that report on the link just before the
chunk of replies it covers, so by the time a reply reaches the port its call
is already counted: counts read through ``'$poolport':stats()`` are exact.
The dispatcher adds the reports up (:class:`StatsTable`) and counts what no
worker can report itself: the calls that crashed their worker or ran past
their timeout.

Histograms are four buckets per power of two of microseconds, splitting each
doubling in four equal parts (a bucket is at most 25 % wide), so a percentile
costs a fixed array, never a list of calls, and finding a bucket costs a few
integer operations (no logarithm) in the worker.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from poolport.codec.terms import Atom

PER_OCTAVE = 4  # buckets per doubling of the latency
BUCKETS = PER_OCTAVE * 42 + 1  # bucket 0 is < 1 µs; the last one holds everything from ~50 days on
MAX_FUNCTIONS = 10_000  # functions tracked; calls to more are counted under OTHER
OTHER = ("$poolport", "other")


def bucket(us: float) -> int:
    """The bucket of a latency in µs: 0 below 1 µs, then four per doubling: ``n`` in
    ``[2**o * (4 + k) / 4, 2**o * (5 + k) / 4)`` is bucket ``4 * o + k + 1``."""
    n = int(us)
    if n < 1:
        return 0
    bits = n.bit_length()  # n is in [2**(bits - 1), 2**bits)
    quarter = (n >> (bits - 3) if bits >= 3 else n << (3 - bits)) & 3
    return min(BUCKETS - 1, (bits - 1) * PER_OCTAVE + quarter + 1)


def upper_us(index: int) -> int:
    """The upper bound of a bucket in whole µs (what a percentile in it reports)."""
    if index <= 0:
        return 1
    octave, quarter = divmod(index - 1, PER_OCTAVE)
    return int(math.ceil(2**octave * (5 + quarter) / 4))


class Histogram:
    """Counts per fixed bucket, the exact maximum, and percentiles read from the buckets."""

    __slots__ = ("counts", "total", "max_us")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.total = 0
        self.max_us = 0

    def add(self, us: float, n: int = 1) -> None:
        self.add_bucket(bucket(us), n, int(us))

    def add_bucket(self, index: int, n: int, max_us: int = 0) -> None:
        self.counts[min(max(index, 0), BUCKETS - 1)] += n
        self.total += n
        self.max_us = max(self.max_us, max_us)

    def percentile(self, q: float) -> int:
        """The upper bound of the bucket holding the ``q``-quantile (never above the maximum);
        0 while empty."""
        if not self.total:
            return 0
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(upper_us(index), self.max_us) if self.max_us else upper_us(index)
        return self.max_us  # not reached

    def summary(self) -> dict[Atom, int]:
        return {
            Atom("p50_us"): self.percentile(0.5),
            Atom("p99_us"): self.percentile(0.99),
            Atom("max_us"): self.max_us,
        }


# -- worker side


class CallRecorder:
    """What a worker counted since its last report: ``(module, function) -> [calls, errors,
    max_us, {bucket: n}]``. Cheap per call: a dict lookup and a logarithm."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], list[Any]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def record(self, module: str, function: str, seconds: float, error: bool) -> None:
        entry = self._pending.get((module, function))
        if entry is None:
            entry = self._pending[(module, function)] = [0, 0, 0, {}]
        n = int(seconds * 1e6)
        entry[0] += 1
        if error:
            entry[1] += 1
        if n > entry[2]:
            entry[2] = n
        if n < 1:
            index = 0
        else:  # bucket(n), inlined: this runs once per call (the table clamps the index)
            bits = n.bit_length()
            index = (bits - 1) * PER_OCTAVE + ((n >> (bits - 3) if bits >= 3 else n << (3 - bits)) & 3) + 1
        histogram = entry[3]
        histogram[index] = histogram.get(index, 0) + 1

    def take(self) -> bytes:
        """The report (msgpack) of everything recorded since the last one; empties the recorder."""
        report = [(m, f, *counts) for (m, f), counts in self._pending.items()]
        self._pending = {}
        return _encoder.encode(report)


Report = list[tuple[str, str, int, int, int, dict[int, int]]]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Report)


# -- dispatcher side


class FunctionStats:
    __slots__ = ("calls", "errors", "timeouts", "crashes", "latency")

    def __init__(self) -> None:
        self.calls = self.errors = self.timeouts = self.crashes = 0
        self.latency = Histogram()


SETTLE_AFTER = 1024  # reports (or queue waits) kept unread at most; reading them waits until then


class StatsTable:
    """Pool-wide statistics per function, summed from the workers' reports.

    Reports and queue waits are only kept when they arrive (:meth:`receive`, :meth:`waited`):
    the dispatcher takes them on its way from a worker's reply to the port, so reading them
    waits until statistics are asked for (:meth:`settle`) or ``SETTLE_AFTER`` of them wait.
    """

    def __init__(self) -> None:
        self.functions: dict[tuple[str, str], FunctionStats] = {}
        self.queue_wait = Histogram()  # from admission to being sent to a worker
        self._reports: list[bytes] = []
        self._waits: list[tuple[float, int]] = []

    def receive(self, report: bytes) -> None:
        """Keep a worker's report, to be read by :meth:`settle`."""
        self._reports.append(report)
        if len(self._reports) >= SETTLE_AFTER:
            self.settle()

    def waited(self, seconds: float, count: int) -> None:
        """``count`` requests waited ``seconds`` between admission and a worker."""
        self._waits.append((seconds, count))
        if len(self._waits) >= SETTLE_AFTER:
            self.settle()

    def settle(self) -> None:
        """Read everything received so far; a report that cannot be read is counted in
        ``bad_reports`` (for the dispatcher to log) and dropped."""
        reports, self._reports = self._reports, []
        waits, self._waits = self._waits, []
        for report in reports:
            try:
                self.merge(report)
            except ValueError:
                self.bad_reports += 1
        add = self.queue_wait.add
        for seconds, count in waits:
            add(seconds * 1e6, count)

    bad_reports = 0  # reports that could not be read (a worker breaking the link protocol)

    def _entry(self, key: tuple[str, str]) -> FunctionStats:
        entry = self.functions.get(key)
        if entry is None:
            if len(self.functions) >= MAX_FUNCTIONS:
                key = OTHER
                entry = self.functions.get(key)
            if entry is None:
                entry = self.functions[key] = FunctionStats()
        return entry

    def merge(self, report: bytes) -> None:
        """Add a worker's report; raises ``ValueError`` if it is not one."""
        try:
            rows = _decoder.decode(report)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not a statistics report: {exc}") from None
        for module, function, calls, errors, max_us, hist in rows:
            entry = self._entry((module, function))
            entry.calls += calls
            entry.errors += errors
            latency = entry.latency
            for index, n in hist.items():
                latency.add_bucket(index, n)
            latency.max_us = max(latency.max_us, max_us)

    def failed(self, key: tuple[str, str], timeout: bool) -> None:
        """A call the worker could not report: it ran past its timeout, or its worker died."""
        entry = self._entry(key)
        entry.calls += 1
        if timeout:
            entry.timeouts += 1
        else:
            entry.crashes += 1

    def functions_term(self) -> dict[tuple[Atom, Atom], dict[Atom, int]]:
        """``#{{Module, Function} => #{calls, errors, timeouts, crashes, p50_us, p99_us, max_us}}``."""
        out = {}
        for (module, function), s in self.functions.items():
            out[(Atom(module), Atom(function))] = {
                Atom("calls"): s.calls,
                Atom("errors"): s.errors,
                Atom("timeouts"): s.timeouts,
                Atom("crashes"): s.crashes,
                **s.latency.summary(),
            }
        return out
