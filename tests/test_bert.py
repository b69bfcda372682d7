import pytest

from poolport.protocol import bert
from poolport.codec import etf
from poolport.errors import ProtocolError
from poolport.codec.terms import Atom as A


def test_call_and_cast_parse():
    req = bert.parse_request((A("call"), A("m"), A("f"), [1, 2]))
    assert (req.kind, req.module, req.function, req.args) == ("call", "m", "f", [1, 2])
    assert bert.parse_request((A("cast"), A("m"), A("f"), [])).kind == "cast"


@pytest.mark.parametrize(
    ("term", "message"),
    [
        pytest.param((A("call"), b"m", A("f"), []), "Module must be an atom", id="binary-module"),
        pytest.param((A("call"), A("m"), "f", []), "Function must be an atom", id="str-function"),
        pytest.param((A("call"), A("m"), A("f"), A("notalist")), "Args must be a proper list", id="args"),
        pytest.param((A("call"), A("m"), A("f")), "expected {call|cast", id="short"),
        pytest.param([A("call")], "expected {call|cast", id="list"),
        pytest.param((A("frob"), A("m"), A("f"), []), "expected {call|cast", id="verb"),
    ],
)
def test_bad_requests_are_refused(term, message):
    with pytest.raises(ProtocolError, match=message.replace("{", r"\{").replace("|", r"\|")):
        bert.parse_request(term)


def test_bare_request():
    req = bert.parse_bare_request((A("sum"), 1, 2))
    assert (req.function, req.args) == ("sum", [1, 2])
    with pytest.raises(ProtocolError):
        bert.parse_bare_request((1, 2))


@pytest.mark.parametrize(
    ("options", "expected"),
    [([(A("ms"), 250)], 250), (250, 250), ([(A("other"), 1)], None), (A("x"), None), (-5, None)],
)
def test_info_timeout(options, expected):
    assert bert.info_timeout((A("info"), A("timeout"), options)) == expected


def test_unknown_info_is_ignored():
    assert bert.info_timeout((A("info"), A("callback"), [])) is None


@pytest.mark.parametrize(
    "atom",
    [b"w\x04info", b"s\x04info", b"d\x00\x04info", b"v\x00\x04info"],
    ids=["small-utf8", "small-latin1", "latin1", "utf8"],
)
def test_is_info_recognises_every_atom_encoding(atom):
    assert bert.is_info(b"\x83h\x03" + atom + b"w\x07timeoutj")
    assert bert.is_info(b"\x00\x00\x83h\x03" + atom, 2)


def test_is_info_rejects_calls_and_other_triples():
    assert not bert.is_info(b"\x83h\x04w\x04callw\x01m")
    assert not bert.is_info(b"\x83h\x03w\x04infx")
    assert not bert.is_info(b"\x83h\x03w\x05infos")


def test_error_terms():
    assert bert.error(bert.USER, 0, "ValueError", "bad", ["l1", "l2"]) == (
        A("error"),
        (A("user"), 0, b"ValueError", b"bad", [b"l1", b"l2"]),
    )
    assert bert.error(bert.SERVER, 1, "X", "y", bare=True) == (A("error"), (A("server"), b"X", b"y"))


def test_is_info_sees_through_compression():
    """A compressed info packet (term_to_binary(T, [compressed])) is still an info packet: it
    must ride with its call and get no reply, or every later reply would be shifted."""
    info = (A("info"), A("timeout"), [(A("ms"), 500), (A("pad"), b"x" * 200)])
    data = etf.encode(info, compressed=6)
    assert data[1] == 80  # really compressed
    assert bert.is_info(data) and bert.is_info(b"\x00" * 3 + data, 3, 3 + len(data))
    call = etf.encode((A("call"), A("m"), A("f"), [b"x" * 200]), compressed=6)
    assert call[1] == 80 and not bert.is_info(call)
    assert not bert.is_info(data[:7] + b"\xff" * 40)  # not a zlib stream: not info
    assert not bert.is_info(data, 0, 9)  # cut short: too little to tell, not info
