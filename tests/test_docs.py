"""Every fenced code block of the user docs runs here, extracted from the Markdown itself.

A block says how it runs in an HTML comment on the line(s) just above it (invisible
on GitHub), e.g. ``<!-- doc-test: erl cwd=examples/quickstart -->``. A block that
is neither ```` ```text ```` nor marked fails ``test_every_block_is_text_or_marked``,
so a new snippet cannot be added without being run. Modes:

* ``erl`` — Erlang shell input, evaluated form by form (``tests/erl/doc_shell.erl``)
  in a real node started by ``scripts/erl``: the poolport app on the code path and the
  checkout's Python, exactly what the docs tell a newcomer to use; a badmatch fails.
* ``erl-module`` — function definitions: compiled inside a module.
* ``erlang-config`` — ``file:consult/1`` terms (``sys.config``, ``rebar.config``).
* ``sh`` — run by bash, ``.venv/bin`` first on ``PATH``. ``except=CMD`` leaves out a
  command that is the test suite itself; it must be one ``.ci/run`` or ``scripts/test`` runs.
* ``python`` — run by this interpreter; ``server=PORT`` runs the doc's ``server`` block
  listening on that port meanwhile.
* ``server port=PORT`` — a command that serves on 127.0.0.1:PORT until stopped (e.g. a
  socat bridge): alone it must start listening; it then runs for its ``python`` clients.
* ``yaml`` — parsed; ``poolport-config`` — validated as a poolport configuration.
* ``elixir`` — run by ``elixir`` with the app on the code path; ``elixir-syntax`` — parsed.
* ``excerpt=FILE`` — the block is an excerpt of that file of the repository (the
  file itself is what the other snippets or tests run).
* ``cwd=DIR`` (relative to the repository; ``cwd=TMP``: a fresh empty directory),
  ``needs=docker|elixir|socat|openssl``: a visible skip
  with the reason where that is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "erlang" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MODES = {
    "erl",
    "erl-module",
    "erlang-config",
    "sh",
    "python",
    "yaml",
    "poolport-config",
    "elixir",
    "elixir-syntax",
    "server",
}
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:(?P<spec>.*?)-->\s*$")
TIMEOUT = 300


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    mode: str | None = None
    attrs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        doc = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc
        return f"{doc}:{self.line}"

    def attr(self, key: str, default: str | None = None) -> str | None:
        return self.attrs.get(key, [default])[-1]


def parse_marker(spec: str, block: Block) -> None:
    """``mode key=value ...`` (values may be shell-quoted) into the block."""
    for word in shlex.split(spec):
        key, eq, value = word.partition("=")
        if eq:
            block.attrs.setdefault(key, []).append(value)
        else:
            block.mode = word


def blocks_of(doc: Path) -> list[Block]:
    """The fenced blocks of one Markdown file, with the markers just above them."""
    lines = doc.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1 : end]]
        block = Block(doc, i + 1, m["lang"], "\n".join(body) + "\n")
        j = i - 1
        while j >= 0 and (marker := MARKER.match(lines[j])):
            parse_marker(marker["spec"], block)
            j -= 1
        found.append(block)
        i = end + 1
    return found


ALL_BLOCKS = [b for doc in DOCS for b in blocks_of(doc)]
CODE_BLOCKS = [b for b in ALL_BLOCKS if b.lang != "text"]


def test_docs_have_code_blocks() -> None:
    """The parser finds the snippets (guards against a parser that silently finds none)."""
    assert len(CODE_BLOCKS) >= 20
    assert any(b.mode == "erl" for b in CODE_BLOCKS)


def test_parser_reads_markers_and_indented_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "1. Step:\n\n   <!-- doc-test: sh cwd=a except='b c' -->\n   ```sh\n   echo hi\n   ```\n```text\nx\n```\n"
    )
    sh, text = blocks_of(doc)
    assert (sh.mode, sh.attrs, sh.text, sh.line) == ("sh", {"cwd": ["a"], "except": ["b c"]}, "echo hi\n", 4)
    assert (text.lang, text.mode) == ("text", None)


def test_excerpt_and_except_are_checked(tmp_path: Path) -> None:
    """An excerpt must match its file; an ``except``ed command must be one CI runs anyway."""
    doc = tmp_path / "x.md"
    doc.write_text(
        "<!-- doc-test: excerpt=CHANGELOG.md -->\n```text\n# Changelog\n```\n"
        "<!-- doc-test: excerpt=CHANGELOG.md -->\n```text\n# Change log\n```\n"
        "<!-- doc-test: sh except=frobnicate -->\n```sh\nfrobnicate\n```\n"
    )
    good, bad, sh = blocks_of(doc)
    check_excerpt(good)
    with pytest.raises(AssertionError, match="not an excerpt"):
        check_excerpt(bad)
    with pytest.raises(AssertionError, match="not run by"):
        run_sh(sh, tmp_path)


def test_every_block_is_text_or_marked() -> None:
    """A snippet nobody runs rots: mark it with how it runs, or make it ```text."""
    bad = [f"{b.id} ```{b.lang}" for b in CODE_BLOCKS if b.mode not in MODES and "excerpt" not in b.attrs]
    assert not bad, (
        "fenced blocks neither ```text nor marked <!-- doc-test: MODE --> "
        "(the modes are listed at the top of tests/test_docs.py): " + ", ".join(bad)
    )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(argv: list[str], block: Block, *, env: dict[str, str] | None = None, tmp_path: Path | None = None) -> None:
    """Run in the block's ``cwd`` with an empty stdin; a failure shows the snippet's place and output."""
    cwd = tmp_path if block.attr("cwd") == "TMP" and tmp_path else ROOT / (block.attr("cwd") or ".")
    proc = subprocess.run(argv, cwd=cwd, env=env or _env(), input="", text=True, capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, (
        f"{block.id} (cwd {cwd}) exited {proc.returncode}\n--- snippet\n{block.text}"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )


@pytest.fixture(scope="module")
def doc_shell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/erl/doc_shell.erl compiled into a temporary directory."""
    out = tmp_path_factory.mktemp("doc_shell")
    subprocess.run(["erlc", "-o", str(out), str(ROOT / "tests" / "erl" / "doc_shell.erl")], check=True)
    return out


def _app_libs() -> str:
    """The compiled poolport app (``scripts/erl`` compiles it; so does this, for Elixir)."""
    subprocess.run(["rebar3", "compile"], cwd=ROOT / "erlang", check=True, capture_output=True)
    return str(ROOT / "erlang" / "_build" / "default" / "lib")


def run_erl(block: Block, tmp_path: Path, doc_shell: Path) -> None:
    snippet = tmp_path / "snippet.erl"
    snippet.write_text(block.text)
    _run(
        [str(ROOT / "scripts" / "erl"), "-noshell", "-pa", str(doc_shell), "-run", "doc_shell", "main", str(snippet)],
        block,
    )


def run_erl_module(block: Block, tmp_path: Path) -> None:
    source = tmp_path / "doc_snippet.erl"
    source.write_text("-module(doc_snippet).\n-compile([export_all, nowarn_export_all]).\n" + block.text)
    _run(["erlc", "-Werror", "-pa", f"{_app_libs()}/poolport/ebin", "-o", str(tmp_path), str(source)], block)


def run_erlang_config(block: Block, tmp_path: Path) -> None:
    config = tmp_path / "snippet.config"
    config.write_text(block.text)
    code = f'{{ok, _}} = file:consult("{config}"), halt().'
    _run(["erl", "-noshell", "-eval", code], block)


def run_sh(block: Block, tmp_path: Path) -> None:
    """bash -e; an ``except``ed command must be the suite's own (so CI runs it anyway)."""
    ci = (ROOT / ".ci" / "run").read_text() + (ROOT / "scripts" / "test").read_text()
    lines = block.text.splitlines()
    for command in block.attrs.get("except", []):
        # a whole command, not a part of a word ("rm" is in "ruff format")
        whole = re.search(rf"(^|[\s;(&|]){re.escape(command)}($|[\s;)&|])", ci, re.M)
        assert whole, f"{block.id}: except={command!r} is not run by .ci/run or scripts/test"
        assert any(ln.split("#")[0].strip() == command for ln in lines), f"{block.id}: no line is {command!r}"
        lines = [ln for ln in lines if ln.split("#")[0].strip() != command]
    _run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], block, tmp_path=tmp_path)


def run_python(block: Block, tmp_path: Path) -> None:
    port = block.attr("server")
    if port is None:
        _run([sys.executable, "-c", block.text], block)
        return
    servers = [b for b in ALL_BLOCKS if b.doc == block.doc and b.mode == "server" and b.attr("port") == port]
    assert len(servers) == 1, f"{block.id}: no single server block with port={port} in {block.doc.name}"
    with serving(servers[0]):
        _run([sys.executable, "-c", block.text], block)


@contextlib.contextmanager
def serving(block: Block) -> Iterator[None]:
    """Run a ``server`` block in the background until it accepts connections; stop it after."""
    port = int(block.attr("port") or 0)
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", block.text],
        cwd=ROOT / (block.attr("cwd") or "."),
        env=_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"{block.id} exited {proc.returncode} before listening on {port}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{block.id}: nothing listens on port {port} after 30 s"
                time.sleep(0.1)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the bridge and every `poolport serve` it forked
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_server(block: Block, tmp_path: Path) -> None:
    with serving(block):
        pass


def run_poolport_config(block: Block, tmp_path: Path) -> None:
    config = ROOT / (block.attr("cwd") or ".") / f".doc-test-{os.getpid()}.yaml"
    config.write_text(block.text)
    try:
        _run([sys.executable, "-m", "poolport", "check", "--config", str(config)], block)
    finally:
        config.unlink()


def run_yaml(block: Block, tmp_path: Path) -> None:
    assert isinstance(yaml.safe_load(block.text), dict), f"{block.id}: not a YAML mapping"


def run_elixir(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.exs"
    script.write_text(block.text)
    env = _env()
    env["ERL_LIBS"] = _app_libs()
    env.setdefault("POOLPORT_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    _run(["elixir", str(script)], block, env=env)


def run_elixir_syntax(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "snippet.ex"
    script.write_text(block.text)
    _run(["elixir", "-e", f'Code.string_to_quoted!(File.read!("{script}"))'], block)


def check_excerpt(block: Block) -> None:
    """The block's lines appear, in order and together, in the named file."""
    source = ROOT / block.attrs["excerpt"][-1]
    assert source.is_file(), f"{block.id}: excerpt of missing {source}"
    want = [ln.rstrip() for ln in block.text.strip("\n").splitlines()]
    have = [ln.rstrip() for ln in source.read_text().splitlines()]
    assert any(have[i : i + len(want)] == want for i in range(len(have))), (
        f"{block.id} is not an excerpt of {source.relative_to(ROOT)}:\n{block.text}"
    )


RUNNERS = {
    "erl-module": run_erl_module,
    "erlang-config": run_erlang_config,
    "sh": run_sh,
    "python": run_python,
    "yaml": run_yaml,
    "poolport-config": run_poolport_config,
    "elixir": run_elixir,
    "elixir-syntax": run_elixir_syntax,
    "server": run_server,
}


def _missing(need: str) -> str | None:
    """Why ``need`` is unavailable here, or None."""
    if need == "elixir":
        return None if shutil.which("elixir") else "Elixir is not installed (CI installs it)"
    if need == "docker":
        # Even with an engine these start (or talk to) a long-lived deployment; the
        # container smoke test builds it, scales it, queries it and resizes it instead.
        return (
            "needs a Docker deployment: tests/container/smoke.sh exercises it "
            "(build, up --scale, poolport-node info, a workers change) where Docker runs"
        )
    if need in ("socat", "openssl"):  # tools .ci/run installs
        return None if shutil.which(need) else f"{need} is not installed (CI installs it)"
    return f"unknown need {need!r}"


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            b,
            id=f"{b.id}-{b.mode or 'excerpt'}",
            marks=[pytest.mark.docker] if "docker" in b.attrs.get("needs", []) else [],
        )
        for b in CODE_BLOCKS
        if b.mode in MODES or "excerpt" in b.attrs
    ],
)
def test_snippet(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    for need in block.attrs.get("needs", []):
        if reason := _missing(need):
            pytest.skip(f"{block.id}: {reason}")
    if "excerpt" in block.attrs:
        check_excerpt(block)
    if block.mode == "erl":
        run_erl(block, tmp_path, request.getfixturevalue("doc_shell"))
    elif block.mode in RUNNERS:
        RUNNERS[block.mode](block, tmp_path)


LINK = re.compile(r"\]\(([^)\s]+)\)|<a\s+href=\"([^\"]+)\"")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_links_stay_inside_the_repository(doc: Path) -> None:
    """The docs stand alone: every link is a file of the repository or an anchor."""
    bad = []
    for match in LINK.finditer(doc.read_text()):
        target = (match[1] or match[2]).split("#")[0]
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or (target and not (doc.parent / target).exists()):
            bad.append(match[1] or match[2])
    assert not bad, f"{doc.relative_to(ROOT)} links outside the repository or to missing files: {bad}"


def test_every_serve_flag_is_documented() -> None:
    """Each option of ``poolport serve --help`` is named in the README."""
    help_text = subprocess.run(
        [sys.executable, "-m", "poolport", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", help_text)) - {"--help"}
    assert len(flags) > 10
    readme = (ROOT / "README.md").read_text()
    missing = {f for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", readme)}
    assert not missing, f"serve flags missing from README.md: {sorted(missing)}"


def test_layout_names_every_module_and_top_level_entry() -> None:
    """The README's Layout lists every module of the package and every top-level file and directory."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    words = set(re.findall(r"[\w.-]+", layout))
    package = ROOT / "poolport"
    modules = {p.stem for p in package.rglob("*.py")} - {"__init__", "__main__"}
    modules |= {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()}  # subpackages
    others = {p.name for p in package.rglob("*") if p.suffix in {".c", ".escript"}}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    top = {name.split("/")[0] for name in tracked.split()}
    top = {name for name in top if not name.startswith(".")} - {"README.md"}
    scripts = {p.name for p in (ROOT / "scripts").iterdir()}
    missing = sorted(n for n in modules | others | scripts if n not in words and n not in layout) + sorted(
        n for n in top if n.rstrip("/") not in words and f"{n}/" not in layout
    )
    assert not missing, f"README.md Layout does not name: {missing}"
