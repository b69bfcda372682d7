"""Every misuse of the command line ends with exit status 2 and a one-line message, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e]

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
    done = subprocess.run(
        [sys.executable, "-m", "poolport", *argv], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("poolport"), done.stderr


def _check(tmp_path, yaml: str, *flags: str) -> subprocess.CompletedProcess:
    (tmp_path / "p.yaml").write_text(yaml)
    return subprocess.run(
        [sys.executable, "-m", "poolport", "check", "--config", str(tmp_path / "p.yaml"), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_check_says_it_checked_the_schema_only_unless_asked_to_import(tmp_path):
    done = _check(tmp_path, "modules: [no_such_module_here]\n")
    assert done.returncode == 0 and "schema only" in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("files", "yaml", "expected"),
    [
        pytest.param(
            {}, "modules: [hanlders]\npython_path: [h]\n", "cannot import allowlisted module 'hanlders'", id="typo"
        ),
        pytest.param(
            {"handlers.py": "def f(:\n"}, "modules: [handlers]\npython_path: [h]\n", "SyntaxError", id="syntax-error"
        ),
        pytest.param(
            {"handlers.py": "def f(): pass\n"},
            "modules: [handlers]\npython_path: [missing]\n",
            "python_path entry",
            id="missing-python-path",
        ),
        pytest.param(
            {"handlers.py": "raise SystemExit(3)\n"},
            "modules: [handlers]\npython_path: [h]\n",
            "SystemExit",
            id="exits-at-import",
        ),
    ],
)
def test_check_import_finds_what_a_worker_would_not_import(tmp_path, files, yaml, expected):
    (tmp_path / "h").mkdir()
    for name, text in files.items():
        (tmp_path / "h" / name).write_text(text)
    done = _check(tmp_path, yaml, "--import")
    assert done.returncode == 1, done.stderr
    assert expected in done.stderr, done.stderr


def test_check_reports_its_problems_after_the_config_on_one_stream(tmp_path):
    """The OTP client reads `check --init` with stderr into stdout and keeps the last lines:
    the problem must come after the config dump even when stdout is block-buffered."""
    (tmp_path / "p.yaml").write_text("modules: [no_such_module_here]\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, "-m", "poolport", "check", "--config", str(tmp_path / "p.yaml"), "--import"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert done.returncode == 1
    assert "No module named 'no_such_module_here'" in done.stdout.strip().splitlines()[-1], done.stdout


def test_check_init_runs_worker_init_and_reports_its_failure(tmp_path):
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "handlers.py").write_text(
        "def setup(x):\n    if x == 'bad':\n        raise RuntimeError('model file missing')\n    return x\n"
    )
    base = "modules: [handlers]\npython_path: [h]\nworker_init: 'handlers:setup'\n"
    good = _check(tmp_path, base + "worker_init_args: [ok]\n", "--init")
    assert good.returncode == 0 and "imported handlers; worker_init 'handlers:setup' ran" in good.stderr, good.stderr
    bad = _check(tmp_path, base + "worker_init_args: [bad]\n", "--init")
    assert bad.returncode == 1 and "RuntimeError: model file missing" in bad.stderr, bad.stderr
    assert _check(tmp_path, base + "worker_init_args: [bad]\n", "--import").returncode == 0  # not run
