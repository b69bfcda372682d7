import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolport.server.reorder import ReorderBuffer


def test_releases_only_contiguous_prefix():
    buf = ReorderBuffer()
    buf.add(2, 1, b"c")
    assert buf.pop_ready() == []
    buf.add(0, 2, b"ab")
    assert buf.pop_ready() == [b"ab", b"c"]
    assert buf.next_seq == 3
    assert len(buf) == 0


def test_duplicate_or_old_chunk_is_refused():
    buf = ReorderBuffer()
    buf.add(0, 1, b"a")
    with pytest.raises(ValueError):
        buf.add(0, 1, b"a")
    buf.pop_ready()
    with pytest.raises(ValueError):
        buf.add(0, 1, b"a")


@given(st.lists(st.integers(1, 5), min_size=1, max_size=60), st.randoms())
def test_any_arrival_order_leaves_in_request_order(sizes, rnd: random.Random):
    chunks, seq = [], 0
    for n in sizes:
        chunks.append((seq, n, b"".join(i.to_bytes(2, "big") for i in range(seq, seq + n))))
        seq += n
    rnd.shuffle(chunks)
    buf, out = ReorderBuffer(), []
    for chunk in chunks:
        buf.add(*chunk)
        out += buf.pop_ready()
    data = b"".join(out)
    assert [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)] == list(range(seq))
