"""Sizes in the varlen chunk layout (docs/DESIGN.md) that the compiled training step depends on.

Both are chosen so that shapes stay nearly fixed without paying for a worst case: `cu_seqlens`
holds the chunk's documents rounded up to a multiple of DOC_SLOT_MULTIPLE (a varlen attention
kernel launches work for every slot, and FlashAttention's backward allocates scratch per slot, so
the worst case of max_seq_len / 2 documents per sequence costs real time and memory), and the sparse
MLM head runs on a fixed number of prediction slots, an upper bound on the masked tokens that the
masker guarantees, so finding the masked positions needs no host sync. The padding after the last
real token is split into documents of at most max_seq_len tokens (`pad_tail_lengths`), so every
document of a chunk fits the `max_seqlen` the attention kernels are told and the RoPE tables.
"""
from __future__ import annotations

import math

import numpy as np

DOC_SLOT_MULTIPLE = 64


def doc_slots(num_docs: int) -> int:
    """Length of `cu_seqlens` minus one for a chunk of `num_docs` documents (pad tail included);
    the unused slots are empty documents (repeated end offset)."""
    return max(1, -(-num_docs // DOC_SLOT_MULTIPLE)) * DOC_SLOT_MULTIPLE


def prediction_slots(*, chunk_tokens: int, num_sequences: int, mask_rate: float) -> int:
    """Upper bound on the masked tokens of a chunk: the masker (data/masking.py) selects
    round(mask_rate x eligible) tokens per sequence, at most mask_rate x length + 1/2 each."""
    return min(chunk_tokens, math.floor(mask_rate * chunk_tokens + 0.5 * num_sequences))


def pad_tail_lengths(tail_tokens: int, max_seq_len: int) -> np.ndarray:
    """The documents that hold a chunk's `tail_tokens` of padding: max_seq_len tokens each, the last
    one shorter. One long pad document would break two things: varlen kernels (FlashAttention,
    torch's varlen_attn) compute only `max_seqlen` query rows of each document and leave the rest of
    a longer one unwritten (garbage there, NaN gradients through the weights), and positions past
    the RoPE tables index out of range."""
    if tail_tokens <= 0:
        return np.zeros(0, dtype=np.int64)
    pieces = np.full(-(-tail_tokens // max_seq_len), max_seq_len, dtype=np.int64)
    pieces[-1] = tail_tokens - max_seq_len * (pieces.size - 1)
    return pieces
