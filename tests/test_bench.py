"""The benchmark runs end to end (--quick) and prints every row; no timing thresholds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poolport.tools import bench_reference as ref
from poolport.codec import etf
from poolport.codec.terms import Atom

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

needs_erlang = pytest.mark.skipif(
    shutil.which("escript") is None or shutil.which("erl") is None, reason="Erlang/OTP (escript, erl) not installed"
)

COLUMNS = ["workload", "metric", "poolport", "reference", "ratio", "bar", "result"]
NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def table_rows(text: str) -> list[list[str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    assert lines, text
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    assert set(lines[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set()
    rows = []
    for ln in lines[2:]:
        # split on " | " (cells may contain "|" only inside the workload text, not with spaces)
        cells = [c.strip() for c in ln.strip().strip("|").split(" | ")]
        assert len(cells) == len(COLUMNS), ln
        rows.append(cells)
    return rows


def number(cell: str) -> float:
    assert NUMBER.match(cell), cell
    return float(cell.replace(",", ""))


def test_reference_codec_round_trips_what_the_workloads_send():
    term = {
        Atom("k"): [1, 255, 256, -1, 2**31, -(2**70), 2.5, b"", b"abc", "text"],
        Atom("t"): (Atom("ok"), [], [1, 2, 3], True, False, None),
        b"bin": {},
    }
    data = etf.encode(term)
    back = ref.decode(data)
    # str encodes as a binary in both codecs; everything else is the same term
    expected = dict(term)
    expected[Atom("k")] = term[Atom("k")][:-1] + [b"text"]
    assert etf.decode(ref.encode(back)) == expected
    assert ref.decode(etf.encode(Atom("é" * 200), atom_encoding="utf8")) == "é" * 200  # ATOM_UTF8_EXT (400 bytes)


def _frame(term) -> bytes:
    body = etf.encode(term)
    return len(body).to_bytes(4, "big") + body


def _read_frames(data: bytes) -> list:
    out, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        out.append(etf.decode(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


def test_reference_server_over_pipes():
    """The reference answers pipelined requests in order, big frames included."""
    big = os.urandom(3_000_000)
    reqs = [(Atom("call"), Atom("poolport.demo_handlers"), Atom("echo"), [(i, b"abc")]) for i in range(300)]
    reqs.insert(100, (Atom("call"), Atom("poolport.demo_handlers"), Atom("echo"), [big]))
    reqs.append((Atom("call"), Atom("poolport.demo_handlers"), Atom("burn"), [1000]))
    reqs.append((Atom("call"), Atom("$poolport"), Atom("info"), []))
    reqs.append((Atom("call"), Atom("poolport.demo_handlers"), Atom("burn"), [Atom("x")]))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "poolport.tools.bench_reference"],
        input=b"".join(_frame(r) for r in reqs),
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    replies = _read_frames(proc.stdout)
    assert len(replies) == len(reqs)
    from poolport.demo_handlers import burn

    expected = [(Atom("reply"), (i, b"abc")) for i in range(300)]
    expected.insert(100, (Atom("reply"), big))
    expected.append((Atom("reply"), burn(1000)))
    assert replies[:-2] == expected
    assert replies[-2][1][Atom("workers")] == 1
    assert replies[-1][0] == Atom("error")


@needs_erlang
def test_bench_quick_prints_every_row(tmp_path):
    out = tmp_path / "bench.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "poolport.tools.bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out.read_text(encoding="utf-8") == proc.stdout
    header = proc.stdout.splitlines()[0]
    assert re.search(r"\d+ CPU cores, CPython \d+\.\d+\.\d+, Erlang/OTP \d+", header), header
    assert "[bench" in proc.stderr  # progress lines

    rows = table_rows(proc.stdout)
    keys = [(r[0], r[1]) for r in rows]
    workers = os.cpu_count() or 1
    cpu = "CPU burn(200000), 50 callers"
    tiny = 'tiny echo({I, <<"abc">>})'
    burst = "cold burst: 16 x burn(200000) sent at once to a fresh pool"
    mix = "mix: 16 x burn(200000), each after 100 tiny echo, at once"
    client = 'tiny echo({I, <<"abc">>}) through poolport:call/4'
    expected = [
        (cpu, "1 worker, calls/s"),
        (cpu, f"{workers} workers, calls/s"),
        (cpu, f"scaling: {workers}-worker ÷ ({workers} × 1-worker)"),
        (burst, f"{workers} workers, calls/s (reference: 1 worker)"),
        (burst, f"scaling: {workers}-worker ÷ ({workers} × 1-worker)"),
        (mix, f"{workers} workers, burn calls/s (reference: 1 worker)"),
        (mix, f"scaling: {workers}-worker ÷ ({workers} × 1-worker)"),
        (tiny, "pipelined, 512 in flight, calls/s"),
        (tiny, "1 caller lock-step, calls/s"),
        (tiny, "1 caller lock-step, latency p50 µs"),
        (tiny, "1 caller lock-step, latency p99 µs"),
        ("binary echo 1 MB, lock-step", "MB/s (payload, once per round trip)"),
        ("binary echo 10 MB, lock-step", "MB/s (payload, once per round trip)"),
    ]
    small, big = "stream of 10,000 × 16 B items, window 256", "stream of 20 × 1 MB items, window 8"
    expected += [
        (small, "items/s (reference: pipelined tiny calls/s)"),
        (small, "tiny call latency p50 µs during it (reference: no stream)"),
        (big, "MB/s (reference: 1 MB echo calls, lock-step)"),
        (big, "items/s (reference: 1 MB echo calls/s)"),
    ]
    for case, unit in (("nested term", "terms/s"), ("1 MB binary", "MB/s")):
        for op in ("encode", "decode"):
            for lib in ("erlang_py", "erlpack"):
                expected.append((f"codec {case} vs {lib}", f"{op}, {unit}"))
    scale = "scale-out burn(200000), 50 callers, {group, G}, 1 worker per node"
    expected += [
        (scale, "1 node, calls/s (reference: 1 node)"),
        (scale, "2 nodes, calls/s (reference: 1 node)"),
        (scale, "3 nodes, calls/s (reference: 1 node)"),
        (
            'tiny echo({I, <<"abc">>}) to a pool node, 1 caller lock-step',
            "µs per call, {group, G} (reference: the pool's pid)",
        ),
        (client, "50 callers, calls/s (reference: raw port, 512 pipelined)"),
        (client, "500 callers, calls/s (reference: raw port, 512 pipelined)"),
        (client, "50 callers, calls/s (reference: raw port, 50 in flight)"),
        (client, "1 caller lock-step, calls/s (reference: raw port lock-step)"),
        (client, "1 caller lock-step, latency p50 µs (reference: raw port)"),
        (client, "1 caller lock-step, latency p99 µs (reference: raw port)"),
        (client, "pool process memory after 100,000 more calls from 50 callers, bytes (reference: before)"),
    ]
    assert sorted(keys) == sorted(expected)

    by_key = dict(zip(keys, rows))
    for key, (_, _, pp, refc, ratio, bar, result) in by_key.items():
        assert number(pp) > 0, key
        if key[1].startswith("scaling"):
            assert refc == "—" and ratio == "—"
        elif refc == "not installed":  # an optional codec library
            assert ratio == "—" and result == "—"
            continue
        else:
            assert number(refc) > 0, key
            assert ratio.endswith("×") and number(ratio[:-1]) > 0, key
        if bar == "—":
            assert result == "—", key
        else:
            assert result in ("PASS", "**FAIL**"), key
    # the bars of issue 7 are all in the table
    bars = {k: by_key[k][5] for k in by_key}
    assert bars[(cpu, f"scaling: {workers}-worker ÷ ({workers} × 1-worker)")] == "≥ 0.90"
    assert bars[(burst, f"scaling: {workers}-worker ÷ ({workers} × 1-worker)")] == "≥ 0.90"
    assert bars[(mix, f"scaling: {workers}-worker ÷ ({workers} × 1-worker)")] == "≥ 0.90"
    assert bars[(client, "50 callers, calls/s (reference: raw port, 512 pipelined)")] == "ratio ≥ 0.50"
    assert bars[(client, "1 caller lock-step, latency p50 µs (reference: raw port)")] == "ratio ≤ 1.30"
    assert bars[(tiny, "pipelined, 512 in flight, calls/s")] == "ratio ≥ 1.00"
    assert bars[(tiny, "1 caller lock-step, latency p50 µs")] == "ratio ≤ 3.00"
    big10 = ("binary echo 10 MB, lock-step", "MB/s (payload, once per round trip)")
    assert bars[big10] == "≥ 200 MB/s"
    for op, unit in (("encode", "terms/s"), ("decode", "terms/s")):
        assert bars[("codec nested term vs erlang_py", f"{op}, {unit}")] == "ratio ≥ 1.00"
    # the PASS/FAIL column agrees with the numbers it shows
    for key, (_, _, pp, refc, ratio, bar, result) in by_key.items():
        if bar == "—" or "not installed" in (pp, refc):
            continue
        value = number(ratio[:-1]) if bar.startswith("ratio") else number(pp)
        limit = float(bar.split()[-1]) if bar.startswith("ratio") else float(bar.split()[1])
        # the cell is rounded to 2 decimals; only check clear cases
        if abs(value - limit) > 0.01:
            ok = value <= limit if "≤" in bar else value >= limit
            assert result == ("PASS" if ok else "**FAIL**"), key


def test_bench_rejects_unknown_workload(capsys):
    from poolport.tools import bench

    with pytest.raises(SystemExit):
        bench.main(["--only", "nope"])
    assert "unknown workload" in capsys.readouterr().err
