"""One table of error types and codes (poolport.protocol.bert.ERRORS): the Erlang client and the README
must say the same, or a user matching on a code gets it wrong on one side."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from poolport.protocol import bert

ROOT = Path(__file__).resolve().parent.parent
ERLANG_SOURCES = sorted((ROOT / "erlang" / "src").glob("*.erl"))


def _erlang_errors() -> list[tuple[str, str, int, str]]:
    """Every ``{Type, Code, <<"Class">>`` the Erlang client builds or matches, outside its tests."""
    found = []
    for path in ERLANG_SOURCES:
        text = path.read_text()
        code = text.split("-ifdef(TEST).")[0]  # inline EUnit tests use made-up errors
        for m in re.finditer(r"\{(protocol|server|user), (\d+), <<\"(\w+)\">>", code):
            found.append((path.name, m.group(1), int(m.group(2)), m.group(3)))
    return found


def test_the_erlang_client_uses_the_table():
    found = _erlang_errors()
    assert found, "no error tuples found: the pattern or the sources moved"
    for where, typ, code, cls in found:
        if cls not in bert.ERRORS:  # an exception's name: only a handler's error (docs' examples)
            assert (typ, code) == ("user", bert.USER_ERROR), f"{where}: {cls} is not in poolport.protocol.bert.ERRORS"
            continue
        assert bert.ERRORS[cls] == (typ, code), (
            f"{where}: {{{typ}, {code}, {cls}}} but the table says {bert.ERRORS[cls]}"
        )


def test_the_erlang_client_maps_server_timeouts_by_their_code():
    server = (ROOT / "erlang" / "src" / "poolport_wire.erl").read_text()
    codes = {int(c) for c in re.findall(r"call_result\(\{error, \{server, (\d+), _Class", server)}
    assert codes == {bert.ERRORS["Timeout"][1]}


def _readme_rows() -> list[tuple[str, int, list[str]]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("| Type | Code | Class | when |")[1].split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0].strip("`"), int(cells[1]), re.findall(r"`(\w+)`", cells[2])))
    return rows


@pytest.mark.parametrize("cls", sorted(c for c in bert.ERRORS if c != "UnexpectedReply"))
def test_the_readme_table_says_what_the_table_says(cls):
    typ, code = bert.ERRORS[cls]
    rows = [(t, c) for t, c, classes in _readme_rows() if cls in classes]
    assert rows == [(str(typ), code)], f"README's protocol table for {cls}: {rows}"


def test_python_makes_its_errors_from_the_table():
    assert bert.ERRORS["FrameTooLarge"] == (bert.PROTOCOL, bert.BAD_FRAME)
    term = bert.error(*bert.ERRORS["WorkerCrashed"], "WorkerCrashed", "x")
    assert term[1][:3] == (bert.SERVER, bert.WORKER_CRASHED, b"WorkerCrashed")
