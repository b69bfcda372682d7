"""Project metadata that must not drift: one version, one licence, readable help texts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import poolport

ROOT = Path(__file__).resolve().parent.parent


def _poolport(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "poolport", *args], capture_output=True, text=True, check=True).stdout


def test_version_is_written_once_and_everything_agrees() -> None:
    """pyproject reads poolport.__version__; the Erlang app, the CLI and the changelog match it."""
    version = poolport.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    assert not re.search(r'^version\s*=\s*"', pyproject, re.M), "pyproject.toml writes the version itself"
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert 'version = { attr = "poolport.__version__" }' in pyproject
    app_src = (ROOT / "erlang" / "src" / "poolport.app.src").read_text()
    assert re.search(r'\{vsn,\s*"([^"]+)"\}', app_src)[1] == version
    assert _poolport("--version").strip() == f"poolport {version}"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(r"^## (\S+)", changelog, re.M)[1] == version


def test_license_is_apache_2_everywhere() -> None:
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert "Apache License\n                           Version 2.0" in (ROOT / "LICENSE").read_text()
    assert '{licenses, ["Apache-2.0"]}' in (ROOT / "erlang" / "src" / "poolport.app.src").read_text()


def test_help_texts_are_plain_and_name_the_command() -> None:
    """No reST markup in --help; ``poolport bench --help`` names ``poolport bench``."""
    top = _poolport("--help")
    assert "usage: poolport " in top
    for args in (["--help"], ["serve", "--help"], ["check", "--help"], ["demo", "--help"], ["bench", "--help"]):
        assert "``" not in _poolport(*args), f"reST markup in poolport {' '.join(args)}"
    assert _poolport("bench", "--help").startswith("usage: poolport bench ")
