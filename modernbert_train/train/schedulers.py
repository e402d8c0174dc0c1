"""Token-based learning-rate schedules (warmup-stable-decay and friends) and the batch-size warmup.

Both are pure functions of tokens / samples seen, so they resume exactly from a checkpoint's timestamp.
"""
from __future__ import annotations

import math
from typing import Literal

from composer.core import State, TimeUnit
from composer.optim import ComposerScheduler

from modernbert_train.train.config import SchedulerConfig

DecayShape = Literal["one_minus_sqrt", "linear"]


def _decay_fraction(progress: float, shape: str) -> float:
    """How far the decay has gone, 0 at its start and 1 at its end."""
    if shape == "one_minus_sqrt":
        return math.sqrt(progress)
    if shape == "linear":
        return progress
    raise ValueError(f"decay_shape={shape!r}: use 'one_minus_sqrt' or 'linear'")


def wsd_multiplier(tokens_seen: int, *, warmup_tokens: int, decay_tokens: int, total_tokens: int,
                   final_lr_ratio: float, decay_shape: str = "one_minus_sqrt",
                   decay_clock_tokens: int | None = None) -> float:
    """LR multiplier after `tokens_seen` tokens: linear warmup from 0, 1.0, then decay in the last
    `decay_tokens` of `total_tokens` down to `final_lr_ratio` (1-sqrt or linear). The decay reads
    `decay_clock_tokens` where given (see `WarmupStableDecay`), else `tokens_seen`."""
    if decay_tokens < 0 or warmup_tokens < 0:
        raise ValueError(f"negative schedule length: warmup_tokens={warmup_tokens}, "
                         f"decay_tokens={decay_tokens}")
    if decay_tokens > total_tokens:
        raise ValueError(f"decay_tokens={decay_tokens} exceeds the run's total_tokens={total_tokens}")
    warmup = min(1.0, tokens_seen / warmup_tokens) if warmup_tokens > 0 else 1.0
    decay_start_tokens = total_tokens - decay_tokens
    clock = tokens_seen if decay_clock_tokens is None else decay_clock_tokens
    if decay_tokens == 0 or clock <= decay_start_tokens:
        return warmup
    progress = min(1.0, (clock - decay_start_tokens) / decay_tokens)
    decayed = 1.0 - (1.0 - final_lr_ratio) * _decay_fraction(progress, decay_shape)
    # A decay that starts inside the warmup continues from wherever the warmup got to.
    return min(warmup, decayed)


class WarmupStableDecay(ComposerScheduler):
    """Composer scheduler over `state.timestamp.token`; see `wsd_multiplier`.

    A run whose max_duration is in batches or samples ends at its last batch, whatever number of
    real tokens that holds: fewer than `run_tokens` (its length converted at full batches) assumes,
    by the padding and by the smaller batches of a batch-size warmup. Its decay therefore runs on
    the elapsed fraction of the run (fraction x `run_tokens`), so that it ends where the run does;
    the warmup counts real tokens.
    """

    def __init__(self, warmup_tokens: int, decay_tokens: int, total_tokens: int,
                 final_lr_ratio: float = 0.0, decay_shape: DecayShape = "one_minus_sqrt",
                 run_tokens: int | None = None):
        self.warmup_tokens = warmup_tokens
        self.decay_tokens = decay_tokens
        self.total_tokens = total_tokens
        self.run_tokens = total_tokens if run_tokens is None else run_tokens
        self.final_lr_ratio = final_lr_ratio
        self.decay_shape = decay_shape
        # Fail at construction, not at the first step.
        wsd_multiplier(0, warmup_tokens=warmup_tokens, decay_tokens=decay_tokens,
                       total_tokens=total_tokens, final_lr_ratio=final_lr_ratio, decay_shape=decay_shape)
        _decay_fraction(0.5, decay_shape)

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        # A scale-schedule ratio stretches every boundary, as Composer's own schedulers do.
        tokens_seen = int(state.timestamp.token.value)
        max_duration = getattr(state, "max_duration", None)
        clock = None
        if max_duration is not None and max_duration.unit != TimeUnit.TOKEN:
            elapsed = min(1.0, state.timestamp.get(max_duration.unit).value / max_duration.value)
            clock = int(elapsed * self.run_tokens * ssr)
        return wsd_multiplier(
            tokens_seen,
            warmup_tokens=int(self.warmup_tokens * ssr),
            decay_tokens=int(self.decay_tokens * ssr),
            total_tokens=int(self.total_tokens * ssr),
            final_lr_ratio=self.final_lr_ratio,
            decay_shape=self.decay_shape,
            decay_clock_tokens=clock,
        )

    def __repr__(self) -> str:
        return (f"WarmupStableDecay(warmup_tokens={self.warmup_tokens}, decay_tokens="
                f"{self.decay_tokens}, total_tokens={self.total_tokens}, final_lr_ratio="
                f"{self.final_lr_ratio}, decay_shape={self.decay_shape!r}, run_tokens={self.run_tokens})")


def build_scheduler(cfg: SchedulerConfig, total_tokens: int) -> ComposerScheduler:
    """The configured schedule for a run of `total_tokens` tokens (the phase's max_duration)."""
    run_tokens = total_tokens
    if cfg.name == "wsd":
        decay_tokens = cfg.decay_tokens
    elif cfg.name == "constant":
        decay_tokens = 0
    elif cfg.name == "decay":
        # Decay from the start: over decay_tokens if given, else over the whole run.
        decay_tokens = cfg.decay_tokens if cfg.decay_tokens > 0 else total_tokens
        total_tokens = decay_tokens
    else:
        raise ValueError(f"scheduler.name={cfg.name!r}: use wsd, constant or decay")
    return WarmupStableDecay(warmup_tokens=cfg.warmup_tokens, decay_tokens=decay_tokens,
                             total_tokens=total_tokens, final_lr_ratio=cfg.final_lr_ratio,
                             decay_shape=cfg.decay_shape, run_tokens=run_tokens)  # type: ignore[arg-type]


def chunks_per_step(global_samples_seen: int, *, start_seqs: int | None, end_seqs: int,
                    warmup_tokens: int, max_seq_len: int, microbatch_seqs: int,
                    world_size: int) -> int:
    """One-chunk microbatches each rank takes this step under batch-size warmup.

    The global batch (in packed sequences) ramps linearly from `start_seqs` to `end_seqs` over
    `warmup_tokens`, with tokens approximated as samples * max_seq_len, rounded down to a whole
    number of chunks on every rank, at least one.
    """
    seqs_per_chunk_round = microbatch_seqs * world_size
    if end_seqs % seqs_per_chunk_round:
        raise ValueError(
            f"global batch of {end_seqs} sequences is not a multiple of microbatch_seqs="
            f"{microbatch_seqs} x world_size={world_size} = {seqs_per_chunk_round}")
    end_chunks = end_seqs // seqs_per_chunk_round
    if start_seqs is None or warmup_tokens <= 0:
        return end_chunks
    tokens_seen = global_samples_seen * max_seq_len
    if tokens_seen >= warmup_tokens:
        return end_chunks
    # Integer arithmetic: float rounding at a chunk boundary must not change a step's batch size.
    batch_seqs = start_seqs + (end_seqs - start_seqs) * tokens_seen // warmup_tokens
    return max(1, min(end_chunks, batch_seqs // seqs_per_chunk_round))
