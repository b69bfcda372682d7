"""``python -m poolport.tools.bench``: poolport against the port a user would otherwise write.

Every end-to-end figure is measured from a real Erlang VM through a real port
(``bench_driver.escript``), for ``poolport serve`` and for the single-process
reference ``python -m poolport.tools.bench_reference`` (the 2017 seed's loop: read,
decode, call, encode, write) driven identically, in the same run and
interleaved (reference, poolport, reference, poolport, ...; the best figure of
each side is kept), because the machines are shared and noisy. The codec is
measured in-process against erlang-py and erlpack (the ``bench`` extra).

Workloads (``--only`` names):

* ``cpu``: ``burn(200000)`` (pure-Python CPU work) from 50 concurrent Erlang
  processes, each in lock-step, with 1 worker and with N workers; bar: the
  N-worker throughput is at least 0.9 × N × the 1-worker throughput.
* ``tiny``: ``echo({I, <<"abc">>})`` pipelined with 512 requests in flight
  (bar: ≥ 1.0 × the reference) and from one caller in lock-step, every round
  trip timed (bar: p50 ≤ 3 × the reference's).
* ``big``: echo of a 1 MB and a 10 MB binary, one caller in lock-step; MB/s is
  payload bytes (10^6) per second, counted once per round trip (bar: 10 MB at
  ≥ 200 MB/s).
* ``codec``: ``poolport.codec.etf`` encode/decode of a realistic nested term and of a
  1 MB binary, best of several timeit-style loops, against erlang-py
  (bar: ≥ 1.0× on each) and erlpack (C; shown, no bar).
* ``cluster``: groups through the poolport OTP application
  (``bench_cluster.escript``, the app compiled from ``erlang/src`` with
  ``erlc``): the same ``burn(200000)`` from 50 callers through
  ``{group, G}`` with 1, 2 and 3 pool nodes on this host (Erlang nodes started
  with ``peer``, 1 worker each), as ratios to one node; and tiny calls from one
  caller in lock-step through ``{group, G}`` against the pool's pid (the
  per-call cost of group routing). No bar: the scale-out is bounded by this
  host's cores.
* ``client``: the poolport OTP application as users call it
  (``bench_client.escript``): ``poolport:call/4`` from 1 caller in lock-step
  (p50/p99) and from 50 and 500 processes, against a raw ``{packet, 4}`` port
  to a ``poolport serve`` started with the same arguments, pipelined (512 in
  flight) and in lock-step, in the same VM and run; bars: 50 and 500 callers
  ≥ 0.5 × the raw pipelined port, lock-step p50 ≤ 1.3 × the raw port's. Then
  a soak of 10 × as many calls from 50 processes, with the pool process's
  memory before and after (it must not grow per call).

``cpu`` also sends a cold burst: 16 ``burn(200000)`` at once to a pool that
has never run ``burn`` (1 worker, then N), no warm-up; bar: N-worker ≥ 0.9 ×
N × 1-worker. And a mix: 16 ``burn(200000)``, each after 100 tiny ``echo``
calls, all at once (after a warm-up slice, so both functions are known); the
same bar on the burn calls' rate: heavy calls keep spreading while tiny ones
flow between them.

Progress goes to stderr; the markdown report to stdout (and ``--out FILE``).
Exit status 0 when every measurement ran (a bar that fails says FAIL in the
table, it does not change the status), 1 when a measurement could not run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import importlib
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from poolport.codec.etf import codec_name
from poolport.config import Config

DRIVER = Path(__file__).with_name("bench_driver.escript")
CHECKOUT = Path(__file__).resolve().parents[2]  # the source tree this package sits in (erlang/ beside it)
WORKLOADS = ("cpu", "tiny", "big", "stream", "codec", "cluster", "client")
CLUSTER_DRIVER = Path(__file__).with_name("bench_cluster.escript")
CLIENT_DRIVER = Path(__file__).with_name("bench_client.escript")
CLUSTER_NODES = 3
BURN_STEPS = 200_000
CALLERS = 50
BURST_CALLS = 16  # the cold burst: this many burn calls sent at once to a fresh pool
MIX_TINY = 100  # the mix: this many tiny echo calls before each of BURST_CALLS burn calls
WINDOW = 512
BIG_SIZES = (1_000_000, 10_000_000)
STREAM_SMALL = (16, 256)  # bytes per item, window of the stream of small items
STREAM_BIG = (1_000_000, 8)  # ... of the stream of 1 MB items


@dataclass(frozen=True)
class Plan:
    rounds: int  # interleaved reference/poolport rounds for tiny and big
    cpu_rounds: int  # rounds of (1 worker, N workers, reference) for cpu
    cpu_calls: int  # burn calls per worker (1 worker: this many; N workers: N times)
    pipe_calls: int
    lock_calls: int
    big_calls: tuple[int, int]  # calls of the 1 MB and 10 MB echo
    codec_repeats: int
    codec_min_time: float  # seconds per timed loop
    cluster_calls: int  # burn calls per pool node in the group
    cluster_tiny: int  # tiny lock-step calls, pid and group each
    cluster_rounds: int
    client_calls: int  # tiny calls per client phase (lock-step phases: a tenth)
    client_rounds: int
    stream_items: tuple[int, int] = (100_000, 200)  # items of the small and the 1 MB stream


FULL = Plan(
    rounds=3,
    cpu_rounds=2,
    cpu_calls=60,
    pipe_calls=100_000,
    lock_calls=5_000,
    big_calls=(30, 10),
    codec_repeats=5,
    codec_min_time=0.15,
    cluster_calls=60,
    cluster_tiny=3_000,
    cluster_rounds=3,
    client_calls=100_000,
    client_rounds=3,
)
QUICK = Plan(
    rounds=1,
    cpu_rounds=1,
    cpu_calls=8,
    pipe_calls=10_000,
    lock_calls=1_000,
    big_calls=(5, 3),
    codec_repeats=3,
    codec_min_time=0.02,
    cluster_calls=8,
    cluster_tiny=200,
    cluster_rounds=1,
    client_calls=10_000,
    client_rounds=1,
    stream_items=(10_000, 20),
)


def log(msg: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


_T0 = time.monotonic()


# --------------------------------------------------------------------------- driving


@dataclass
class Phase:
    calls: int
    seconds: float
    p50_us: float | None = None
    p99_us: float | None = None
    mean_us: float | None = None


def _server_env() -> dict[str, str]:
    """The environment of the servers: this poolport package importable first."""
    env = dict(os.environ)
    root = str(CHECKOUT)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def poolport_cmd(workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "poolport",
        "serve",
        "--workers",
        str(workers),
        "--module",
        "poolport.demo_handlers",
        "--log-level",
        "WARNING",
    ]


def reference_cmd() -> list[str]:
    return [sys.executable, "-m", "poolport.tools.bench_reference"]


def drive(phases: list[str], server: list[str], timeout: float = 600) -> dict[str, Phase]:
    """Run the Erlang driver with these phases against ``server``; results by phase spec.

    The driver (and so the VM and the server it spawns) runs in a session of
    its own; once the driver has exited, the server gets ``SERVER_EXIT_S`` to
    exit after its port closed, then that process group is killed, so no
    server of one measurement is still running during the next.
    """
    if not DRIVER.is_file():
        raise RuntimeError(
            f"{DRIVER} is missing (run from a source checkout or an editable "
            "install, or list bench_driver.escript in the package data)"
        )
    t0 = time.monotonic()
    status, stdout, stderr, ran = run_escript([str(DRIVER), *phases, "--", *server], timeout)
    log(
        f"    ({server[2] if len(server) > 2 else server[-1]}: driver {ran:.1f} s, "
        f"server gone {time.monotonic() - t0 - ran:.1f} s later)"
    )
    results: dict[str, Phase] = {}
    done = False
    for line in stdout.splitlines():
        f = line.split()
        if f[:1] == ["result"] and len(f) == 12:
            opt = [None if v == "-" else float(v) for v in (f[7], f[9], f[11])]
            results[f[1]] = Phase(int(f[3]), int(f[5]) / 1e6, *opt)
        elif f[:1] == ["done"]:
            done = True
    if status != 0 or not done or set(results) != set(phases):
        why = "timed out" if status is None else f"exit {status}"
        raise RuntimeError(
            f"Erlang driver failed ({why}) on {' '.join(server[1:4])}:\n{stdout[-2000:]}{stderr[-3000:]}"
        )
    return results


SERVER_EXIT_S = 30.0


def run_escript(argv: list[str], timeout: float, cwd: str | None = None) -> tuple[int | None, str, str, float]:
    """Run ``escript argv...`` in a session of its own: (exit status or None if it timed out,
    stdout, stderr, seconds it ran). Once it has exited, the servers it spawned get
    ``SERVER_EXIT_S`` to follow, then its process group is killed."""
    escript = shutil.which("escript")
    if escript is None:
        raise RuntimeError("`escript` not found: install Erlang/OTP (see README)")
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [escript, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=_server_env(),
            start_new_session=True,
            cwd=cwd,
        )
        try:
            status: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
        ran = time.monotonic() - t0
        _reap_group(proc.pid, SERVER_EXIT_S if status is not None else 0)
        if status is None:
            proc.wait()
        out.seek(0)
        err.seek(0)
        return status, out.read(), err.read(), ran


def _reap_group(pgid: int, grace: float) -> None:
    """Wait up to ``grace`` seconds for process group ``pgid`` to be gone, then kill it."""
    deadline = time.monotonic() + grace
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:  # only zombies left
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    log(f"    the server had not exited {grace:.0f} s after its port closed: killing it")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)


# --------------------------------------------------------------------------- table


@dataclass
class Row:
    workload: str
    metric: str
    poolport: float | str | None
    reference: float | str | None
    ratio: float | None = None
    bar: str = "—"
    ok: bool | None = None  # None: no bar on this row
    fmt: str = "{:,.0f}"

    def cells(self) -> list[str]:
        def show(v: Any) -> str:
            if v is None:
                return "—"
            if isinstance(v, str):
                return v
            return self.fmt.format(v)

        ratio = "—" if self.ratio is None else f"{self.ratio:.2f}×"
        result = "—" if self.ok is None else ("PASS" if self.ok else "**FAIL**")
        return [self.workload, self.metric, show(self.poolport), show(self.reference), ratio, self.bar, result]


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        log(f"  {row.workload} | {row.metric}: " + " | ".join(row.cells()[2:]))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


def _best(values: list[float | None], low: bool = False) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return min(vals) if low else max(vals)


# --------------------------------------------------------------------------- workloads


def _scaling_row(workload: str, workers: int, one: float, many: float) -> Row:
    """The bar of CPU-bound work: N workers give at least 0.9 × N × what 1 worker gives."""
    scaling = many / (workers * one)
    return Row(
        workload,
        f"scaling: {workers}-worker ÷ ({workers} × 1-worker)",
        scaling,
        None,
        None,
        "≥ 0.90",
        scaling >= 0.9,
        fmt="{:.2f}",
    )


def run_cpu(plan: Plan, workers: int, report: Report) -> None:
    spec1 = f"callers:burn:{BURN_STEPS}:{CALLERS}:{plan.cpu_calls}"
    specn = f"callers:burn:{BURN_STEPS}:{CALLERS}:{plan.cpu_calls * workers}"
    rate1: list[float] = []
    raten: list[float] = []
    rater: list[float] = []
    for r in range(plan.cpu_rounds):
        tag = f"cpu round {r + 1}/{plan.cpu_rounds}"
        log(f"{tag}: reference, burn({BURN_STEPS}) x {plan.cpu_calls}, {CALLERS} callers")
        p = drive([spec1], reference_cmd())[spec1]
        rater.append(p.calls / p.seconds)
        log(f"{tag}: poolport 1 worker, burn x {plan.cpu_calls}")
        p = drive([spec1], poolport_cmd(1))[spec1]
        rate1.append(p.calls / p.seconds)
        log(f"{tag}: poolport {workers} workers, burn x {plan.cpu_calls * workers}")
        p = drive([specn], poolport_cmd(workers))[specn]
        raten.append(p.calls / p.seconds)
    one, many, ref = max(rate1), max(raten), max(rater)
    w = f"CPU burn({BURN_STEPS}), {CALLERS} callers"
    fmt = "{:,.1f}"
    report.add(Row(w, "1 worker, calls/s", one, ref, _ratio(one, ref), fmt=fmt))
    report.add(Row(w, f"{workers} workers, calls/s", many, ref, _ratio(many, ref), fmt=fmt))
    report.add(_scaling_row(w, workers, one, many))

    def fresh_pools(phase: str, what: str, title: str, metric: str) -> None:
        """``phase`` on a fresh pool of 1 worker, then of ``workers``, ``cpu_rounds`` times:
        the N-worker rate against 1 worker's, and the scaling."""
        ones: list[float] = []
        manys: list[float] = []
        for r in range(plan.cpu_rounds):
            log(f"{what} round {r + 1}/{plan.cpu_rounds}: 1 then {workers} workers")
            for rates, n in ((ones, 1), (manys, workers)):
                p = drive([phase], poolport_cmd(n))[phase]
                rates.append(p.calls / p.seconds)
        one, many = max(ones), max(manys)
        report.add(
            Row(title, f"{workers} workers, {metric} (reference: 1 worker)", many, one, _ratio(many, one), fmt=fmt)
        )
        report.add(_scaling_row(title, workers, one, many))

    fresh_pools(
        f"burst:burn:{BURN_STEPS}:{BURST_CALLS}",
        f"cold burst: {BURST_CALLS} x burn({BURN_STEPS}) at once",
        f"cold burst: {BURST_CALLS} x burn({BURN_STEPS}) sent at once to a fresh pool",
        "calls/s",
    )
    fresh_pools(
        f"mix:burn:{BURN_STEPS}:{MIX_TINY}:{BURST_CALLS}",
        f"mix: {BURST_CALLS} x burn({BURN_STEPS}), each after {MIX_TINY} tiny calls, at once",
        f"mix: {BURST_CALLS} x burn({BURN_STEPS}), each after {MIX_TINY} tiny echo, at once",
        "burn calls/s",
    )


def run_client(plan: Plan, workers: int, report: Report) -> None:
    serve = ["--workers", str(workers), "--module", "poolport.demo_handlers", "--log-level", "WARNING"]
    with tempfile.TemporaryDirectory(prefix="poolport-bench-") as tmp:
        ebin = compile_otp_app(Path(tmp))
        log(
            f"client: raw port and poolport:call, {plan.client_calls} tiny calls per phase, "
            f"{plan.client_rounds} round(s), then a soak of {10 * plan.client_calls}"
        )
        status, stdout, stderr, ran = run_escript(
            [
                str(CLIENT_DRIVER),
                str(ebin),
                str(plan.client_calls),
                str(plan.client_rounds),
                "--",
                sys.executable,
                *serve,
            ],
            1800,
            cwd=tmp,
        )
        log(f"    (client driver {ran:.1f} s)")
    res: dict[str, Phase] = {}
    memory: tuple[int, int, int] | None = None
    for line in stdout.splitlines():
        f = line.split()
        if f[:1] == ["result"] and len(f) == 10:
            p50, p99 = (None if v == "-" else float(v) for v in (f[7], f[9]))
            res[f[1]] = Phase(int(f[3]), int(f[5]) / 1e6, p50_us=p50, p99_us=p99)
        elif f[:2] == ["memory", "pool"] and len(f) == 8:
            memory = (int(f[3]), int(f[5]), int(f[7]))
    expected = {"raw:pipe", "raw:50", "raw:lock", "pool:lock", "pool:50", "pool:500"}
    if status != 0 or set(res) != expected or memory is None:
        why = "timed out" if status is None else f"exit {status}"
        raise RuntimeError(f"client driver failed ({why}):\n{stdout[-2000:]}{stderr[-3000:]}")

    def rate(k: str) -> float:
        return res[k].calls / res[k].seconds

    w = 'tiny echo({I, <<"abc">>}) through poolport:call/4'
    raw = rate("raw:pipe")
    for procs in (50, 500):
        r = rate(f"pool:{procs}") / raw
        report.add(
            Row(
                w,
                f"{procs} callers, calls/s (reference: raw port, 512 pipelined)",
                rate(f"pool:{procs}"),
                raw,
                r,
                "ratio ≥ 0.50",
                r >= 0.5,
            )
        )
    report.add(  # no bar: the ceiling 50 lock-step callers face on this server, for reading the row above
        Row(
            w,
            "50 callers, calls/s (reference: raw port, 50 in flight)",
            rate("pool:50"),
            rate("raw:50"),
            _ratio(rate("pool:50"), rate("raw:50")),
        )
    )
    report.add(
        Row(
            w,
            "1 caller lock-step, calls/s (reference: raw port lock-step)",
            rate("pool:lock"),
            rate("raw:lock"),
            _ratio(rate("pool:lock"), rate("raw:lock")),
        )
    )
    for q in ("p50", "p99"):
        pp, ref = (getattr(res[k], f"{q}_us") for k in ("pool:lock", "raw:lock"))
        lat = _ratio(pp, ref)
        bar, ok = ("ratio ≤ 1.30", lat is not None and lat <= 1.3) if q == "p50" else ("—", None)
        report.add(Row(w, f"1 caller lock-step, latency {q} µs (reference: raw port)", pp, ref, lat, bar, ok))
    before, after, calls = memory
    report.add(
        Row(
            w,
            f"pool process memory after {calls:,} more calls from 50 callers, bytes (reference: before)",
            after,
            before,
            _ratio(after, before),
            "ratio ≤ 1.50",
            after <= 1.5 * before,
            fmt="{:,.0f}",
        )
    )


def run_endtoend(plan: Plan, workers: int, tiny: bool, big: bool, report: Report) -> None:
    phases: list[str] = []
    pipe = f"pipe:echo:{WINDOW}:{plan.pipe_calls}"
    lock = f"lock:echo:{plan.lock_calls}"
    bigs = [f"big:{size}:{calls}" for size, calls in zip(BIG_SIZES, plan.big_calls)]
    if tiny:
        phases += [pipe, lock]
    if big:
        phases += bigs
    runs: dict[str, list[dict[str, Phase]]] = {"reference": [], "poolport": []}
    for round_ in range(plan.rounds):
        for side, cmd in (("reference", reference_cmd()), ("poolport", poolport_cmd(workers))):
            log(
                f"{'tiny' if tiny else ''}{'+' if tiny and big else ''}{'big' if big else ''} "
                f"round {round_ + 1}/{plan.rounds}: {side}"
            )
            res = drive(phases, cmd)
            runs[side].append(res)
            for spec, ph in res.items():
                extra = ""
                if ph.p50_us is not None:
                    extra = f", p50 {ph.p50_us} µs, p99 {ph.p99_us} µs"
                log(f"    {spec}: {ph.calls / ph.seconds:,.0f} calls/s{extra}")

    def best(side: str, spec: str, get: Callable[[Phase], float | None], low: bool = False) -> float | None:
        return _best([get(res[spec]) for res in runs[side]], low)

    def rate(ph: Phase) -> float:
        return ph.calls / ph.seconds

    if tiny:
        w = 'tiny echo({I, <<"abc">>})'
        pp, ref = best("poolport", pipe, rate), best("reference", pipe, rate)
        r = _ratio(pp, ref)
        report.add(
            Row(w, f"pipelined, {WINDOW} in flight, calls/s", pp, ref, r, "ratio ≥ 1.00", r is not None and r >= 1.0)
        )
        pp, ref = best("poolport", lock, rate), best("reference", lock, rate)
        report.add(Row(w, "1 caller lock-step, calls/s", pp, ref, _ratio(pp, ref)))
        pp = best("poolport", lock, lambda p: p.p50_us, low=True)
        ref = best("reference", lock, lambda p: p.p50_us, low=True)
        r = _ratio(pp, ref)
        report.add(
            Row(
                w,
                "1 caller lock-step, latency p50 µs",
                pp,
                ref,
                r,
                "ratio ≤ 3.00",
                r is not None and r <= 3.0,
                fmt="{:,.1f}",
            )
        )
        pp = best("poolport", lock, lambda p: p.p99_us, low=True)
        ref = best("reference", lock, lambda p: p.p99_us, low=True)
        report.add(Row(w, "1 caller lock-step, latency p99 µs", pp, ref, _ratio(pp, ref), fmt="{:,.1f}"))
    if big:
        for size, spec in zip(BIG_SIZES, bigs):

            def mbps(ph: Phase, size: int = size) -> float:
                return ph.calls * size / ph.seconds / 1e6

            pp, ref = best("poolport", spec, mbps), best("reference", spec, mbps)
            bar, ok = ("—", None)
            if size == 10_000_000:
                bar, ok = "≥ 200 MB/s", pp is not None and pp >= 200
            report.add(
                Row(
                    f"binary echo {size // 1_000_000} MB, lock-step",
                    "MB/s (payload, once per round trip)",
                    pp,
                    ref,
                    _ratio(pp, ref),
                    bar,
                    ok,
                    fmt="{:,.1f}",
                )
            )


def run_stream(plan: Plan, workers: int, report: Report) -> None:
    """Streams beside calls, on the same pool: items/s and MB/s of a stream against calls/s
    and MB/s of calls with the same payloads; tiny calls' latency during a stream against
    without one. The reference server has no streams: every figure is poolport's."""
    (small_n, big_n), (small_b, small_w), (big_b, big_w) = plan.stream_items, STREAM_SMALL, STREAM_BIG
    small, big = f"stream:{small_n}:{small_b}:{small_w}", f"stream:{big_n}:{big_b}:{big_w}"
    pipe, lock = f"pipe:echo:{WINDOW}:{small_n}", f"lock:echo:{plan.lock_calls}"
    echo = f"big:{big_b}:{plan.big_calls[0]}"
    runs = []
    for r in range(plan.rounds):
        log(f"stream round {r + 1}/{plan.rounds}: poolport")
        runs.append(drive([pipe, small, lock, echo, big], poolport_cmd(workers)))

    def best(spec: str, get: Callable[[Phase], float | None], low: bool = False) -> float | None:
        return _best([get(res[spec]) for res in runs], low)

    def rate(ph: Phase) -> float:
        return ph.calls / ph.seconds

    def p50(ph: Phase) -> float | None:
        return ph.p50_us

    w = f"stream of {small_n:,} × {small_b} B items, window {small_w}"
    pp, ref = best(small, rate), best(pipe, rate)
    report.add(Row(w, "items/s (reference: pipelined tiny calls/s)", pp, ref, _ratio(pp, ref)))
    pp, ref = best(small, p50, low=True), best(lock, p50, low=True)
    report.add(
        Row(w, "tiny call latency p50 µs during it (reference: no stream)", pp, ref, _ratio(pp, ref), fmt="{:,.1f}")
    )
    w = f"stream of {big_n} × {big_b // 1_000_000} MB items, window {big_w}"
    pp, ref = best(big, lambda p: rate(p) * big_b / 1e6), best(echo, lambda p: rate(p) * big_b / 1e6)
    report.add(Row(w, "MB/s (reference: 1 MB echo calls, lock-step)", pp, ref, _ratio(pp, ref), fmt="{:,.1f}"))
    pp, ref = best(big, rate), best(echo, rate)
    report.add(Row(w, "items/s (reference: 1 MB echo calls/s)", pp, ref, _ratio(pp, ref), fmt="{:,.1f}"))


def compile_otp_app(dest: Path) -> Path:
    """Compile the poolport OTP application (``erlang/src``) into ``dest``; its ebin."""
    src = CHECKOUT / "erlang" / "src"
    erlc = shutil.which("erlc")
    if not src.is_dir():
        raise RuntimeError(f"{src} is missing: the cluster workload needs a source checkout")
    if erlc is None:
        raise RuntimeError("`erlc` not found: install Erlang/OTP (see README)")
    ebin = dest / "ebin"
    ebin.mkdir(parents=True)
    out = subprocess.run(
        [erlc, "-o", str(ebin), *sorted(str(p) for p in src.glob("*.erl"))], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        raise RuntimeError(f"erlc failed on {src}:\n{out.stdout}{out.stderr}")
    shutil.copy(src / "poolport.app.src", ebin / "poolport.app")
    return ebin


def run_cluster(plan: Plan, report: Report) -> None:
    serve = ["--workers", "1", "--module", "poolport.demo_handlers", "--log-level", "WARNING"]
    with tempfile.TemporaryDirectory(prefix="poolport-bench-") as tmp:
        ebin = compile_otp_app(Path(tmp))
        args = [
            str(ebin),
            str(BURN_STEPS),
            str(CALLERS),
            str(plan.cluster_calls),
            str(CLUSTER_NODES),
            str(plan.cluster_tiny),
            str(plan.cluster_rounds),
        ]
        log(
            f"cluster: 1..{CLUSTER_NODES} pool nodes (1 worker each) in a group, "
            f"burn({BURN_STEPS}) x {plan.cluster_calls} per node, {CALLERS} callers; "
            f"tiny calls x {plan.cluster_tiny}, pid and group"
        )
        t0 = time.monotonic()
        status, stdout, stderr, _ = run_escript(
            [str(CLUSTER_DRIVER), *args, "--", sys.executable, *serve], 1200, cwd=tmp
        )
        log(f"    (cluster driver {time.monotonic() - t0:.1f} s)")
    results: dict[str, Phase] = {}
    for line in stdout.splitlines():
        f = line.split()
        if f[:1] == ["result"] and len(f) == 6:
            results[f[1]] = Phase(int(f[3]), int(f[5]) / 1e6)
    expected = {"tiny:direct", "tiny:group", *(f"scale:{k}" for k in range(1, CLUSTER_NODES + 1))}
    if status != 0 or "done" not in stdout.split() or set(results) != expected:
        why = "timed out" if status is None else f"exit {status}"
        raise RuntimeError(f"cluster driver failed ({why}):\n{stdout[-2000:]}{stderr[-3000:]}")
    for spec, ph in sorted(results.items()):
        log(f"    {spec}: {ph.calls / ph.seconds:,.1f} calls/s")
    w = f"scale-out burn({BURN_STEPS}), {CALLERS} callers, {{group, G}}, 1 worker per node"
    one = results["scale:1"].calls / results["scale:1"].seconds
    for k in range(1, CLUSTER_NODES + 1):
        ph = results[f"scale:{k}"]
        rate = ph.calls / ph.seconds
        report.add(
            Row(
                w,
                f"{k} node{'s' if k > 1 else ''}, calls/s (reference: 1 node)",
                rate,
                one,
                _ratio(rate, one),
                fmt="{:,.1f}",
            )
        )
    direct, group = results["tiny:direct"], results["tiny:group"]
    us_direct = direct.seconds * 1e6 / direct.calls
    us_group = group.seconds * 1e6 / group.calls
    report.add(
        Row(
            'tiny echo({I, <<"abc">>}) to a pool node, 1 caller lock-step',
            "µs per call, {group, G} (reference: the pool's pid)",
            us_group,
            us_direct,
            _ratio(us_group, us_direct),
            fmt="{:,.1f}",
        )
    )


def realistic_term() -> Any:
    """A nested term like an API's reply: maps with atom keys, lists, binaries, ints, floats."""
    from poolport.codec.terms import Atom as A

    rng = random.Random(7)
    items = []
    for i in range(40):
        items.append(
            {
                A("id"): i * 7919,
                A("name"): b"user-%d" % i,
                A("email"): b"user%d@example.com" % i,
                A("score"): rng.random() * 100,
                A("active"): i % 3 != 0,
                A("roles"): [A("admin"), A("editor")] if i % 5 == 0 else [A("viewer")],
                A("created"): (2024, 1 + i % 12, 1 + i % 28),
                A("balance"): -i * 1_000_003,
                A("avatar"): rng.randbytes(32),
                A("counters"): [rng.randrange(1000) for _ in range(5)] + [70_000 + i],
            }
        )
    return {
        A("status"): A("ok"),
        A("page"): 3,
        A("total"): 1_234_567_890_123,
        A("took_ms"): 12.5,
        A("items"): items,
        A("tags"): [b"alpha", b"beta", b"gamma"],
    }


def _time_best(fn: Callable[[], Any], min_time: float) -> Callable[[], float]:
    """A timeit-style timer: calibrated loop count; each call returns seconds per op."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time / 5 or n >= 1 << 20:
            break
        n *= 2
    loops = max(1, int(n * min_time / max(dt, 1e-9)))

    def once() -> float:
        gc_was = gc.isenabled()
        gc.disable()
        try:
            t0 = time.perf_counter()
            for _ in range(loops):
                fn()
            return (time.perf_counter() - t0) / loops
        finally:
            if gc_was:
                gc.enable()

    return once


def _codec_libs() -> dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]] | str]:
    from poolport.codec import etf

    libs: dict[str, Any] = {"poolport": (etf.encode, etf.decode)}
    try:
        erlang = importlib.import_module("erlang")  # erlang_py

        libs["erlang_py"] = (erlang.term_to_binary, erlang.binary_to_term)
    except (ImportError, AttributeError):  # AttributeError: the repo's erlang/ dir, not erlang_py
        libs["erlang_py"] = "not installed"
    try:
        erlpack = importlib.import_module("erlpack")

        libs["erlpack"] = (erlpack.pack, erlpack.unpack)
    except (ImportError, AttributeError):
        libs["erlpack"] = "not installed"
    return libs


def run_codec(plan: Plan, report: Report) -> None:
    from poolport.codec import etf

    libs = _codec_libs()
    cases = [("nested term", realistic_term()), ("1 MB binary", random.Random(1).randbytes(1_000_000))]
    for case, term in cases:
        data = etf.encode(term)
        timers: dict[tuple[str, str], Callable[[], float]] = {}
        broken: dict[str, str] = {}
        for name, lib in libs.items():
            if isinstance(lib, str):
                continue
            enc, dec = lib
            try:
                native = dec(data)  # the library's own form of the term
                again = enc(native)
                if etf.decode(again) != etf.decode(data):
                    raise ValueError("re-encoded term differs")
            except Exception as exc:  # noqa: BLE001 - shown in the table
                broken[name] = f"error: {type(exc).__name__}"
                log(f"codec {case}: {name} cannot round-trip it: {exc!r}")
                continue
            timers[(name, "encode")] = _time_best(functools.partial(enc, native), plan.codec_min_time)
            timers[(name, "decode")] = _time_best(functools.partial(dec, data), plan.codec_min_time)
        log(
            f"codec {case} ({len(data):,} bytes): {plan.codec_repeats} interleaved repeats "
            f"of {', '.join(sorted({k[0] for k in timers}))}"
        )
        best: dict[tuple[str, str], float] = {}
        for _ in range(plan.codec_repeats):
            for key, timer in timers.items():
                t = timer()
                best[key] = min(best.get(key, t), t)

        def figure(name: str, op: str) -> float | str:
            lib = libs[name]
            if isinstance(lib, str):
                return lib
            if name in broken:
                return broken[name]
            secs = best[(name, op)]
            return len(data) / secs / 1e6 if case.endswith("binary") else 1 / secs

        unit = "MB/s" if case.endswith("binary") else "terms/s"
        fmt = "{:,.1f}" if unit == "MB/s" else "{:,.0f}"
        for op in ("encode", "decode"):
            pp = figure("poolport", op)
            for other, with_bar in (("erlang_py", True), ("erlpack", False)):
                ref = figure(other, op)
                r = pp / ref if isinstance(pp, float) and isinstance(ref, float) else None
                bar, ok = "—", None
                if with_bar:
                    bar, ok = "ratio ≥ 1.00", (None if r is None else r >= 1.0)
                report.add(Row(f"codec {case} vs {other}", f"{op}, {unit}", pp, ref, r, bar, ok, fmt=fmt))


# --------------------------------------------------------------------------- main


def otp_release() -> str:
    erl = shutil.which("erl")
    if erl is None:
        return "not found"
    try:
        out = subprocess.run(
            [erl, "-noshell", "-eval", 'io:format("~s",[erlang:system_info(otp_release)]),halt().'],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def render(report: Report, header: str, notes: list[str]) -> str:
    cols = ["workload", "metric", "poolport", "reference", "ratio", "bar", "result"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|---|---|---:|---:|---:|---|---|"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in report.rows]
    lines.append("")
    lines += notes
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "python -m poolport.tools.bench") -> int:
    """``prog`` is how the user started it, for ``--help`` (``poolport bench`` from the CLI)."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="poolport against the single-process port a user would otherwise write (see benchmarks/README.md)",
    )
    ap.add_argument("--quick", action="store_true", help="small counts (for tests); figures are rough")
    ap.add_argument(
        "--workers", type=int, default=None, help="poolport workers for the N-worker figures (default: CPU cores)"
    )
    ap.add_argument(
        "--only", default=None, help=f"comma-separated workloads among {','.join(WORKLOADS)} (default: all)"
    )
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = ap.parse_args(argv)

    only = set(WORKLOADS)
    if args.only:
        only = {w.strip() for w in args.only.split(",") if w.strip()}
    unknown = only - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose among {', '.join(WORKLOADS)}")
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    if workers < 1:
        ap.error("--workers must be at least 1")
    plan = QUICK if args.quick else FULL

    otp = otp_release()
    pyver = f"{platform.python_implementation()} {platform.python_version()}"
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = (
        f"poolport benchmark{' (--quick: rough figures)' if args.quick else ''}: "
        f"{cores} CPU cores, {pyver}, Erlang/OTP {otp}, {when}; "
        f"poolport with {workers} worker(s), {codec_name()} codec, idle_spin_us "
        f"{Config().idle_spin_us}; load average at start {_load()}"
    )
    log(header)
    report = Report()
    steps: list[tuple[str, Callable[[], None]]] = []
    if "cpu" in only:
        steps.append(("cpu", lambda: run_cpu(plan, workers, report)))
    if "tiny" in only or "big" in only:
        steps.append(("tiny/big", lambda: run_endtoend(plan, workers, "tiny" in only, "big" in only, report)))
    if "stream" in only:
        steps.append(("stream", lambda: run_stream(plan, workers, report)))
    if "codec" in only:
        steps.append(("codec", lambda: run_codec(plan, report)))
    if "cluster" in only:
        steps.append(("cluster", lambda: run_cluster(plan, report)))
    if "client" in only:
        steps.append(("client", lambda: run_client(plan, workers, report)))
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - reported, the other workloads still run
            report.errors.append(f"{name}: {exc}")
            log(f"{name} FAILED to run: {exc}")

    failed = [f"{r.workload}: {r.metric}" for r in report.rows if r.ok is False]
    passed = sum(1 for r in report.rows if r.ok)
    rounds = f"best of {plan.rounds} interleaved rounds" if plan.rounds > 1 else "1 round"
    notes = [
        "poolport = `python -m poolport serve --workers N`; reference = `python -m "
        "poolport.tools.bench_reference`, a single-process port (read, decode, call, encode, write in "
        "one loop; buffered reads, batched writes), same handlers (`poolport.demo_handlers`). "
        "Both driven by the same Erlang VM load generator (`poolport/tools/bench_driver.escript`) "
        f"through a real `{{packet, 4}}` port; tiny/big: {rounds} "
        "(reference, poolport, ...), best figure of each side; cpu: reference, 1 worker and N "
        f"workers in {plan.cpu_rounds} round(s), best of each. stream rows: poolport only "
        "(the reference has no streams), a stream against calls of the same payload on the "
        "same pool, and tiny calls timed one at a time during the stream.",
        "ratio = poolport ÷ reference (for latency lower is better, elsewhere higher is "
        "better); codec rows: the reference is the library named in the workload, "
        f"best of {plan.codec_repeats} timeit-style loops each.",
        "cluster rows (the poolport OTP application, `poolport/tools/bench_cluster.escript`): "
        f"pool nodes are Erlang nodes on this host, {CLUSTER_NODES} at most, 1 worker each, "
        "called through `{group, G}` from a node without a pool; scale-out: best of "
        f"{plan.cluster_rounds} run(s) per node count, reference = 1 node, so the ratio is "
        f"the speed-up (at most the {os.cpu_count() or 1} cores of this host); tiny: "
        f"best of {plan.cluster_rounds} interleaved runs (the first of each pair alternates), "
        "reference = the same calls to the pool's pid.",
        "client rows (`poolport/tools/bench_client.escript`): one VM, a raw port and a pool, each with "
        "its own `poolport serve` started with the same arguments; best of "
        f"{plan.client_rounds} round(s); the raw port is the ceiling a client on this server can reach.",
        f"Load average at the end: {_load()} (1, 5, 15 min; above {cores} means other work shared the cores).",
        f"Bars: {passed} passed, {len(failed)} failed" + (": " + "; ".join(failed) if failed else "") + ".",
    ]
    notes += [f"ERROR (not measured): {e.splitlines()[0]}" for e in report.errors]
    text = render(report, header, notes)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        log(f"wrote {args.out}")
    for e in report.errors:
        print(e, file=sys.stderr)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
