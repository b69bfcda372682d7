"""``poolport demo``: an Erlang VM calls a CPU-heavy Python function in parallel.

Runs the same pipelined load through one port twice, with 1 worker and with N,
and prints calls/s and the speed-up. Needs ``escript`` (Erlang/OTP) on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).with_name("driver.escript")


def drive(mode: str, calls: int, arg: int, serve_args: list[str], timeout: float = 600) -> tuple[int, float, int]:
    """Run the Erlang driver; returns (calls, seconds, distinct worker pids seen)."""
    escript = shutil.which("escript")
    if escript is None:
        raise SystemExit("poolport: `escript` not found; install Erlang/OTP (see README)")
    proc = subprocess.run(
        [escript, str(DRIVER), mode, sys.executable, str(calls), str(arg), "--", *serve_args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    fields = last[0].split()
    if proc.returncode != 0 or not fields or fields[0] != "ok":
        raise RuntimeError(f"Erlang driver failed ({proc.returncode}): {proc.stdout}{proc.stderr[-3000:]}")
    return int(fields[1]), int(fields[2]) / 1e6, int(fields[3])


def run_demo(calls: int = 200, steps: int = 200_000, workers: int | None = None) -> int:
    workers = workers or os.cpu_count() or 1
    print(f"poolport demo: Erlang sends {calls} calls of burn({steps}) at once through one port", file=sys.stderr)
    rows = []
    for n in sorted({1, workers}):
        print(f"  measuring {n} worker(s)...", file=sys.stderr, flush=True)
        done, seconds, seen = drive(
            "burn", calls, steps, ["--workers", str(n), "--module", "poolport.demo_handlers", "--log-level", "WARNING"]
        )
        rows.append((n, seen, done / seconds))
    base = rows[0][2]
    print("\n| workers | worker pids seen | calls/s | speed-up |\n|---:|---:|---:|---:|")
    for n, seen, rate in rows:
        print(f"| {n} | {seen} | {rate:,.1f} | {rate / base:.2f}x |")
    print(f"\n{os.cpu_count()} CPU core(s); Python {sys.version.split()[0]}")
    return 0
