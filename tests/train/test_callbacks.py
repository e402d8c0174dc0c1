"""Our Composer callbacks, driven with the state fields they read."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from modernbert_train.train.callbacks import NonFiniteLossGuard


def _state(total_loss_dict: dict, last_microbatch_loss: float, batch: int) -> SimpleNamespace:
    return SimpleNamespace(total_loss_dict=total_loss_dict, loss=torch.tensor(last_microbatch_loss),
                           previous_timestamp=SimpleNamespace(batch=batch, token=1000 * batch))


def test_non_finite_loss_guard_reads_the_logged_total_of_every_microbatch():
    guard = NonFiniteLossGuard()
    guard.batch_end(_state({"loss/train/total": 2.5}, 2.5, batch=0), logger=None)
    # An earlier microbatch went NaN, the last one is finite: the logged total is NaN.
    with pytest.raises(RuntimeError, match=r"non-finite training loss nan at batch 1 \(token 1000\)"):
        guard.batch_end(_state({"loss/train/total": math.nan}, 2.5, batch=1), logger=None)


def test_non_finite_loss_guard_reads_the_device_loss_when_composer_kept_the_old_total():
    guard = NonFiniteLossGuard()
    total = {"loss/train/total": 2.5}
    guard.batch_end(_state(total, 2.5, batch=0), logger=None)
    # Same dict object: Composer did not log this batch (fp16 step skipped by the grad scaler).
    with pytest.raises(RuntimeError, match=r"non-finite training loss inf at batch 1 \(token 1000\)"):
        guard.batch_end(_state(total, math.inf, batch=1), logger=None)
