"""MLM masking (80/10/10), pure and seeded per sample: the same (seed, key) always gives the same mask.

Selection is exact-count: each call masks exactly round(mask_rate * n_eligible) tokens, chosen
uniformly among the eligible (non-special, non-pad) positions. Exact counts keep the number of
loss-generating tokens per packed sequence constant, so the loss normaliser does not jitter.
Within the selected tokens, mask / random / keep are independent draws with the configured fractions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # label value the MLM loss skips (torch.nn.functional.cross_entropy default)


@dataclass(frozen=True)
class MaskingConfig:
    mask_rate: float = 0.3
    mask_token_fraction: float = 0.8  # of the selected tokens, replaced by [MASK]
    random_token_fraction: float = 0.1  # of the selected tokens, replaced by a random ordinary id

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_rate <= 1.0:
            raise ValueError(f"mask_rate must be in [0, 1], got {self.mask_rate}")
        if self.mask_token_fraction < 0 or self.random_token_fraction < 0 or (
            self.mask_token_fraction + self.random_token_fraction > 1.0
        ):
            raise ValueError(
                "mask_token_fraction and random_token_fraction must be >= 0 and sum to <= 1, got "
                f"{self.mask_token_fraction} + {self.random_token_fraction}"
            )


class MLMMasker:
    """Masks one packed sequence at a time; randomness comes only from (seed, key).

    `key` identifies the sequence (the loader passes (epoch, sample_idx)), so the mask does not
    depend on which worker or process computes it, or on what was masked before.
    """

    def __init__(
        self,
        cfg: MaskingConfig,
        *,
        mask_id: int,
        special_ids: Sequence[int],
        vocab_size: int,
        pad_id: int,
        seed: int,
    ) -> None:
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.cfg = cfg
        self.mask_id = int(mask_id)
        self.pad_id = int(pad_id)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        never_selected = {int(i) for i in special_ids} | {self.mask_id, self.pad_id}
        # Lookup table instead of np.isin: one gather per token, no sort.
        table_size = max(self.vocab_size, max(never_selected) + 1)
        self._is_special = np.zeros(table_size, dtype=bool)
        self._is_special[sorted(never_selected)] = True
        self._ordinary_ids = np.flatnonzero(~self._is_special[: self.vocab_size]).astype(np.int64)
        if len(self._ordinary_ids) == 0:
            raise ValueError(f"no ordinary ids below vocab_size={vocab_size} to draw replacements from")

    def __call__(self, input_ids: np.ndarray, key: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Return (masked input ids, labels) as int64 arrays; labels are -100 where not selected."""
        input_ids = np.asarray(input_ids)
        ids = input_ids.astype(np.int64, copy=True)
        labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
        if ids.size == 0:
            return ids, labels
        try:  # the table lookup doubles as the range check (too large ids raise IndexError) ...
            if input_ids.dtype.kind == "i" and ids.min() < 0:  # ... but negative ones would wrap
                raise IndexError
            eligible = ~self._is_special[ids]
        except IndexError:
            raise ValueError(
                f"token ids outside [0, {len(self._is_special)}): min {ids.min()}, max {ids.max()}"
            ) from None
        entropy = [self.seed, *((key,) if isinstance(key, (int, np.integer)) else tuple(key))]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in entropy])))

        n_eligible = int(eligible.sum())
        n_selected = int(round(self.cfg.mask_rate * n_eligible))
        # Draw a priority for every position (not only the eligible ones) so the random stream
        # consumed per sequence depends only on its length.
        priority = rng.random(ids.shape[0])
        if n_selected == 0:
            return ids, labels
        priority[~eligible] = 2.0  # never among the n_selected smallest
        selected = np.argpartition(priority, n_selected - 1)[:n_selected]

        labels[selected] = ids[selected]
        action = rng.random(n_selected)
        to_mask = selected[action < self.cfg.mask_token_fraction]
        random_upper = self.cfg.mask_token_fraction + self.cfg.random_token_fraction
        to_random = selected[(action >= self.cfg.mask_token_fraction) & (action < random_upper)]
        ids[to_mask] = self.mask_id
        ids[to_random] = self._ordinary_ids[rng.integers(0, len(self._ordinary_ids), to_random.size)]
        return ids, labels
