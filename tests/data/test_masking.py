"""MLM masking: exact rate, 80/10/10 split, specials and padding never touched, reproducible per key."""
from __future__ import annotations

import numpy as np
import pytest

from modernbert_train.data.masking import IGNORE_INDEX, MaskingConfig, MLMMasker

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIALS = (PAD, CLS, SEP, MASK, UNK)
VOCAB = 1000


def make_masker(seed: int = 7, **cfg: float) -> MLMMasker:
    return MLMMasker(MaskingConfig(**cfg), mask_id=MASK, special_ids=SPECIALS, vocab_size=VOCAB,
                     pad_id=PAD, seed=seed)


def packed_sequence(rng: np.random.Generator, n_tokens: int) -> np.ndarray:
    """Documents [CLS] body [SEP] end to end, then padding for the last ~5%."""
    ids = rng.integers(5, VOCAB, n_tokens)
    starts = np.sort(rng.choice(n_tokens - 1, n_tokens // 50, replace=False))
    ids[starts], ids[starts + 1] = CLS, SEP
    ids[-n_tokens // 20:] = PAD
    return ids.astype(np.uint16)


def test_statistics_over_200k_tokens():
    rng = np.random.default_rng(0)
    masker = make_masker()
    n_eligible = n_selected = n_mask = n_random = n_keep = 0
    for key in range(200):
        ids = packed_sequence(rng, 1024)
        masked, labels = masker(ids, key)
        ids = ids.astype(np.int64)
        selected = labels != IGNORE_INDEX
        special = np.isin(ids, SPECIALS)
        assert not (selected & special).any(), f"key {key}: specials selected at {np.flatnonzero(selected & special)}"
        assert (masked[~selected] == ids[~selected]).all(), f"key {key}: unselected tokens changed"
        assert (labels[selected] == ids[selected]).all(), f"key {key}: labels differ from originals"
        # Exact count per call, not just on average.
        assert selected.sum() == round(0.3 * (~special).sum()), f"key {key}: {selected.sum()} selected"
        is_mask = selected & (masked == MASK)
        is_keep = selected & (masked == ids)
        is_random = selected & ~is_mask & ~is_keep
        assert not np.isin(masked[is_random], SPECIALS).any(), f"key {key}: special id as random replacement"
        assert (masked[is_random] < VOCAB).all()
        n_eligible += (~special).sum()
        n_selected += selected.sum()
        n_mask += is_mask.sum()
        n_random += is_random.sum()
        n_keep += is_keep.sum()
    assert n_eligible > 180_000
    assert abs(n_selected / n_eligible - 0.3) < 0.005, n_selected / n_eligible
    # A random replacement can draw the original id (p = 1/995); it then counts as "keep".
    assert abs(n_mask / n_selected - 0.8) < 0.01, n_mask / n_selected
    assert abs(n_random / n_selected - 0.1) < 0.01, n_random / n_selected
    assert abs(n_keep / n_selected - 0.1) < 0.01, n_keep / n_selected


def test_same_key_same_mask_and_keys_differ():
    ids = packed_sequence(np.random.default_rng(1), 512)
    a_ids, a_labels = make_masker()(ids, (3, 41))
    b_ids, b_labels = make_masker()(ids, (3, 41))  # a new masker object, as in another worker
    assert (a_ids == b_ids).all() and (a_labels == b_labels).all()
    for other in [make_masker()(ids, (4, 41)), make_masker()(ids, (3, 42)), make_masker(seed=8)(ids, (3, 41))]:
        assert (other[1] != a_labels).any(), "different key or seed gave the identical mask"


def test_int_key_equals_one_element_tuple():
    ids = packed_sequence(np.random.default_rng(2), 256)
    assert (make_masker()(ids, 5)[1] == make_masker()(ids, (5,))[1]).all()


@pytest.mark.parametrize("mask_rate", [0.0, 1.0])
def test_rate_extremes(mask_rate):
    ids = packed_sequence(np.random.default_rng(3), 256)
    masked, labels = make_masker(mask_rate=mask_rate)(ids, 0)
    eligible = ~np.isin(ids, SPECIALS)
    assert ((labels != IGNORE_INDEX) == (eligible if mask_rate else np.zeros_like(eligible))).all()


def test_all_special_sequence_selects_nothing():
    ids = np.array([CLS, SEP, CLS, SEP, PAD, PAD], dtype=np.uint16)
    masked, labels = make_masker(mask_rate=1.0)(ids, 0)
    assert (labels == IGNORE_INDEX).all() and (masked == ids).all()


def test_rejects_out_of_vocab_ids():
    with pytest.raises(ValueError, match="outside"):
        make_masker()(np.array([CLS, VOCAB + 5, SEP]), 0)


def test_rejects_bad_fractions():
    with pytest.raises(ValueError, match="sum"):
        MaskingConfig(mask_token_fraction=0.9, random_token_fraction=0.2)
