"""The training step never makes the host wait for the device: no value read back, no output shape
that depends on the data (DESIGN.md's chunk layout exists for this). A wait stalls the GPU at
every step while the host catches up, and under torch.compile it is also a graph break.

On the CPU, tests/host_syncs.py records the ops that would wait on CUDA; on a GPU,
torch.cuda.set_sync_debug_mode("error") makes any real wait (device-to-host copies included) an
error, through the whole step: forward, loss, backward, gradient clipping and the optimizer.
"""
from __future__ import annotations

import pytest
import torch

from modernbert_train.data.loader import collate_chunk, split_batch, stack_chunks
from modernbert_train.model.attention import flex_cpu_training_missing, unavailable_reason
from modernbert_train.model.config import preset
from modernbert_train.model.modernbert import ModernBertForMaskedLM
from modernbert_train.train.compile import compile_model
from modernbert_train.train.composer_model import MLMComposerModel
from modernbert_train.train.config import OptimizerConfig
from modernbert_train.train.optim import build_optimizer
from tests.data.test_loader import PAD, make_masker, make_packed_samples
from tests.host_syncs import HostSyncDetector

MAX_SEQ_LEN, MICROBATCH_SEQS = 128, 4


def loader_batch(seed: int, chunks: int = 2) -> dict:
    """A step batch of `chunks` chunks as collate_chunk and StepBatcher build them: sequences shorter
    than max_seq_len (so each chunk ends in a pad-tail document), 30% masking."""
    samples = make_packed_samples(chunks * MICROBATCH_SEQS, max_seq_len=MAX_SEQ_LEN, seed=seed)
    for i, sample in enumerate(samples):
        sample["sample_idx"] = i
    return stack_chunks([collate_chunk(samples[i:i + MICROBATCH_SEQS], max_seq_len=MAX_SEQ_LEN,
                                       microbatch_seqs=MICROBATCH_SEQS, pad_id=PAD, masker=make_masker(seed), epoch=0)
                         for i in range(0, len(samples), MICROBATCH_SEQS)])


def training_step(composer_model: MLMComposerModel, batch: dict, device: str, optimizer=None) -> torch.Tensor:
    """What Composer runs per batch (trainer.py, 0.32.1): each one-chunk microbatch on the device,
    forward + loss + backward, then clipping and the optimizer step. The batch's host-side
    bookkeeping (Composer's token counts) is not part of it."""
    total = torch.zeros((), device=device)
    microbatches = split_batch(batch, MICROBATCH_SEQS)
    for mb in microbatches:
        mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = composer_model.loss(composer_model(mb), mb)
        (loss / len(microbatches)).backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(composer_model.parameters(), max_norm=1.0)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("case", ["item", "int", "bool", "nonzero", "mask_index", "mask_assign",
                                  "masked_select", "unique", "repeat_interleave", "repeat_interleave_by", "equal"])
def test_detector_records_each_kind_of_wait(case):
    """mask_assign assigns a tensor: `x[mask] = 0.0` (a Python scalar) is index_put_ up to torch 2.14 but
    masked_fill_ from 2.15 on (no wait on CUDA either, so nothing to record there)."""
    x = torch.arange(6.0)
    do = {"item": lambda: x.sum().item(), "int": lambda: int(x.max()), "bool": lambda: bool((x > 2).any()),
          "nonzero": lambda: x.nonzero(), "mask_index": lambda: x[x > 2],
          "mask_assign": lambda: x.clone().__setitem__(x > 2, torch.tensor(0.0)), "masked_select": lambda: x.masked_select(x > 2),
          "unique": lambda: x.unique(), "repeat_interleave": lambda: torch.repeat_interleave(torch.tensor([1, 2])),
          "repeat_interleave_by": lambda: x.repeat_interleave(torch.tensor([1, 2, 1, 1, 1, 1])),
          "equal": lambda: torch.equal(x, x)}[case]
    with HostSyncDetector() as detector:
        do()
    assert detector.syncs, f"{case}: not recorded"
    assert all("tests/model/test_host_syncs.py:" in caller for _, caller in detector.syncs), detector.syncs


def test_detector_ignores_ops_that_do_not_wait():
    x = torch.arange(6.0, requires_grad=True)
    with HostSyncDetector() as detector:
        y = x[torch.tensor([0, 2])] * 2  # integer indexing: shape known
        z = torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]), output_size=6)
        z = z + torch.arange(3).repeat_interleave(2)
        w = torch.searchsorted(torch.tensor([0, 2, 5]), torch.arange(6), right=True)
        w = w + torch.arange(6).masked_fill(torch.arange(6) > 2, 0)  # a boolean mask, shape kept
        (y.sum() + z.sum() + w.sum() + torch.argsort(x).sum()).backward()
    assert detector.syncs == []


def _fast_paths_on_cpu() -> list[str]:
    return [b for b in ("flex",) if unavailable_reason(b) is None]


@pytest.mark.parametrize("window_kernel", [False, True], ids=["backend", "window-kernel"])
@pytest.mark.parametrize("backend", _fast_paths_on_cpu())
def test_training_step_reads_nothing_back_from_the_device(backend, window_kernel, monkeypatch):
    """Forward (fused sparse head + loss), backward and clipping on two loader chunks, eager:
    FlexAttention (the fast backend that runs on the CPU; torch_varlen and flash need a GPU) and,
    with the window kernel, the local layers' Triton kernels (in Triton's interpreter)."""
    if flex_cpu_training_missing():
        pytest.skip(flex_cpu_training_missing())
    cfg = preset("tiny")
    cfg.attention_backend = backend
    if window_kernel:
        fused_kernels = pytest.importorskip("modernbert_train.model.fused_kernels", reason="needs triton")
        monkeypatch.setattr(fused_kernels, "interpret_cpu_tensors", True)
        cfg.window_attention_kernel = True
    torch.manual_seed(0)
    model = MLMComposerModel(ModernBertForMaskedLM(cfg).train())
    batch = loader_batch(seed=1)
    assert batch["cu_seqlens"].shape[0] == 2 and (batch["num_tokens"] < MAX_SEQ_LEN * MICROBATCH_SEQS).all(), \
        "two chunks, each with a pad tail (a document of its own)"
    with HostSyncDetector() as detector:
        loss = training_step(model, batch, "cpu")
    assert torch.isfinite(loss)
    assert detector.syncs == [], f"{backend}: the step waits on the device at {sorted(set(detector.syncs))}"


def test_reference_backend_is_the_one_that_waits():
    """sdpa (the reference, and the CPU default) pads documents to a batch whose shape it reads
    back: recorded, so the detector does see the model's own code paths."""
    cfg = preset("tiny")
    cfg.attention_backend = "sdpa"
    torch.manual_seed(0)
    model = MLMComposerModel(ModernBertForMaskedLM(cfg).train())
    with HostSyncDetector() as detector:
        training_step(model, loader_batch(seed=1), "cpu")
    callers = {caller for _, caller in detector.syncs}
    assert any("modernbert_train/model/attention.py" in c for c in callers), callers


@pytest.mark.gpu
@pytest.mark.parametrize("backend, window_kernel, compile_mode", [
    ("torch_varlen", False, "none"), ("torch_varlen", True, "none"), ("torch_varlen", False, "full"),
    ("torch_varlen", True, "full"), ("flex", False, "full"), ("flash", False, "none")])
def test_cuda_training_step_never_synchronizes(backend, window_kernel, compile_mode):
    """The whole step on the GPU under torch.cuda.set_sync_debug_mode("error"), including
    clipping and StableAdamW (its Triton path, as build_optimizer picks on CUDA), after one untimed
    step (Triton autotuning and compilation synchronize, once)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if unavailable_reason(backend):
        pytest.skip(f"{backend} not available here: {unavailable_reason(backend)}")
    torch._dynamo.reset()
    cfg = preset("tiny")
    cfg.attention_backend, cfg.window_attention_kernel = backend, window_kernel
    torch.manual_seed(0)
    net = ModernBertForMaskedLM(cfg).cuda().train()
    optimizer = build_optimizer(OptimizerConfig(), net, device_type="cuda")
    compile_model(net, compile_mode)
    model = MLMComposerModel(net)
    training_step(model, loader_batch(seed=1), "cuda", optimizer)
    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in loader_batch(seed=2).items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = training_step(model, batch, "cuda", optimizer)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
