"""End to end with a real Erlang VM: `erl`/`escript` open a port to `poolport serve`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


from poolport.tools.demo import drive
from portclient import ROOT, SEED_DIR
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ERL = shutil.which("erl")
ERLC = shutil.which("erlc")


def test_erlang_is_installed():
    """CI installs Erlang/OTP; without it the end-to-end tests below would prove nothing."""
    assert ERL and ERLC and shutil.which("escript"), "Erlang/OTP (erl, erlc, escript) must be on PATH"


def test_thousands_of_pipelined_calls_come_back_in_order_with_their_own_answer():
    calls, _seconds, pids = drive(
        "echo",
        5000,
        0,
        ["--workers", "2", "--module", "poolport.demo_handlers"],
    )
    assert calls == 5000
    assert pids == 2


def test_cpu_heavy_calls_spread_over_all_workers():
    calls, _seconds, pids = drive("burn", 20, 20_000, ["--workers", "2", "--module", "poolport.demo_handlers"])
    assert (calls, pids) == (20, 2)


def test_seed_porttest_erl_unchanged_talks_to_poolport_in_bare_mode(tmp_path):
    shutil.copytree(SEED_DIR, tmp_path / "seed")
    work = tmp_path / "seed"
    subprocess.run([ERLC, "porttest.erl"], cwd=work, check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    script = (
        "porttest:start(), timer:sleep(300), porttest:twice(21), porttest:sum(1, 2), "
        'porttest:hello("World"), porttest:hello(<<"Erlang">>), porttest:stop(), halt().'
    )
    proc = subprocess.run(
        [ERL, "-noshell", "-eval", script], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    received = re.findall(r"received: '(.*)' <", proc.stdout)
    assert received == ["42", "3", '<<"Hello, World">>', '<<"Hello, Erlang">>'], proc.stdout + proc.stderr
