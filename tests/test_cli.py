"""Every misuse of the command line ends with exit status 2 and a one-line message, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

MISUSES = [
    pytest.param(["check", "--module", "bad-name"], id="module-name-with-a-dash"),
    pytest.param(["check", "--module", "1abc"], id="module-name-with-a-digit-first"),
    pytest.param(["check", "--workers", "0"], id="zero-workers"),
    pytest.param(["check", "--workers", "many"], id="workers-not-a-number"),
    pytest.param(["check", "--max-in-flight-bytes", "0"], id="zero-byte-budget"),
    pytest.param(["check", "--config", "/nonexistent/poolport.yaml"], id="missing-config"),
    pytest.param(["serve", "--packet", "3"], id="packet-3"),
    pytest.param(["serve", "--timeout-ms", "soon"], id="timeout-not-a-number"),
    pytest.param(["serve", "--atom-encoding", "ascii"], id="unknown-atom-encoding"),
    pytest.param(["demo", "--workers", "0"], id="demo-zero-workers"),
    pytest.param(["demo", "--calls", "-5"], id="demo-negative-calls"),
    pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param([], id="no-command"),
]


@pytest.mark.parametrize("argv", MISUSES)
def test_cli_misuse_is_status_2_with_a_message(argv):
    done = subprocess.run([sys.executable, "-m", "poolport", *argv], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("poolport"), done.stderr
