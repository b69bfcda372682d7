"""Sans-IO reorder buffer: replies arrive in any order, leave in request order.

Replies come in *chunks* answering a contiguous range of sequence numbers, so
the buffer costs per chunk, not per call.
"""

from __future__ import annotations

Buffer = bytes | bytearray | memoryview


class ReorderBuffer:
    """Holds reply chunks keyed by first sequence number until their turn comes."""

    def __init__(self) -> None:
        self.next_seq = 0  # the first sequence number not yet released
        self._chunks: dict[int, tuple[int, Buffer]] = {}

    def __len__(self) -> int:
        return len(self._chunks)

    def add(self, seq: int, count: int, data: Buffer) -> None:
        """Store the replies for ``seq .. seq + count - 1`` (already framed, concatenated)."""
        if seq < self.next_seq or seq in self._chunks:
            raise ValueError(f"replies for seq {seq} were already added")
        self._chunks[seq] = (count, data)

    def pop_ready(self) -> list[Buffer]:
        """Every chunk that can be released now, in order."""
        out = []
        chunks, seq = self._chunks, self.next_seq
        while seq in chunks:
            count, data = chunks.pop(seq)
            out.append(data)
            seq += count
        self.next_seq = seq
        return out
