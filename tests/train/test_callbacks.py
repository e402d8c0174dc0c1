"""Our Composer callbacks, driven with the state fields they read."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from modernbert_train.train.callbacks import NonFiniteLossGuard


def _timestamp(batch: int) -> SimpleNamespace:
    return SimpleNamespace(batch=batch, token=1000 * batch, sample=10 * batch)


def test_non_finite_loss_guard_checks_each_logged_training_loss():
    guard, state = NonFiniteLossGuard(), SimpleNamespace(timestamp=_timestamp(0))
    guard.init(state, logger=None)
    guard.log_metrics({"loss/train/total": 2.5, "metrics/val/Loss": math.nan}, step=0)  # not a training loss
    state.timestamp = _timestamp(1)
    with pytest.raises(RuntimeError, match=r"non-finite training loss nan at batch 1 \(token 1000\)"):
        guard.log_metrics({"loss/train/total": math.nan}, step=1)


def test_non_finite_loss_guard_names_the_batch_a_late_loss_belongs_to():
    """sync_free_steps logs batch k's loss while batch k+1 runs: the guard names batch k."""
    guard, state = NonFiniteLossGuard(), SimpleNamespace(timestamp=_timestamp(4))
    guard.init(state, logger=None)
    guard.log_metrics({"time/batch": 4}, step=4)
    state.timestamp = _timestamp(5)
    guard.log_metrics({"time/batch": 5}, step=5)
    with pytest.raises(RuntimeError, match=r"non-finite training loss inf at batch 4 \(token 4000\)"):
        guard.log_metrics({"loss/train/total": torch.tensor([math.inf])}, step=4)
