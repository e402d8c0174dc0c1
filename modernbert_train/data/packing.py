"""Shard-time packing: split documents into `[CLS] ... [SEP]` pieces of at most `max_seq_len`
tokens, and pack pieces into sequences with an online best-fit packer over a bounded buffer."""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

MIN_PIECE_TOKENS = 3  # [CLS] + one content token + [SEP]: a bin with less room is closed at once


def split_document(ids: np.ndarray, max_seq_len: int, cls_id: int, sep_id: int) -> list[np.ndarray]:
    """`ids` (one document, no special tokens) -> pieces `[CLS] chunk [SEP]` of <= max_seq_len.

    A long document is split, never truncated: every token lands in exactly one piece. Pieces are
    filled to capacity and the remainder goes last, because full pieces fill a packed sequence
    exactly and the short tail fits a gap elsewhere (balanced pieces would leave gaps in both).
    An empty document gives no pieces.
    """
    capacity = max_seq_len - 2
    if capacity < 1:
        raise ValueError(f"max_seq_len must be >= {MIN_PIECE_TOKENS}, got {max_seq_len}")
    n = len(ids)
    if n == 0:
        return []
    dtype = ids.dtype if np.issubdtype(ids.dtype, np.integer) else np.int64
    pieces = []
    for start in range(0, n, capacity):
        chunk = ids[start:start + capacity]
        piece = np.empty(len(chunk) + 2, dtype=dtype)
        piece[0] = cls_id
        piece[1:-1] = chunk
        piece[-1] = sep_id
        pieces.append(piece)
    return pieces


@dataclass
class PackedSequence:
    """One MDS sample: document pieces laid end to end."""

    input_ids: np.ndarray
    doc_lens: np.ndarray  # int32, one per piece, sums to len(input_ids)
    doc_ids: np.ndarray  # int64, source document of each piece


class _Bin:
    __slots__ = ("pieces", "doc_ids", "used_tokens")

    def __init__(self) -> None:
        self.pieces: list[np.ndarray] = []
        self.doc_ids: list[int] = []
        self.used_tokens = 0


class BestFitPacker:
    """Online best-fit bin packing with a bounded buffer.

    Each piece goes into the open sequence with the least remaining room that still fits it (a new
    one when none fits). A sequence is emitted as soon as no piece could fit it any more; when the
    open sequences hold more than `buffer_docs` pieces, the fullest are emitted until they do not.
    The open sequences are kept in a list sorted by (room, creation order), so a placement is one
    bisect; the output depends only on the input order.
    """

    def __init__(self, max_seq_len: int, buffer_docs: int = 1000) -> None:
        if max_seq_len < MIN_PIECE_TOKENS:
            raise ValueError(f"max_seq_len must be >= {MIN_PIECE_TOKENS}, got {max_seq_len}")
        if buffer_docs < 1:
            raise ValueError(f"buffer_docs must be >= 1, got {buffer_docs}")
        self.max_seq_len = max_seq_len
        self.buffer_docs = buffer_docs
        self._rooms: list[tuple[int, int]] = []  # (remaining tokens, bin key), sorted
        self._bins: dict[int, _Bin] = {}
        self._next_key = 0
        self._buffered_pieces = 0
        self.tokens_in = 0
        self.pieces_in = 0
        self.sequences_out = 0
        self.tokens_out = 0

    @property
    def efficiency(self) -> float:
        """Real tokens / capacity of the emitted sequences (1.0 before any is emitted)."""
        if self.sequences_out == 0:
            return 1.0
        return self.tokens_out / (self.sequences_out * self.max_seq_len)

    def add(self, piece: np.ndarray, doc_id: int) -> list[PackedSequence]:
        """Place one piece; returns the sequences that became ready (often none)."""
        n = len(piece)
        if not 0 < n <= self.max_seq_len:
            raise ValueError(f"piece of {n} tokens does not fit max_seq_len={self.max_seq_len}: "
                             "split documents with split_document first")
        self.tokens_in += n
        self.pieces_in += 1
        i = bisect.bisect_left(self._rooms, (n, -1))
        if i < len(self._rooms):
            room, key = self._rooms.pop(i)
        else:
            room, key = self.max_seq_len, self._next_key
            self._next_key += 1
            self._bins[key] = _Bin()
        b = self._bins[key]
        b.pieces.append(piece)
        b.doc_ids.append(doc_id)
        b.used_tokens += n
        self._buffered_pieces += 1
        room -= n
        ready = []
        if room < MIN_PIECE_TOKENS:
            ready.append(self._emit(key))
        else:
            bisect.insort(self._rooms, (room, key))
        while self._buffered_pieces > self.buffer_docs:
            _, fullest = self._rooms.pop(0)
            ready.append(self._emit(fullest))
        return ready

    def flush(self) -> list[PackedSequence]:
        """Emit every open sequence, fullest first."""
        ready = [self._emit(key) for _, key in self._rooms]
        self._rooms.clear()
        return ready

    def _emit(self, key: int) -> PackedSequence:
        b = self._bins.pop(key)
        self._buffered_pieces -= len(b.pieces)
        self.sequences_out += 1
        self.tokens_out += b.used_tokens
        return PackedSequence(
            input_ids=np.concatenate(b.pieces) if len(b.pieces) > 1 else b.pieces[0],
            doc_lens=np.fromiter((len(p) for p in b.pieces), dtype=np.int32, count=len(b.pieces)),
            doc_ids=np.asarray(b.doc_ids, dtype=np.int64),
        )
