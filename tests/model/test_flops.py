"""model/flops.py: the attention pair count against brute force, the formula against a hand count."""
from __future__ import annotations

import numpy as np
import pytest

from modernbert_train.model import preset
from modernbert_train.model.flops import attended_pairs, training_flops, window_pairs


@pytest.mark.parametrize("length, half, expected", [(0, 2, 0), (1, 2, 1), (3, 1, 7), (5, 64, 25), (10, 2, 44)])
def test_window_pairs_counts_the_band(length, half, expected):
    i = np.arange(length)
    brute = int((np.abs(i[:, None] - i[None, :]) <= half).sum())
    got = int(window_pairs(np.array([length]), half)[0])
    assert got == brute == expected, (got, brute, expected)


def test_training_flops_by_hand_for_the_tiny_model():
    cfg = preset("tiny")  # 4 layers (0 and 3 global), hidden 128, intermediate 256, window 32, vocab 4096
    spans = np.array([100, 10])
    local = int(window_pairs(spans, 16).sum())
    assert attended_pairs(cfg, spans) == 2 * (100 ** 2 + 10 ** 2) + 2 * local
    p_enc = 4 * (4 * 128 * 128 + 3 * 128 * 256)
    p_head = 128 * 128 + 128 * 4096
    expected = 6 * p_enc * 110 + 12 * 128 * attended_pairs(cfg, spans) + 6 * p_head * 33
    assert training_flops(cfg, real_tokens=110, masked_tokens=33, span_lengths=spans) == expected
