"""train/trainer.py through train/builder.py's build_trainer: the optimizer steps without a closure
(no loss read back between the backward passes and the step), and with `sync_free_steps` nothing
waits for the GPU between steps either (emulated on the CPU), while training the same."""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from composer.core import Callback
from composer.devices import DeviceCPU

from modernbert_train.data.synthetic import write_dataset
from modernbert_train.model.attention import flex_cpu_training_missing
from modernbert_train.train.builder import build_trainer, fit
from modernbert_train.train.config import RunConfig, load_run_config
from modernbert_train.train.trainer import HostBookkeepingGPU
from tests.host_syncs import DeviceResidency, HostSyncDetector

REPO = Path(__file__).resolve().parents[2]
# The CPU runs below train with FlexAttention, the backend whose step reads nothing back.
needs_flex_on_cpu = pytest.mark.skipif(bool(flex_cpu_training_missing()), reason=str(flex_cpu_training_missing()))


def _dataset(root: Path) -> tuple[Path, Path]:
    """Synthetic shards under root: (their root, their tokenizer.json)."""
    data = write_dataset(root, num_sequences=160, max_seq_len=128, vocab_size=4096)
    return data.root, data.tokenizer.path


def _run_config(tmp_path: Path, *overrides: str, data: tuple[Path, Path] | None = None) -> RunConfig:
    """The tiny recipe on synthetic shards (`data`, or written under tmp_path), FlexAttention (no
    host sync in its step), two chunks of 8 sequences per step, no eval, no checkpoints."""
    root, tokenizer = data or _dataset(tmp_path / "data")
    return load_run_config(REPO / "yamls/tiny.yaml", [
        "device=cpu", "max_duration=2ba", "data.demo_root=null", "data.eval_streams=[]", "data.num_workers=0",
        f"data.tokenizer='{tokenizer}'", f"data.train_streams=[{{local: '{root}'}}]",
        "data.train_split=train", "model.attention_backend=flex", "batch.global_batch_seqs=16",
        "batch.warmup_start_seqs=null", "batch.warmup_tokens=0", "scheduler.decay_tokens=0",
        "checkpoint.save_folder=null", "checkpoint.autoresume=false", "logging.wandb_mode=disabled",
        "logging.progress_bar=false", "logging.metrics_file=false", f"run_dir='{tmp_path / 'run'}'",
        *overrides])


@needs_flex_on_cpu
def test_optimizer_steps_after_the_backward_passes_without_a_closure(tmp_path):
    """Composer 0.32.1 would call optimizer.step(closure) under fp32 and bf16, the closure reading
    the loss back first (a GPU sync before the step). Built here: two steps of two chunks each;
    every step call gets no closure, and from the first forward pass to the end of the step no value
    is read back (recorded on the CPU by tests/host_syncs.py). Stock bookkeeping: with
    sync_free_steps the previous batch's loss lands in the step, from pinned host memory (the tests
    below tell host and device tensors apart)."""
    cfg = _run_config(tmp_path, "sync_free_steps=false")
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


class _EmulatedGPU(DeviceCPU):
    """Composer's DeviceGPU, on the CPU: what it would move to the GPU is copied and marked."""

    def __init__(self, residency: DeviceResidency):
        super().__init__()
        self.residency = residency

    def tensor_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.residency.mark(tensor.clone())


class _EmulatedHostBookkeepingGPU(HostBookkeepingGPU):
    """HostBookkeepingGPU's own routing, with its move to the GPU emulated as above."""

    def __init__(self, residency: DeviceResidency):  # DeviceGPU.__init__ needs CUDA
        self._device = torch.device("cpu")
        self.residency = residency

    def to_gpu(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.residency.mark(tensor.clone())


def _syncs_between_batch_ends(tmp_path: Path, sync_free: bool, batches: int, *overrides: str,
                              data=None) -> list[list[tuple[str, str]]]:
    """The real trainer for `batches` batches on an emulated GPU; the waits for the GPU recorded
    from each batch's end to the next one's (data fetch, bookkeeping, the whole step, logging)."""
    cfg = _run_config(tmp_path, f"max_duration={batches}ba", f"sync_free_steps={str(sync_free).lower()}", *overrides,
                      data=data)
    trainer = build_trainer(cfg)
    residency = DeviceResidency()
    device = _EmulatedHostBookkeepingGPU(residency) if sync_free else _EmulatedGPU(residency)
    # The model already sits on the CPU, the run's "GPU": it moved before any batch.
    trainer.state.device = device
    for t in [*trainer.state.model.parameters(), *trainer.state.model.buffers()]:
        residency.mark(t)
    detector = HostSyncDetector(residency)
    ends: list[int] = []

    class MarkBatchEnd(Callback):  # appended last: after SpeedMonitor's batch_end
        def batch_end(self, state, logger):
            ends.append(len(detector.syncs))

    trainer.state.callbacks.append(MarkBatchEnd())
    with detector:
        fit(trainer, cfg)
    trainer.close()
    assert len(ends) == batches, ends
    return [detector.syncs[a:b] for a, b in zip(ends, ends[1:])]


def _without_optimi_cpu_reads(syncs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    # torch-optimi's CPU code path reads one value per tensor; its CUDA (Triton) path reads none.
    return [s for s in syncs if "optimi/" not in s[1]]


@needs_flex_on_cpu
def test_stock_composer_waits_for_the_gpu_between_every_two_batches(tmp_path):
    """The control for the next test: the emulation sees Composer's reads of device values (the
    loss, its counts), so an empty record there means something."""
    per_batch = _syncs_between_batch_ends(tmp_path, sync_free=False, batches=4)
    assert len(per_batch) == 3
    for syncs in per_batch:
        # Composer 0.32.1: end of data, batch size, the loss, samples + tokens + batch time, FLOPs.
        functions = sorted(site.split(" (")[-1].rstrip(")") for _, site in _without_optimi_cpu_reads(syncs))
        assert functions == ["<dictcomp>", "_accumulate_time_across_ranks", "_accumulate_time_across_ranks",
                             "_accumulate_time_across_ranks", "_iter_dataloader", "_train_microbatches",
                             "batch_end"], syncs


@needs_flex_on_cpu
def test_sync_free_steps_never_wait_for_the_gpu_between_batches(tmp_path):
    """sync_free_steps: from one batch's end to the next (fetching it, Composer's bookkeeping, the
    step, landing the previous batch's loss, logging), nothing reads a device value back."""
    per_batch = _syncs_between_batch_ends(tmp_path, sync_free=True, batches=4)
    assert len(per_batch) == 3
    for syncs in per_batch:
        assert _without_optimi_cpu_reads(syncs) == [], syncs


def _rank_syncs(rank: int, port: int, tmp: Path, data: tuple[Path, Path], sync_free: bool, out) -> None:
    """One of two ranks (gloo on the CPU) of _syncs_between_batch_ends, in a spawned process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        multi_rank = [f"sync_free_multi_rank={str(sync_free).lower()}"]
        out.put((rank, _syncs_between_batch_ends(tmp / f"rank{rank}", sync_free, 4, *multi_rank, data=data)))
    except BaseException as err:  # the parent reports it
        out.put((rank, f"{type(err).__name__}: {err}"))


def _two_rank_syncs(tmp_path: Path, sync_free: bool) -> dict[int, list[list[tuple[str, str]]]]:
    from tests.s3_server import free_port

    data = _dataset(tmp_path / "data")  # written once, before the ranks read it
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_syncs, args=(rank, port, tmp_path, data, sync_free, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank, result in results.items():
        assert not isinstance(result, str), f"rank {rank}: {result}"
    return results


@needs_flex_on_cpu
def test_two_ranks_stock_composer_waits_for_the_gpu_between_batches(tmp_path):
    """The control for the next test, on two ranks: Composer reads the reduced loss and counts back."""
    for rank, per_batch in _two_rank_syncs(tmp_path, sync_free=False).items():
        assert len(per_batch) == 3 and all(_without_optimi_cpu_reads(syncs) for syncs in per_batch), (rank, per_batch)


@needs_flex_on_cpu
def test_two_ranks_with_sync_free_multi_rank_never_wait_for_the_gpu_between_batches(tmp_path):
    """sync_free_multi_rank on two ranks (gloo on the CPU, the GPU emulated): between batch ends
    nothing reads a device value back; the counts are reduced as host tensors, the loss on the
    device (train/trainer.py)."""
    for rank, per_batch in _two_rank_syncs(tmp_path, sync_free=True).items():
        assert len(per_batch) == 3, (rank, per_batch)
        for syncs in per_batch:
            assert _without_optimi_cpu_reads(syncs) == [], (rank, syncs)


@needs_flex_on_cpu
def test_sync_free_steps_train_and_log_the_same(tmp_path):
    """Same batches, same weights, and every batch's loss in metrics.jsonl under the same batch
    and position as a stock run (the last batch's too, landed after the loop)."""
    results = {}
    for sync_free in (False, True):
        run = tmp_path / f"sync_free_{sync_free}"
        cfg = _run_config(run, "max_duration=5ba", f"sync_free_steps={str(sync_free).lower()}",
                          "logging.metrics_file=true")
        trainer = build_trainer(cfg)
        fit(trainer, cfg)
        trainer.close()
        rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = sorted((r["batch"], r["tokens"], r["samples"], r["loss/train/total"])
                        for r in rows if "loss/train/total" in r)
        weights = {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}
        results[sync_free] = losses, weights
    (stock_losses, stock_weights), (free_losses, free_weights) = results[False], results[True]
    assert [b for b, *_ in stock_losses] == list(range(5)), stock_losses
    assert free_losses == stock_losses
    assert all(torch.equal(stock_weights[k], free_weights[k]) for k in stock_weights)


@pytest.mark.gpu
def test_sync_free_steps_never_wait_for_a_real_gpu(tmp_path):
    """The emulation's claim on a GPU: from the end of batch 2 to the end of batch 5 (fetching,
    bookkeeping, three whole steps, landing losses, logging) under
    torch.cuda.set_sync_debug_mode("error"), which raises at any wait for the device."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = _run_config(tmp_path, "device=gpu", "model.attention_backend=auto", "max_duration=6ba",
                      "sync_free_steps=true", "logging.metrics_file=true")
    trainer = build_trainer(cfg)
    assert isinstance(trainer.state.device, HostBookkeepingGPU), trainer.state.device

    class ErrorOnWait(Callback):  # appended last: after SpeedMonitor's batch_end
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == 2:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            elif int(state.timestamp.batch) == 5:
                torch.cuda.set_sync_debug_mode("default")

    trainer.state.callbacks.append(ErrorOnWait())
    try:
        fit(trainer, cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["batch"]: r["loss/train/total"] for r in rows if "loss/train/total" in r}
    assert sorted(losses) == list(range(6)) and all(0 < v < 20 for v in losses.values()), losses
