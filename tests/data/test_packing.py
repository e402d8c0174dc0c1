"""Packing invariants: every token once, capacity respected, pieces framed by [CLS]/[SEP],
best-fit efficiency on a long-tailed length mix, determinism."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from modernbert_train.data.packing import BestFitPacker, PackedSequence, split_document

CLS, SEP = 1, 2


def _docs(seed: int, n_docs: int, median_tokens: float, sigma: float = 1.0) -> list[np.ndarray]:
    """Documents with lognormal lengths; content ids >= 10 so they never equal CLS/SEP."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(np.log(median_tokens), sigma, n_docs).astype(np.int64))
    return [rng.integers(10, 30000, size=n, dtype=np.int32) for n in lengths]


def _pack(docs: list[np.ndarray], max_seq_len: int, buffer_docs: int = 1000):
    packer = BestFitPacker(max_seq_len, buffer_docs)
    out: list[PackedSequence] = []
    for doc_id, ids in enumerate(docs):
        for piece in split_document(ids, max_seq_len, CLS, SEP):
            out += packer.add(piece, doc_id)
    out += packer.flush()
    return packer, out


@pytest.mark.parametrize("n_tokens, max_seq_len, expected_pieces", [
    (0, 16, 0), (1, 16, 1), (14, 16, 1), (15, 16, 2), (28, 16, 2), (29, 16, 3), (1000, 128, 8)])
def test_split_document_splits_never_truncates(n_tokens, max_seq_len, expected_pieces):
    ids = np.arange(100, 100 + n_tokens, dtype=np.int32)
    pieces = split_document(ids, max_seq_len, CLS, SEP)
    assert len(pieces) == expected_pieces, [len(p) for p in pieces]
    for p in pieces:
        assert 3 <= len(p) <= max_seq_len, len(p)
        assert p[0] == CLS and p[-1] == SEP, (p[0], p[-1])
        assert p.dtype == np.int32
    content = np.concatenate([p[1:-1] for p in pieces]) if pieces else np.empty(0, np.int32)
    np.testing.assert_array_equal(content, ids)


def test_split_document_rejects_tiny_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len"):
        split_document(np.arange(5), 2, CLS, SEP)


@pytest.mark.parametrize("max_seq_len, median_tokens, buffer_docs", [
    (1024, 300, 1000), (128, 40, 50), (64, 300, 10)])
def test_packer_keeps_every_piece_once_within_capacity(max_seq_len, median_tokens, buffer_docs):
    docs = _docs(seed=1, n_docs=1500, median_tokens=median_tokens)
    packer, seqs = _pack(docs, max_seq_len, buffer_docs)
    expected = Counter()
    for doc_id, ids in enumerate(docs):
        for piece in split_document(ids, max_seq_len, CLS, SEP):
            expected[(doc_id, piece.tobytes())] += 1
    got = Counter()
    for seq in seqs:
        assert len(seq.input_ids) <= max_seq_len, len(seq.input_ids)
        assert seq.doc_lens.dtype == np.int32 and seq.doc_ids.dtype == np.int64
        assert int(seq.doc_lens.sum()) == len(seq.input_ids), (seq.doc_lens, len(seq.input_ids))
        assert len(seq.doc_lens) == len(seq.doc_ids)
        offsets = np.concatenate([[0], np.cumsum(seq.doc_lens)])
        for start, end, doc_id in zip(offsets[:-1], offsets[1:], seq.doc_ids):
            piece = seq.input_ids[start:end]
            assert piece[0] == CLS and piece[-1] == SEP
            got[(int(doc_id), piece.tobytes())] += 1
    assert got == expected, f"{sum(got.values())} pieces out, {sum(expected.values())} in"
    assert packer.tokens_in == packer.tokens_out == sum(len(s.input_ids) for s in seqs)
    assert packer.sequences_out == len(seqs)


def test_packer_efficiency_on_lognormal_mix():
    """Median ~300 tokens, long tail split at 1024: the Ettin-style shard-time packing target."""
    docs = _docs(seed=0, n_docs=8000, median_tokens=300, sigma=1.0)
    packer, seqs = _pack(docs, max_seq_len=1024, buffer_docs=1000)
    print(f"packing efficiency {packer.efficiency:.4f} over {len(seqs)} sequences, "
          f"{packer.tokens_in} tokens")
    assert packer.efficiency >= 0.99, packer.efficiency
    assert packer.efficiency == sum(len(s.input_ids) for s in seqs) / (len(seqs) * 1024)
    # Long documents really were split: some sequences start with a piece of a split document.
    assert max(len(d) for d in docs) > 1024 * 3


def test_packer_is_deterministic():
    docs = _docs(seed=3, n_docs=500, median_tokens=100)
    _, first = _pack(docs, 256, 64)
    _, second = _pack(docs, 256, 64)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.doc_ids, b.doc_ids)


def test_packer_best_fit_choice_and_buffer_bound():
    packer = BestFitPacker(max_seq_len=10, buffer_docs=3)
    assert packer.add(np.full(6, 7), 0) == []  # bin A: room 4
    assert packer.add(np.full(5, 7), 1) == []  # does not fit A: bin B, room 5
    out = packer.add(np.full(4, 7), 2)  # fits both; best fit is A (room 4 -> 0): emitted at once
    assert [s.doc_ids.tolist() for s in out] == [[0, 2]], out
    out = packer.add(np.full(3, 7), 3)  # best fit is B (room 5 -> 2 < 3): closed at once
    assert [s.doc_ids.tolist() for s in out] == [[1, 3]], out
    assert packer.sequences_out == 2, packer.sequences_out
    # Four 7-token pieces (room 3 each, still open): the 4th exceeds buffer_docs=3, so the fullest
    # open bin goes out; among equal rooms the oldest one, which keeps the output deterministic.
    for doc_id in range(4, 8):
        emitted = packer.add(np.full(7, 7), doc_id)
        expected = [[4]] if doc_id == 7 else []
        assert [s.doc_ids.tolist() for s in emitted] == expected, (doc_id, emitted)
    assert packer.sequences_out == 3
    assert [s.doc_ids.tolist() for s in packer.flush()] == [[5], [6], [7]]


def test_packer_rejects_oversized_pieces():
    with pytest.raises(ValueError, match="split_document"):
        BestFitPacker(16).add(np.zeros(17, np.int32), 0)
