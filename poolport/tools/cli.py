"""Command line: ``poolport serve`` (the port program), ``demo``, ``bench``, ``check``.

The only module that opens files and touches the process's standard streams.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from poolport import __version__
from poolport.config import Config, load_config
from poolport.errors import ConfigError
from poolport.codec.etf import ATOM_ENCODINGS, codec_name
from poolport.server.memory import keep_freed_memory


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="YAML", help="configuration file (default: built-in defaults)")
    p.add_argument("--workers", help="worker processes: a number or 'auto' (= cores)")
    p.add_argument("--packet", type=int, choices=(1, 2, 4), help="{packet,N} length header size")
    p.add_argument("--protocol", choices=("bert", "bare"))
    p.add_argument("--bare-module", help="module whose functions answer bare {Name, Arg...} requests")
    p.add_argument(
        "--module",
        "-m",
        action="append",
        dest="modules",
        metavar="MODULE",
        help="allow this module (repeatable; adds to the config's list)",
    )
    p.add_argument(
        "--python-path",
        action="append",
        metavar="DIR",
        help="prepend to sys.path in workers (repeatable; adds to the config's list)",
    )
    p.add_argument("--timeout-ms", type=int, help="default per-call timeout, 0 = none")
    p.add_argument("--max-in-flight", type=int)
    p.add_argument("--max-in-flight-bytes", type=int, help="request and reply bytes held before stdin waits")
    p.add_argument(
        "--reply-tags",
        action="store_const",
        const=True,
        help="prefix every reply frame with its request's 64-bit sequence number",
    )
    p.add_argument(
        "--caller-timeout-ms",
        type=int,
        help="the caller's timeout of a call not preceded by an {info, timeout, ...} packet, 0 = none",
    )
    p.add_argument("--max-frame-bytes", type=int)
    p.add_argument("--max-term-elements", type=int, help="list/tuple/map/string elements one request may decode to")
    p.add_argument("--max-worker-memory-mb", type=int, help="per-worker memory limit, 0 = none")
    p.add_argument("--idle-spin-us", type=int, help="microseconds to poll before sleeping, 0 = never")
    p.add_argument(
        "--atom-encoding",
        choices=ATOM_ENCODINGS,
        help="how replies write atoms: latin1 (as OTP 25; what BERT clients read) or utf8 (as OTP 26+)",
    )
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    p.add_argument("--name", help="the pool's name, shown in every log line")


def read_config(args: argparse.Namespace) -> Config:
    """The config file (if any) with the command-line flags applied on top."""
    data, base, source = b"", os.getcwd(), "defaults"
    if args.config:
        try:
            with open(args.config, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {args.config!r}: {exc.strerror}") from None
        base, source = os.path.dirname(os.path.abspath(args.config)), args.config
    overrides: dict[str, Any] = {
        "packet": args.packet,
        "protocol": args.protocol,
        "bare_module": args.bare_module,
        "timeout_ms": args.timeout_ms,
        "max_in_flight": args.max_in_flight,
        "max_frame_bytes": args.max_frame_bytes,
        "max_term_elements": args.max_term_elements,
        "log_level": args.log_level,
        "name": args.name,
        "max_worker_memory_mb": args.max_worker_memory_mb,
        "idle_spin_us": args.idle_spin_us,
        "max_in_flight_bytes": args.max_in_flight_bytes,
        "reply_tags": args.reply_tags,
        "caller_timeout_ms": args.caller_timeout_ms,
        "atom_encoding": args.atom_encoding,
    }
    if args.workers is not None:
        overrides["workers"] = args.workers if args.workers == "auto" else _int_flag("--workers", args.workers)
    config = load_config(data, base, overrides, source)
    extra_modules = args.modules or []
    extra_paths = [os.path.abspath(p) for p in args.python_path or []]
    if extra_modules or extra_paths:
        import msgspec

        config = msgspec.structs.replace(
            config, modules=[*config.modules, *extra_modules], python_path=[*extra_paths, *config.python_path]
        )
        try:
            config = msgspec.convert(msgspec.to_builtins(config), Config)  # re-validate names
        except msgspec.ValidationError as exc:
            raise ConfigError(f"--module/--python-path: {exc}") from None
    return config


def _positive_int(value: str) -> int:
    """An argparse type: a misuse ends with status 2 and one line, like every other."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def _int_flag(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{flag} must be a number or 'auto', got {value!r}") from None


def serve(config: Config, reread: Callable[[], Config] | None = None) -> int:
    """Run the dispatcher on this process's stdin/stdout (the Erlang port); ``reread`` reads
    the configuration again (for ``'$poolport':reload_config()``)."""
    from poolport.server.dispatcher import Dispatcher

    # Keep the port's pipes on private descriptors; fd 0 becomes /dev/null and
    # fd 1 a copy of stderr, so nothing else (a print(), a child process, a C
    # library) can read requests or write into the reply stream.
    in_fd, out_fd = os.dup(0), os.dup(1)
    _enlarge_pipes(in_fd, out_fd)
    keep_freed_memory()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    sys.stdout = sys.stderr
    log = logging.getLogger("poolport")
    log.info(
        "serving %s protocol, {packet,%d}, %d worker(s), modules %s, %s codec",
        config.protocol,
        config.packet,
        config.worker_count,
        config.modules or "(none)",
        codec_name(),
    )
    try:
        return Dispatcher(config, in_fd, out_fd, reread).run()
    finally:
        os.close(in_fd)
        os.close(out_fd)


def _enlarge_pipes(*fds: int) -> None:
    """Ask for 1 MiB pipe buffers (Linux): big payloads then cross in 16x fewer wake-ups."""
    import fcntl

    for fd in fds:
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:
            pass  # not a pipe, or over /proc/sys/fs/pipe-max-size: keep the default


def _setup_logging(level: str, name: str = "") -> None:
    label = f"{name} " if name else ""
    logging.basicConfig(
        level=level, stream=sys.stderr, format=f"%(asctime)s poolport[{label}%(process)d] %(levelname)s %(message)s"
    )


def check(config: Config, imports: bool, init: bool) -> int:
    """``poolport check``: print the effective configuration; with ``imports``, import the
    handler modules (and with ``init`` run ``worker_init``) as a worker would. 1 on a problem."""
    import msgspec

    from poolport.handlers.handler import run_worker_init
    from poolport.server.worker import import_handlers

    print(msgspec.json.format(msgspec.json.encode(config)).decode(), flush=True)  # before any problem:
    if not imports:  # one reading stdout and stderr together (a pool's start-up diagnosis) sees them last
        print(
            f"poolport: configuration valid (schema only: add --import to import the handler "
            f"modules, --init to run worker_init too); {codec_name()} codec",
            file=sys.stderr,
        )
        return 0
    problems = [f"python_path entry {p!r} is not a directory" for p in config.python_path if not os.path.isdir(p)]
    problems += [f"cannot import allowlisted module {m!r}:\n{tb}" for m, tb in import_handlers(config)]
    if init and config.worker_init and not problems:
        try:
            run_worker_init(config.worker_init, config.worker_init_args)
        except BaseException:  # noqa: BLE001 - report whatever worker_init raises
            problems.append(f"worker_init {config.worker_init!r} failed:\n{traceback.format_exc()}")
    for problem in problems:
        print(f"poolport: {problem}", file=sys.stderr)
    if problems:
        return 1
    done = "imported " + ", ".join(config.modules) if config.modules else "no modules to import"
    ran = f"; worker_init {config.worker_init!r} ran" if init and config.worker_init else ""
    print(f"poolport: configuration valid; {done}{ran}; {codec_name()} codec", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="poolport", description="Call CPU-heavy Python from Erlang or Elixir in parallel through one port."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run as an Erlang port program (frames on stdin/stdout)")
    _add_config_flags(p_serve)
    p_check = sub.add_parser("check", help="validate a configuration and print it")
    _add_config_flags(p_check)
    p_check.add_argument(
        "--import", dest="imports", action="store_true", help="also import every allowlisted module, as a worker would"
    )
    p_check.add_argument("--init", action="store_true", help="also run worker_init (implies --import)")
    p_demo = sub.add_parser("demo", help="Erlang calls a CPU-heavy function: 1 worker vs N")
    p_demo.add_argument("--calls", type=_positive_int, default=200, help="calls per measurement")
    p_demo.add_argument("--steps", type=_positive_int, default=200_000, help="loop steps per call")
    p_demo.add_argument("--workers", type=_positive_int, default=os.cpu_count() or 1)
    sub.add_parser("bench", help="the benchmark: poolport vs a single-process port, from a real erl", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from poolport.tools.bench import main as bench_main

        return bench_main(argv[1:], prog="poolport bench")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from poolport.tools.demo import run_demo

        return run_demo(calls=args.calls, steps=args.steps, workers=args.workers)
    try:
        config = read_config(args)
    except ConfigError as exc:
        print(f"poolport: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        return check(config, imports=args.imports or args.init, init=args.init)
    _setup_logging(config.log_level, config.name)
    return serve(config, lambda: read_config(args))
