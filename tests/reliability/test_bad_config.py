"""Bad settings through the real CLI: one clear message at start-up, exit status 2, no traceback,
nothing trained."""
from __future__ import annotations

import pytest

from tests.reliability.conftest import REPO, run_train, trained_batches

# (overrides, what the message must say). The tiny recipe: global batch 32, microbatch 8,
# max_position_embeddings 512; these fail while the config is read, before anything is built.
CONFIG_ERRORS = {
    "misspelled-key": (["optimizer.lrr=1e-3"],
                       "unknown config key 'optimizer.lrr'. Did you mean 'optimizer.lr'?"),
    "misspelled-section": (["optimiser.lr=1e-3"], "unknown config key 'optimiser'"),
    "odd-window": (["model.local_attention=33"],
                   "model.local_attention=33 must be a positive even number"),
    "microbatch-above-batch": (["data.microbatch_seqs=64"],
                               "data.microbatch_seqs=64 is larger than batch.global_batch_seqs=32"),
    "seq-beyond-rope": (["data.max_seq_len=1024"],
                        "data.max_seq_len=1024 exceeds model.max_position_embeddings=512"),
    "wrong-type": (["data.num_workers=two"], "bad value for 'data.num_workers'"),
    "not-key-value": (["optimizer.lr"], "overrides must be key=value"),
    "duration-in-epochs": (["max_duration=2ep"],
                           "max_duration='2ep': use a positive number of tokens (tok), batches (ba) or samples (sp)"),
    "zero-microbatch": (["data.microbatch_seqs=0"], "data.microbatch_seqs=0 must be >= 1"),
    "list-item-override": (["optimizer.betas.1=0.95"], "a list is set whole (e.g. optimizer.betas=[0.9,0.95])"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overrides, message", list(CONFIG_ERRORS.values()), ids=list(CONFIG_ERRORS))
def test_bad_setting_is_one_message_and_exit_2(tmp_path, demo_data, overrides, message):
    result = run_train(demo_data, tmp_path, *overrides, fast=False, timeout_s=100)
    assert result.returncode == 2, result.tail()
    assert message in result.output, result.tail()
    assert "Traceback" not in result.output, result.tail()
    assert result.output.count("error:") == 1, result.tail()


@pytest.mark.timeout(120)
def test_missing_recipe_is_exit_2(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides, message", [
    (["model.attention_backend=flash"], "attention backend 'flash' is not available: flash-attn "),
], ids=["backend-not-installed"])
def test_setting_found_bad_while_building_stops_before_training(tmp_path, demo_data, overrides, message):
    """Found while the trainer is assembled (after the config is read): still one message, exit 2,
    and no batch trained."""
    result = run_train(demo_data, tmp_path, "device=cpu", *overrides, timeout_s=250)
    assert result.returncode == 2, result.tail()
    assert message in result.output, result.tail()
    assert "Traceback" not in result.output, result.tail()
    assert trained_batches(tmp_path / "run") == []
