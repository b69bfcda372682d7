"""poolport.codec.peek: what a term starts with, read from its bytes, agrees with the codec."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from poolport.codec import etf, peek
from poolport.codec.terms import Atom

ENCODINGS = st.sampled_from(sorted(etf.ATOM_ENCODINGS))
NAMES = st.text(min_size=0, max_size=300)
ASCII = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


def compressed(data: bytes) -> bytes:
    """``term_to_binary(T, [compressed])`` of the term ``data`` encodes."""
    body = data[1:]
    return bytes([peek.VERSION, peek.COMPRESSED]) + len(body).to_bytes(4, "big") + zlib.compress(body)


@given(st.lists(NAMES, min_size=1, max_size=4), ENCODINGS)
def test_atoms_read_from_bytes_are_the_atoms_the_codec_wrote(names, encoding):
    data = etf.encode((*map(Atom, names), 1), atom_encoding=encoding)  # {A, B, ..., 1}
    assert peek.read_atoms(data, 3, len(names)) == names  # latin-1 or UTF-8, as each was written
    after = peek.atoms_end(data, 3, len(data), len(names))
    assert data[after:] == b"a\x01"  # just the trailing integer is left


@given(st.binary(max_size=64), st.integers(0, 70), st.integers(0, 5))
def test_hostile_bytes_give_no_answer_rather_than_an_exception(data, pos, count):
    end = len(data)
    assert 0 <= peek.atom_end(data, pos, end) <= end
    assert 0 <= peek.atoms_end(data, pos, end, count) <= end
    got = peek.read_atoms(data, pos, count)
    assert got is None or len(got) == count
    ints = peek.small_ints(data, pos, end, count)
    assert ints is None or len(ints) == count
    head = peek.head(data, pos, end, 16)
    assert head is None or len(head) <= 16


def test_a_cut_atom_is_no_atom():
    data = etf.encode(Atom("callback_reply"))
    for cut in range(1, len(data)):
        assert peek.atom_end(data, 1, cut) == 0
        assert peek.read_atoms(data[:cut], 1, 1) is None
    assert peek.atom_end(data, 1, len(data)) == len(data)


@given(ASCII, st.integers(0, 6), ENCODINGS)
def test_tuple_heads_match_every_encoding_of_such_a_tuple(first, arity, encoding):
    term = (Atom(first), *range(arity))
    data = etf.encode(term, atom_encoding=encoding)
    assert data.startswith(peek.tuple_heads(arity + 1, first))
    assert data.startswith(peek.tuple_heads(arity + 1, first, version=False), 1)
    assert not data.startswith(peek.tuple_heads(arity + 2, first))
    assert not data.startswith(peek.tuple_heads(arity + 1, first + "x"))


@given(st.lists(st.integers(-(1 << 31), (1 << 31) - 1), min_size=1, max_size=4))
def test_small_ints_are_the_integers_the_codec_wrote(numbers):
    data = etf.encode(tuple(numbers))
    assert peek.small_ints(data, 3, len(data), len(numbers)) == numbers


def test_bigger_integers_are_not_small_ints():
    data = etf.encode((1 << 40,))
    assert peek.small_ints(data, 3, len(data), 1) is None


@given(st.binary(min_size=0, max_size=3000), st.integers(2, 64))
def test_the_head_of_a_compressed_term_is_the_head_of_the_term(payload, size):
    data = etf.encode((Atom("call"), Atom("m"), Atom("f"), [payload]))
    squeezed = compressed(data)
    assert peek.head(squeezed, 0, len(squeezed), size) == data[:size]
    assert peek.head(data, 0, len(data), size) == data[:size]


def test_a_broken_compressed_stream_has_no_head():
    data = bytes([peek.VERSION, peek.COMPRESSED, 0, 0, 0, 9]) + b"not zlib at all"
    assert peek.head(data, 0, len(data), 8) is None


@given(ASCII, ASCII, ASCII, st.binary(max_size=40), ENCODINGS)
def test_a_request_head_ends_where_its_arguments_begin(kind, module, function, arg, encoding):
    data = etf.encode((Atom(kind), Atom(module), Atom(function), [arg]), atom_encoding=encoding)
    end = peek.request_head_end(data, 0, len(data))
    assert data[end:] == etf.encode([arg])[1:]
    assert peek.request_head_end(data, 0, end) == 0  # nothing after the head: no request
    other = etf.encode((Atom(kind), Atom(module), Atom(function)), atom_encoding=encoding)  # a 3-tuple
    assert peek.request_head_end(other + b"x", 0, len(other) + 1) == 0
    assert peek.request_head_end(b"\x00" + data[1:], 0, len(data)) == 0  # no version byte
