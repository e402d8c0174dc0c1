"""train/builder.py: the trainer it builds steps the optimizer without a closure (no loss read back
between the backward passes and the step)."""
from __future__ import annotations

from pathlib import Path

import torch

from modernbert_train.data.synthetic import write_dataset
from modernbert_train.train.builder import build_trainer, fit
from modernbert_train.train.config import load_run_config
from tests.host_syncs import HostSyncDetector

REPO = Path(__file__).resolve().parents[2]


def test_optimizer_steps_after_the_backward_passes_without_a_closure(tmp_path):
    """Composer 0.32.1 would call optimizer.step(closure) under fp32 and bf16, the closure reading
    the loss back first (a GPU sync before the step). Built here: two steps of two chunks each;
    every step call gets no closure, and from the first forward pass to the end of the step no value
    is read back (recorded on the CPU by tests/host_syncs.py)."""
    data = write_dataset(tmp_path / "data", num_sequences=48, max_seq_len=128, vocab_size=4096)
    cfg = load_run_config(REPO / "yamls/tiny.yaml", [
        "device=cpu", "max_duration=2ba", "data.demo_root=null", "data.eval_streams=[]", "data.num_workers=0",
        f"data.tokenizer='{data.tokenizer.path}'", f"data.train_streams=[{{local: '{data.root}'}}]",
        "data.train_split=train", "model.attention_backend=flex", "batch.global_batch_seqs=16",
        "batch.warmup_start_seqs=null", "batch.warmup_tokens=0", "scheduler.decay_tokens=0",
        "checkpoint.save_folder=null", "checkpoint.autoresume=false", "logging.wandb_mode=disabled",
        "logging.progress_bar=false", "logging.metrics_file=false", f"run_dir='{tmp_path / 'run'}'"])
    trainer = build_trainer(cfg)
    calls, steps = [], []
    trainer.state.optimizers[0].register_step_pre_hook(lambda opt, args, kwargs: calls.append((args, kwargs)))

    def recorded_batch(*args, **kwargs):  # Composer's whole step: microbatches, then the optimizer
        with HostSyncDetector() as detector:
            steps.append(detector.syncs)
            return run_batch(*args, **kwargs)

    run_batch, trainer._train_batch = trainer._train_batch, recorded_batch
    trainer.state.model.register_forward_pre_hook(lambda module, args: steps[-1].append(("forward", "")))
    fit(trainer, cfg)
    trainer.close()
    assert len(calls) == 2 and len(steps) == 2, (calls, steps)
    # (the hook's args start with the optimizer itself)
    assert all(len(args) == 1 and kwargs.get("closure") is None for args, kwargs in calls), calls
    for events in steps:
        # From the first forward pass on: nothing read back until the step returns. (Before it,
        # Composer reads its batch size once, while the GPU has no work queued. optimi's CPU code
        # path reads one value per tensor, its CUDA Triton path none: left out.)
        first = events.index(("forward", ""))
        assert events.count(("forward", "")) == 2, events  # two chunks per step
        waits = [e for e in events[first:] if e[0] != "forward" and "optimi/" not in e[1]]
        assert waits == [], waits
    assert torch.isfinite(torch.tensor(trainer.state.total_loss_dict["loss/train/total"]))
