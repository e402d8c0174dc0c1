"""Training FLOPs of ModernBERT: the one formula behind the trainer's MFU and the benchmarks."""
from __future__ import annotations

import numpy as np

from modernbert_train.model.config import ModernBertConfig

FLOP_FORMULA = (
    "model FLOPs per step = 6 * P_enc * real_tokens + 12 * hidden * attended_pairs "
    "+ 6 * P_head * masked_tokens, where P_enc = layers * (4 * hidden^2 + 3 * hidden * intermediate) "
    "(Wqkv, attn Wo, GeGLU Wi (2 x intermediate), mlp Wo; no embeddings, no norms), "
    "P_head = hidden^2 + hidden * vocab (head.dense + tied decoder, run on masked tokens only), "
    "attended_pairs = sum over layers and attention spans of the (query, key) pairs allowed "
    "(global layer: L^2 per span of L tokens; local layer: pairs with |i - j| <= local_attention // 2), "
    "12 * hidden per pair = (QK^T + PV) 4 * hidden forward, x3 for forward + backward; "
    "spans are the documents (for transformers' padded rows: the rows); padding counts nowhere"
)


def window_pairs(lengths: np.ndarray, half: int) -> np.ndarray:
    """(query, key) pairs with |i - j| <= half inside spans of `lengths` tokens (0 for empty spans)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    k = np.minimum(half, lengths - 1)
    return lengths + 2 * (k * lengths - k * (k + 1) // 2)


def attended_pairs(cfg: ModernBertConfig, span_lengths: np.ndarray) -> int:
    """Allowed (query, key) pairs summed over all layers, for attention spans of these lengths."""
    span_lengths = np.asarray(span_lengths, dtype=np.int64)
    n_global = sum(cfg.is_global_layer(i) for i in range(cfg.num_hidden_layers))
    n_local = cfg.num_hidden_layers - n_global
    return int(n_global * (span_lengths ** 2).sum()
               + n_local * window_pairs(span_lengths, cfg.local_attention // 2).sum())


def training_flops(cfg: ModernBertConfig, *, real_tokens: int, masked_tokens: int,
                   span_lengths: np.ndarray) -> float:
    """Forward + backward FLOPs of one step over these tokens (FLOP_FORMULA)."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    p_enc = cfg.num_hidden_layers * (4 * hidden * hidden + 3 * hidden * inter)
    p_head = hidden * hidden + hidden * cfg.vocab_size
    pairs = attended_pairs(cfg, span_lengths)
    return 6.0 * p_enc * real_tokens + 12.0 * hidden * pairs + 6.0 * p_head * masked_tokens
