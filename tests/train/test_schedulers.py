"""LR schedules over tokens and the batch-size warmup, checked at their boundaries."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from composer.core import Time, Timestamp, TimeUnit
from composer.optim import compile_composer_scheduler

from modernbert_train.train.config import SchedulerConfig
from modernbert_train.train.schedulers import (WarmupStableDecay, build_scheduler,
                                               chunks_per_step, wsd_multiplier)

WSD = dict(warmup_tokens=100, decay_tokens=400, total_tokens=1000, final_lr_ratio=0.1)


@pytest.mark.parametrize("tokens,expected", [
    (0, 0.0), (25, 0.25), (100, 1.0), (350, 1.0), (600, 1.0),
    (700, 1.0 - 0.9 * math.sqrt(0.25)),  # a quarter of the decay: 1 - (1 - 0.1) * sqrt(0.25)
    (1000, 0.1), (5000, 0.1),
])
def test_wsd_one_minus_sqrt_values(tokens, expected):
    got = wsd_multiplier(tokens, **WSD, decay_shape="one_minus_sqrt")
    assert got == pytest.approx(expected), (tokens, got, expected)


@pytest.mark.parametrize("tokens,expected", [(600, 1.0), (800, 0.55), (1000, 0.1)])
def test_wsd_linear_values(tokens, expected):
    assert wsd_multiplier(tokens, **WSD, decay_shape="linear") == pytest.approx(expected)


def test_wsd_monotonic_pieces():
    values = [wsd_multiplier(t, **WSD) for t in range(0, 1001, 5)]
    warm, decay = values[:21], values[120:]
    assert all(b >= a for a, b in zip(warm, warm[1:])), warm
    assert all(b <= a for a, b in zip(decay, decay[1:])), decay
    assert values[20:121] == [1.0] * 101
    assert values[-1] == pytest.approx(0.1)


def test_wsd_no_decay_is_warmup_then_constant():
    kw = dict(warmup_tokens=100, decay_tokens=0, total_tokens=1000, final_lr_ratio=0.0)
    assert [wsd_multiplier(t, **kw) for t in (0, 50, 100, 1000, 2000)] == [0.0, 0.5, 1.0, 1.0, 1.0]


def test_wsd_rejects_bad_lengths():
    with pytest.raises(ValueError, match="decay_tokens=2000 exceeds the run's total_tokens=1000"):
        WarmupStableDecay(warmup_tokens=0, decay_tokens=2000, total_tokens=1000)
    with pytest.raises(ValueError, match="decay_shape='cosine'"):
        WarmupStableDecay(100, 100, 1000, decay_shape="cosine")  # type: ignore[arg-type]


def _state_at(tokens: int):
    return SimpleNamespace(timestamp=SimpleNamespace(token=Time(tokens, TimeUnit.TOKEN)))


def test_scheduler_reads_state_tokens_and_ssr():
    sched = WarmupStableDecay(**WSD)
    assert sched(_state_at(50)) == pytest.approx(0.5)
    # ssr=2 stretches the warmup to 200 tokens.
    assert sched(_state_at(50), ssr=2.0) == pytest.approx(0.25)


def test_compiled_by_composer_sets_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    state = SimpleNamespace(optimizers=[opt], timestamp=SimpleNamespace(token=Time(0, TimeUnit.TOKEN)))
    lr_sched = compile_composer_scheduler(WarmupStableDecay(**WSD), state)  # type: ignore[arg-type]
    assert opt.param_groups[0]["lr"] == 0.0
    state.timestamp.token = Time(50, TimeUnit.TOKEN)
    opt.step()  # no grad: a no-op that keeps torch's step-order check quiet
    lr_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


@pytest.mark.parametrize("name,tokens,expected", [
    ("constant", 50, 0.5), ("constant", 10_000, 1.0),
    ("wsd", 800, 1.0 - 0.9 * math.sqrt(0.5)),
    ("decay", 0, 1.0), ("decay", 100, 1.0 - 0.9 * math.sqrt(0.25)), ("decay", 400, 0.1),
    ("decay", 1000, 0.1),  # decay over 400 tokens, then held at the final ratio
])
def test_build_scheduler_names(name, tokens, expected):
    warmup = 0 if name == "decay" else 100
    cfg = SchedulerConfig(name=name, warmup_tokens=warmup, decay_tokens=400, final_lr_ratio=0.1)
    sched = build_scheduler(cfg, total_tokens=1000)
    assert sched(_state_at(tokens)) == pytest.approx(expected), (name, tokens)


def test_decay_over_whole_run_when_no_length():
    cfg = SchedulerConfig(name="decay", warmup_tokens=0, decay_tokens=0, final_lr_ratio=0.0)
    sched = build_scheduler(cfg, total_tokens=1000)
    assert [round(sched(_state_at(t)), 6) for t in (0, 250, 1000)] == [1.0, 0.5, 0.0]


def test_unknown_scheduler_name():
    with pytest.raises(ValueError, match="scheduler.name='cosine'"):
        build_scheduler(SchedulerConfig(name="cosine"), total_tokens=1000)


# ModernBERT base: 768 -> 4608 sequences over 50B tokens at 1024, microbatch 96, 8 GPUs.
BASE = dict(start_seqs=768, end_seqs=4608, warmup_tokens=50_000_000_000, max_seq_len=1024,
            microbatch_seqs=96, world_size=8)


@pytest.mark.parametrize("tokens,expected", [
    (0, 1),                     # 768 sequences = one chunk on each of 8 ranks
    (10_000_000_000, 2),        # 768 + 3840 * 0.2 = 1536 -> 2 chunks
    (25_000_000_000, 3),        # 2688 -> rounded down to 2304 -> 3
    (49_999_999_000, 5),        # just short of the end: 4607.99 -> 3840 -> 5
    (50_000_000_000, 6),        # 4608 / 768
    (90_000_000_000, 6),
])
def test_chunks_per_step_modernbert_base(tokens, expected):
    samples = tokens // 1024
    assert chunks_per_step(samples, **BASE) == expected, (tokens, samples)


def test_chunks_per_step_monotonic_and_bounded():
    steps = [chunks_per_step(s, **BASE) for s in range(0, 60_000_000, 500_000)]
    assert steps[0] == 1 and steps[-1] == 6
    assert all(b >= a for a, b in zip(steps, steps[1:]))
    assert set(steps) == {1, 2, 3, 4, 5, 6}


@pytest.mark.parametrize("samples,expected", [(0, 1), (8, 1), (16, 2), (24, 3), (31, 3), (32, 4)])
def test_chunks_per_step_small(samples, expected):
    # 2 -> 8 sequences over 32 * 4 tokens, microbatch 2, one rank: 2 + 6 * samples/32 sequences.
    got = chunks_per_step(samples, start_seqs=2, end_seqs=8, warmup_tokens=128, max_seq_len=4,
                          microbatch_seqs=2, world_size=1)
    assert got == expected, (samples, got)


def test_chunks_per_step_at_least_one_chunk_per_rank():
    # Start below one chunk per rank (4 ranks x 2 = 8 > start of 2 sequences).
    got = chunks_per_step(0, start_seqs=2, end_seqs=16, warmup_tokens=100, max_seq_len=1,
                          microbatch_seqs=2, world_size=4)
    assert got == 1


def test_chunks_per_step_without_warmup():
    kw = dict(end_seqs=4608, warmup_tokens=0, max_seq_len=1024, microbatch_seqs=96, world_size=8)
    assert chunks_per_step(0, start_seqs=768, **kw) == 6
    assert chunks_per_step(0, start_seqs=None, **{**kw, "warmup_tokens": 10}) == 6


def test_chunks_per_step_indivisible_end_names_numbers():
    with pytest.raises(ValueError, match=r"4608 sequences .* microbatch_seqs=96 x world_size=7 = 672"):
        chunks_per_step(0, start_seqs=None, end_seqs=4608, warmup_tokens=0, max_seq_len=1024,
                        microbatch_seqs=96, world_size=7)


@pytest.mark.parametrize("unit", [TimeUnit.BATCH, TimeUnit.SAMPLE])
def test_a_run_in_batches_or_samples_ends_its_decay_at_its_last_batch(unit):
    """yamls/tiny.yaml: 400ba with a decay to 0 over the last 600k tokens. Converted at full batches
    the run is 400 x 32 x 128 = 1,638,400 tokens, but padding and the batch-size warmup leave ~1.5M
    real ones: on the token clock the run ended with the lr at 12% of its peak. The decay follows the
    run's own unit; the warmup still counts real tokens."""
    length = 400 if unit == TimeUnit.BATCH else 400 * 32
    cfg = SchedulerConfig(name="wsd", warmup_tokens=100_000, decay_tokens=600_000, final_lr_ratio=0.0)
    sched = build_scheduler(cfg, total_tokens=400 * 32 * 128)

    def at(fraction: float, real_tokens: int) -> float:
        done = int(length * fraction)
        stamp = Timestamp(batch=done if unit == TimeUnit.BATCH else 0,
                          sample=done if unit == TimeUnit.SAMPLE else 0, token=real_tokens)
        return sched(SimpleNamespace(timestamp=stamp, max_duration=Time(length, unit)))

    assert at(1.0, 1_504_000) == 0.0, "the last batch ends the decay, whatever tokens it held"
    # 7/8 of the run: 1,433,600 of 1,638,400 nominal tokens, 395,200 into the 600k decay window.
    assert at(7 / 8, 1_300_000) == pytest.approx(1.0 - math.sqrt(395_200 / 600_000))
    assert at(0.5, 700_000) == 1.0, "stable before the decay window"
    assert at(0.01, 50_000) == pytest.approx(0.5), "the warmup counts real tokens"
    # A run in tokens keeps the token clock (its last batch is at or past max_duration's tokens).
    token_run = SimpleNamespace(timestamp=Timestamp(batch=1, token=1_504_000),
                                max_duration=Time(1_638_400, TimeUnit.TOKEN))
    assert sched(token_run) == pytest.approx(1.0 - math.sqrt((1_504_000 - 1_038_400) / 600_000))
