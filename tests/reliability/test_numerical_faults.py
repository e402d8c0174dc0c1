"""Non-finite training: the run stops with a message naming the batch, and the checkpoint that
`latest` names afterwards holds finite weights (autoresume never restarts from a broken state)."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch

from tests.reliability.conftest import fault_hook_env, load_checkpoint, metrics_rows, run_train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Turns one parameter element into NaN right after optimizer step FAULT_STEP (1-based): what an
# inf gradient does through the update while the loss of that batch was still finite.
NAN_UPDATE = '''
import os, torch

def patch(module):
    original = module.build_optimizer
    def build_optimizer(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        steps = [0]
        def poison(opt, *_):
            steps[0] += 1
            if steps[0] == int(os.environ["FAULT_STEP"]):
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        optimizer.register_step_post_hook(poison)
        return optimizer
    module.build_optimizer = build_optimizer
'''

def _finite(checkpoint) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(checkpoint)["state"]["model"].values())


# sync_free_steps reads each batch's loss one batch late (train/trainer.py): same guarantees.
SYNC_FREE = pytest.mark.parametrize("sync_free", ["false", "true"], ids=["stock", "sync_free_steps"])


@SYNC_FREE
def test_diverging_loss_stops_naming_the_batch_and_latest_stays_finite(tmp_path, demo_data, sync_free):
    """lr 1e6 without clipping diverges within a few steps (the lr warms up from 0)."""
    ckpt = tmp_path / "ckpt"
    result = run_train(demo_data, tmp_path, "max_duration=12ba", f"checkpoint.save_folder={ckpt}",
                       "checkpoint.save_interval=1ba", "optimizer.lr=1e6", "optimizer.grad_clip_norm=null",
                       f"sync_free_steps={sync_free}")
    assert result.returncode != 0, result.tail()
    match = re.search(r"non-finite training loss (nan|inf|-inf) at batch (\d+) \(token (\d+)\)", result.output)
    assert match, result.tail()
    bad, token = int(match[2]), int(match[3])  # named as metrics.jsonl names that batch
    rows = {r["batch"]: r for r in metrics_rows(tmp_path / "run") if "loss/train/total" in r}
    assert rows[bad]["loss/train/total"] is None, rows  # NaN/inf are written as null
    assert rows[bad]["tokens"] == token, (rows[bad], token)
    assert all(math.isfinite(rows[b]["loss/train/total"]) for b in range(bad)), rows
    # Checkpoint ep0-baN holds the N batches 0..N-1: the last one holds every batch before the bad one.
    assert not (ckpt / f"ep0-ba{bad + 1}-rank0.pt").exists(), "the bad batch was checkpointed"
    latest = os.readlink(ckpt / "latest-rank0.pt")
    assert latest == f"ep0-ba{bad}-rank0.pt", latest
    assert _finite(ckpt / latest)


@SYNC_FREE
def test_non_finite_weights_are_never_checkpointed(tmp_path, demo_data, sync_free):
    ckpt = tmp_path / "ckpt"
    env = fault_hook_env(tmp_path / "hook", "modernbert_train.train.optim", NAN_UPDATE)
    result = run_train(demo_data, tmp_path, "max_duration=12ba", f"checkpoint.save_folder={ckpt}",
                       "checkpoint.save_interval=4ba", f"sync_free_steps={sync_free}",
                       env={**env, "FAULT_STEP": "8"})
    assert result.returncode != 0, result.tail()
    # Step 8 is batch 7 in metrics.jsonl, the last one trained; its checkpoint would be ep0-ba8.
    trained = max(r["batch"] for r in metrics_rows(tmp_path / "run") if "loss/train/total" in r)
    assert trained == 7 and "non-finite weights after batch 7;" in result.output, (trained, result.tail())
    assert os.readlink(ckpt / "latest-rank0.pt") == "ep0-ba4-rank0.pt"
    assert not (ckpt / "ep0-ba8-rank0.pt").exists(), "a checkpoint with NaN weights was written"


# The loss Composer logs for microbatch calls FAULT_CALL (1-based) is NaN while its gradients stay
# finite (a NaN constant added outside the graph): a batch whose weights pass the weight check.
NAN_LOGGED_LOSS = '''
import os, torch

def patch(module):
    original = module.MLMComposerModel.loss
    calls = [0]
    def loss(self, outputs, batch):
        calls[0] += 1
        value = original(self, outputs, batch)
        if calls[0] == int(os.environ["FAULT_CALL"]):
            value = value + torch.tensor(float("nan"))
        return value
    module.MLMComposerModel.loss = loss
'''


@SYNC_FREE
def test_a_batch_with_a_nan_loss_is_never_checkpointed(tmp_path, demo_data, sync_free):
    """Even when its weights are finite: with sync_free_steps the batch's loss is only read one
    batch later, unless a checkpoint of that batch is due (then it is landed first)."""
    ckpt = tmp_path / "ckpt"
    env = fault_hook_env(tmp_path / "hook", "modernbert_train.train.composer_model", NAN_LOGGED_LOSS)
    # The reliability runs' batches are one microbatch each up to 3072 tokens (batch-size warmup,
    # conftest.FAST): call 6 is batch 5.
    result = run_train(demo_data, tmp_path, "max_duration=10ba", f"checkpoint.save_folder={ckpt}",
                       "checkpoint.save_interval=1ba", f"sync_free_steps={sync_free}",
                       env={**env, "FAULT_CALL": "6"})
    assert result.returncode != 0, result.tail()
    assert re.search(r"non-finite training loss nan at batch 5 \(token \d+\)", result.output), result.tail()
    assert "non-finite weights" not in result.output, result.tail()
    assert os.readlink(ckpt / "latest-rank0.pt") == "ep0-ba5-rank0.pt"
    assert not (ckpt / "ep0-ba6-rank0.pt").exists(), "the batch with the NaN loss was checkpointed"
    assert _finite(ckpt / "ep0-ba5-rank0.pt")
