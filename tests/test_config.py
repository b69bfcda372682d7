import os
import subprocess
import sys

import loky
import pytest
import yaml

from poolport.tools.cli import main
from poolport.config import Config, load_config
from poolport.errors import ConfigError


def test_empty_file_gives_defaults():
    config = load_config(b"")
    assert config == Config()
    assert config.worker_count == loky.cpu_count()  # cores this process may use (cgroups, affinity)
    assert (config.packet, config.protocol, config.none_atom) == (4, "bert", "undefined")
    assert config.atom_encoding == "latin1"  # what OTP 25 and every BERT client read


def test_full_example_config_is_valid():
    path = os.path.join(os.path.dirname(__file__), "..", "config", "poolport.yaml")
    with open(path, "rb") as fh:
        config = load_config(fh.read(), os.path.dirname(path))
    assert config.modules
    assert all(os.path.isabs(p) for p in config.python_path)


def test_every_setting_is_documented_in_the_readme_and_the_example_config():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    with open(os.path.join(root, "config", "poolport.yaml"), encoding="utf-8") as fh:
        example = fh.read()
    for name in Config.__struct_fields__:
        assert f"| `{name}` |" in readme, name
        assert f"{name}:" in example, name


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        pytest.param(b"wrokers: 2", "unknown key 'wrokers' (did you mean 'workers'?)", id="unknown-key"),
        pytest.param(b"zzz: 1", "unknown key 'zzz' (known keys: workers, packet,", id="unknown-far"),
        pytest.param(b"workers: 0", "workers: expected an integer >= 1 or 'auto', got 0", id="workers-zero"),
        pytest.param(b"workers: two", "workers: expected an integer >= 1 or 'auto', got 'two'", id="workers-word"),
        pytest.param(b"packet: 3", "packet: expected 1, 2 or 4, got 3", id="packet"),
        pytest.param(b"protocol: json", "protocol: expected 'bare' or 'bert', got 'json'", id="protocol"),
        pytest.param(
            b"modules: [ok, os.system()]",
            "modules[1]: expected a module name like 'pkg.mod', got 'os.system()'",
            id="module-name",
        ),
        pytest.param(b"modules: os", "modules: expected a list ([...]), each item a module name", id="modules"),
        pytest.param(b"timeout_ms: -1", "timeout_ms: expected an integer >= 0, got -1", id="negative-timeout"),
        pytest.param(b"max_in_flight: lots", "max_in_flight: expected an integer >= 1, got 'lots'", id="max-in-flight"),
        pytest.param(b"reply_tags: maybe", "reply_tags: expected true or false, got 'maybe'", id="bool"),
        pytest.param(b"worker_init: foo", "worker_init: expected 'module:function'", id="init-spec"),
        pytest.param(
            b"functions: {m.f: {timeout: 1}}",
            "functions: 'm.f': unknown key 'timeout' (did you mean 'timeout_ms'?)",
            id="function-key",
        ),
        pytest.param(
            b"functions: {m.f: {timeout_ms: x}}",
            "functions: 'm.f': timeout_ms: expected an integer >= 0 or null, got 'x'",
            id="function-timeout",
        ),
        pytest.param(b"protocol: bare", "protocol: 'bare' needs bare_module", id="bare-without-module"),
        pytest.param(
            b"atom_encoding: utf-8", "atom_encoding: expected 'latin1' or 'utf8', got 'utf-8'", id="atom-encoding"
        ),
        pytest.param(b"- a list", "expected a mapping", id="not-a-mapping"),
        pytest.param(b"workers: [", "not valid YAML", id="bad-yaml"),
    ],
)
def test_bad_config_is_refused_naming_the_key_in_words(yaml, message):
    with pytest.raises(ConfigError) as info:
        load_config(yaml, source="test.yaml")
    assert str(info.value).startswith(f"test.yaml: {message}"), str(info.value)


def test_every_key_explains_a_wrong_value_in_words():
    """No key falls back to msgspec's programmer text (`$.key`, regexes, `int | str`)."""
    for name in Config.__struct_fields__:
        for bad in ([[[]]], {"x": 1}, "not this", -1, 1.5):
            try:
                load_config(yaml.safe_dump({name: bad}), source="t.yaml")
            except ConfigError as exc:
                text = str(exc)
                assert text.startswith(f"t.yaml: {name}") and "$." not in text and "^" not in text, text
                assert "expected" in text, text


def test_relative_python_path_resolves_next_to_the_file():
    config = load_config(b"python_path: [handlers, /abs]", "/srv/app")
    assert config.python_path == ["/srv/app/handlers", "/abs"]


def test_allowlist_covers_submodules_only():
    config = load_config(b"modules: [pkg.sub]")
    assert config.allowed("pkg.sub") and config.allowed("pkg.sub.deeper")
    assert not config.allowed("pkg") and not config.allowed("pkg.subway")


def test_bare_module_is_allowlisted_implicitly():
    config = load_config(b"protocol: bare\nbare_module: seedmod")
    assert config.allowed("seedmod")


def test_the_smallest_timeout_set_applies():
    config = load_config(
        b"timeout_ms: 100\nfunctions: {m: {timeout_ms: 50}, m.slow: {timeout_ms: 9000}, "
        b"m.quick: {timeout_ms: 20}, n: {timeout_ms: 0}}"
    )
    assert config.timeout_for("m", "slow") == 50  # the module's is smaller than the function's
    assert config.timeout_for("m", "quick") == 20
    assert config.timeout_for("m", "fast") == 50
    assert config.timeout_for("n", "f") == 100  # 0 is "not set"
    assert config.timeout_for("other", "f") == 100
    assert load_config(b"").timeout_for("m", "f") == 0


def test_cli_flags_override_the_file(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("workers: 4\npacket: 2\nmodules: [a]\n")
    assert main(["check", "--config", str(cfg), "--workers", "3", "--module", "b", "--atom-encoding", "utf8"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert '"workers": 3' in out and '"packet": 2' in out and '"atom_encoding": "utf8"' in out
    assert '"a"' in out and '"b"' in out
    from poolport.codec import etf

    assert ("C-accelerated codec" if etf.ACCELERATED else "pure-Python codec") in captured.err


@pytest.mark.parametrize(
    ("content", "flags", "message"),
    [
        pytest.param("workrs: 2\n", [], "unknown key 'workrs' (did you mean 'workers'?)", id="unknown-key"),
        pytest.param("", ["--workers", "x"], "--workers must be a number", id="bad-flag"),
        pytest.param(None, [], "cannot read config file", id="missing-file"),
    ],
)
def test_serve_exits_at_start_with_a_message(tmp_path, content, flags, message):
    cfg = tmp_path / "p.yaml"
    if content is not None:
        cfg.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "poolport", "serve", "--config", str(cfg), *flags],
        capture_output=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert proc.stdout == b""  # stdout is the port: never text
    assert message in proc.stderr.decode()


def test_reload_config_applies_live_keys_and_names_the_others():
    from poolport.config import LIVE_KEYS, WORKER_KEYS, apply_live

    old = load_config(b"workers: 2\ntimeout_ms: 0\nmodules: [a]\n")
    new = load_config(b"workers: 3\ntimeout_ms: 50\nmodules: [a, b]\npacket: 2\nlog_level: DEBUG\n")
    config, applied, restart = apply_live(old, new)
    assert sorted(applied) == ["log_level", "timeout_ms", "workers"]
    assert sorted(restart) == ["modules", "packet"]
    assert (config.workers, config.timeout_ms, config.log_level) == (3, 50, "DEBUG")
    assert (config.modules, config.packet) == (["a"], 4)  # kept until a restart
    assert apply_live(old, old) == (old, [], [])
    assert WORKER_KEYS <= set(LIVE_KEYS) <= set(Config.__struct_fields__)
