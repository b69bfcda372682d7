#!/bin/sh
# Elixir smoke test of the Erlang client: builds erlang/ as a rebar3 path
# dependency of the Mix project poolport_demo/ and runs its ExUnit tests
# against a real `python -m poolport serve`.
#
#   tests/elixir/run.sh                  # from anywhere
#
# Environment:
#   POOLPORT_PYTHON      interpreter for the pool (default: python3)
#   MIX_REBAR3           rebar3 used by Mix to build erlang/ (default: the
#                        rebar3 in PATH; `mix local.rebar` would need the package registry)
#   POOLPORT_SKIP_ELIXIR=1  exit 0 with SKIPPED if elixir/mix are missing
#                        (without it, missing tools are a failure)
#
# Works offline: the only dependency is a path dependency, nothing is
# fetched from the package registry.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

missing=""
for tool in elixir mix; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    if [ "${POOLPORT_SKIP_ELIXIR:-}" = "1" ]; then
        echo "SKIPPED: Elixir smoke test, not installed:$missing (POOLPORT_SKIP_ELIXIR=1)"
        exit 0
    fi
    echo "error: Elixir smoke test needs$missing in PATH (Debian/Ubuntu: apt-get install elixir)." >&2
    echo "       Set POOLPORT_SKIP_ELIXIR=1 to skip it instead." >&2
    exit 2
fi

if [ -z "${MIX_REBAR3:-}" ]; then
    MIX_REBAR3=$(command -v rebar3 || true)
    if [ -z "$MIX_REBAR3" ]; then
        echo "error: no rebar3 in PATH; set MIX_REBAR3=/path/to/rebar3" >&2
        exit 2
    fi
fi
export MIX_REBAR3

POOLPORT_PYTHON=${POOLPORT_PYTHON:-python3}
export POOLPORT_PYTHON
# Prefer this checkout's Python package, as the Erlang tests do.
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
if ! "$POOLPORT_PYTHON" -m poolport serve --help >/dev/null 2>&1; then
    echo "error: '$POOLPORT_PYTHON -m poolport serve' does not run (poolport or its" >&2
    echo "       dependencies not installed for it?); set POOLPORT_PYTHON:" >&2
    "$POOLPORT_PYTHON" -m poolport serve --help 2>&1 | tail -n 1 >&2 || true
    exit 2
fi

# Never reach for the package registry.
HEX_OFFLINE=1
MIX_ENV=test
export HEX_OFFLINE MIX_ENV

cd "$here/poolport_demo"
echo "elixir: $(elixir --version 2>/dev/null | tail -n 1)"
echo "rebar3: $MIX_REBAR3   python: $POOLPORT_PYTHON"
exec mix test "$@"
