"""Benchmark one full training step (forward, backward, StableAdamW step) of our packed ModernBERT
against transformers' ModernBertForMaskedLM on the same tokens, in one process; prints a table and
writes JSON. Usage: python benchmarks/bench_step.py --preset base --seq-len 1024 --sweep
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch._inductor.config

from modernbert_train.data.chunk_layout import doc_slots, pad_tail_lengths, prediction_slots
from modernbert_train.data.masking import IGNORE_INDEX, MaskingConfig, MLMMasker
from modernbert_train.data import synthetic
from modernbert_train.data.packing import PackedSequence
from modernbert_train.model.attention import fastest_available, unavailable_reason
from modernbert_train.model.config import ModernBertConfig, preset
from modernbert_train.model.flops import FLOP_FORMULA, training_flops
from modernbert_train.model.modernbert import ModernBertForMaskedLM
from modernbert_train.train.compile import COMPILE_MODES, compile_model, mark_varlen_dims

log = logging.getLogger(__name__)

MASK_RATE = 0.3

PRINTED_KERNELS = 30  # --profile: kernels per run in the printed table (the JSON keeps profile_kernels' top)

# Peak dense bf16 tensor FLOP/s (no sparsity), matched by substring of the device name, first hit.
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12)]

HF_LAYOUT_NOTE = ("transformers gets each packed sequence as one row of a padded (sequences, seq_len) "
                  "batch with an attention_mask over its padding: documents inside a row attend to "
                  "each other and positions run 0..n-1 per row (how HF users train on packed data); "
                  "same tokens, same labels, same matmul FLOPs; attention FLOPs counted per row")


TIMING_NOTE = ("tok/s and ms/step: the timed steps run back to back as in training (the host queues "
               "each step while the device runs the one before; one synchronization at each end of "
               "the window), tok/s = real tokens / window time, ms/step from CUDA events at each "
               "step's start; synced: the same number of steps again, each between two device "
               "synchronizations (this script's only timing until 2026-12-03), which adds the device's "
               "idle time while the host starts each step")

# --- data: packed documents, masked, in both layouts ----------------------------------------------

def max_docs_per_chunk(seq_len: int, seqs_per_chunk: int) -> int:
    """Worst-case document count of a chunk (the pad tail included): a document is >= 2 tokens.
    The `capacity` layout (RunSpec) sizes `cu_seqlens` for it, as the loader did before."""
    return seqs_per_chunk * (seq_len // 2) + 1


def packed_sequences(cfg: ModernBertConfig, seq_len: int, count: int,
                     rng: np.random.Generator) -> list[PackedSequence]:
    """`count` packed sequences of random documents through the shard-time packer (data/synthetic.py)."""
    return synthetic.packed_sequences(rng, count, max_seq_len=seq_len, vocab_size=cfg.vocab_size,
                                      cls_id=cfg.cls_token_id, sep_id=cfg.sep_token_id,
                                      special_ids=(cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id,
                                                   cfg.pad_token_id))


@dataclass
class StepBatch:
    """One step's tokens in our varlen chunk layout (DESIGN.md) and as transformers' padded batch."""

    packed: dict[str, Any]
    padded: dict[str, torch.Tensor]
    doc_lens: list[np.ndarray]  # per packed sequence, the document lengths inside it
    # Real (non-pad) and masked tokens per layout, counted on the host when the batch is built, so
    # the timed steps never read a count back from the device.
    counts: dict[str, tuple[int, int]]

    def to(self, device: torch.device) -> StepBatch:
        def move(tensors: dict[str, Any]) -> dict[str, Any]:
            return {k: v.to(device) if torch.is_tensor(v) else v for k, v in tensors.items()}
        return StepBatch(move(self.packed), move(self.padded), self.doc_lens, self.counts)


def build_step_batch(cfg: ModernBertConfig, seqs: list[PackedSequence], seq_len: int,
                     masker: MLMMasker, key: int) -> StepBatch:
    """Mask each sequence once, then lay the same masked tokens out both ways."""
    n_seqs = len(seqs)
    chunk_tokens = n_seqs * seq_len
    ids_packed = np.full(chunk_tokens, cfg.pad_token_id, dtype=np.int64)
    labels_packed = np.full(chunk_tokens, IGNORE_INDEX, dtype=np.int64)
    ids_padded = np.full((n_seqs, seq_len), cfg.pad_token_id, dtype=np.int64)
    labels_padded = np.full((n_seqs, seq_len), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((n_seqs, seq_len), dtype=np.int64)
    offset = 0
    for row, seq in enumerate(seqs):
        ids, labels = masker(seq.input_ids, (key, row))
        n = ids.size
        ids_packed[offset:offset + n], labels_packed[offset:offset + n] = ids, labels
        ids_padded[row, :n], labels_padded[row, :n], attention_mask[row, :n] = ids, labels, 1
        offset += n
    doc_lens = np.concatenate([s.doc_lens for s in seqs]).astype(np.int64)
    # The pad tail: documents of at most seq_len tokens, as the loader makes it.
    doc_lens = np.append(doc_lens, pad_tail_lengths(chunk_tokens - offset, seq_len))
    starts = np.concatenate([[0], np.cumsum(doc_lens)])

    def cu_seqlens(layout: str) -> torch.Tensor:  # unused slots repeat the end: empty documents
        slots = max_docs_per_chunk(seq_len, n_seqs) if layout == "capacity" else doc_slots(doc_lens.size)
        cu = np.full(slots + 1, chunk_tokens, dtype=np.int32)
        cu[:starts.size] = starts
        return torch.from_numpy(cu)

    position_ids = np.arange(chunk_tokens) - np.repeat(starts[:-1], doc_lens)
    packed = {
        "input_ids": torch.from_numpy(ids_packed),
        "labels": torch.from_numpy(labels_packed),
        "cu_seqlens": cu_seqlens("bucket"),
        "cu_seqlens_capacity": cu_seqlens("capacity"),
        "prediction_slots": prediction_slots(chunk_tokens=chunk_tokens, num_sequences=n_seqs,
                                             mask_rate=masker.cfg.mask_rate),
        "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
        "max_seqlen": seq_len,
        "num_tokens": torch.tensor(offset, dtype=torch.int64),
    }
    padded = {"input_ids": torch.from_numpy(ids_padded), "attention_mask": torch.from_numpy(attention_mask),
              "labels": torch.from_numpy(labels_padded)}
    # Counted independently from each layout (num_tokens vs attention_mask, labels vs labels).
    counts = {"ours": (offset, int((labels_packed != IGNORE_INDEX).sum())),
              "hf": (int(attention_mask.sum()), int((labels_padded != IGNORE_INDEX).sum()))}
    return StepBatch(packed, padded, [s.doc_lens.astype(np.int64) for s in seqs], counts)


def build_step_batches(cfg: ModernBertConfig, seq_len: int, seqs_per_chunk: int, num_chunks: int,
                       seed: int) -> list[StepBatch]:
    rng = np.random.default_rng(seed)
    seqs = packed_sequences(cfg, seq_len, seqs_per_chunk * num_chunks, rng)
    masker = MLMMasker(MaskingConfig(mask_rate=MASK_RATE), mask_id=cfg.mask_token_id,
                       special_ids=[cfg.cls_token_id, cfg.sep_token_id], vocab_size=cfg.vocab_size,
                       pad_id=cfg.pad_token_id, seed=seed)
    return [build_step_batch(cfg, seqs[i * seqs_per_chunk:(i + 1) * seqs_per_chunk], seq_len, masker, i)
            for i in range(num_chunks)]


def attention_spans(batch: StepBatch, system: str) -> np.ndarray:
    """Lengths of the token runs that attend among themselves: documents for ours, rows for HF."""
    if system == "ours":
        return np.concatenate(batch.doc_lens)
    return np.array([lens.sum() for lens in batch.doc_lens])


# --- one system, one configuration ------------------------------------------------------------------

@dataclass(frozen=True)
class RunSpec:
    """One configuration. Written on the command line as system:attention:compile[:option...],
    e.g. `ours:torch_varlen:regional`, `hf:sdpa:none`, `ours:torch_varlen:full:-fused:capacity`.
    Options (ours only) turn off one optimisation each, to measure what it buys: `-fused` (plain
    decoder + cross-entropy over materialised logits), `-slots` (sparse head over exactly the masked
    positions: a host sync and a data-dependent shape per step), `-triton` (GeGLU and RoPE as
    torch.compile generates them instead of the Triton kernels of model/fused_kernels.py, config
    fused_kernels), `mem=0.7` (an activation memory budget for the compiler's partitioner: recompute
    more, save memory), `-win` (the local layers' attention through the attention backend with a
    window instead of the Triton kernels of model/window_attention.py, config
    window_attention_kernel). Options that turn on what is off by default: `winrope` (the window
    kernels rotating q and k themselves, config window_attention_rope), `gwin` (the global layers'
    attention through the same kernels with no window, config global_attention_kernel), `lnk` (every LayerNorm as
    the Triton kernels of model/fused_kernels.py, the residual add inside, config fused_layer_norm), `bf16res` (the
    residual stream in bf16 under autocast, config autocast_residual), `cdt` (inductor's
    coordinate-descent tuning of kernel block sizes: a longer compile), `capacity` (worst-case
    `cu_seqlens` length instead of the document count rounded up to 64)."""

    system: str  # "ours" | "hf"
    attention: str  # our backend name, or transformers' attn_implementation
    compile: str  # none | regional | full (transformers: none | full)
    fused_loss: bool = True
    prediction_slots: bool = True
    fused_kernels: bool = True
    doc_slots: str = "bucket"
    # The compiler's activation memory budget for this run (train/compile.py; 1.0: save what the
    # partitioner picks for speed; lower: recompute more to save activation memory).
    memory_budget: float = 1.0
    coordinate_descent_tuning: bool = False
    window_attention_kernel: bool = True
    window_attention_rope: bool = False
    global_attention_kernel: bool = False
    fused_layer_norm: bool = False
    autocast_residual: bool = False

    @property
    def label(self) -> str:
        off = [name for name, on in (("-fused", self.fused_loss), ("-slots", self.prediction_slots),
                                     ("-triton", self.fused_kernels)) if not on]
        off += [self.doc_slots] if self.doc_slots != "bucket" else []
        off += [f"mem={self.memory_budget:g}"] if self.memory_budget != 1.0 else []
        off += ["cdt"] if self.coordinate_descent_tuning else []
        off += ["-win"] if not self.window_attention_kernel else []
        off += ["winrope"] if self.window_attention_rope else []
        off += ["gwin"] if self.global_attention_kernel else []
        off += ["lnk"] if self.fused_layer_norm else []
        off += ["bf16res"] if self.autocast_residual else []
        return ",".join(off) or "-"

    @staticmethod
    def parse(text: str) -> RunSpec:
        parts = text.split(":")
        if len(parts) < 3 or parts[0] not in ("ours", "hf") or parts[2] not in COMPILE_MODES:
            raise ValueError(f"run spec {text!r}: expected system:attention:compile[:option...] with "
                             f"system ours|hf and compile one of {COMPILE_MODES}")
        options = set(parts[3:])
        budgets = {o for o in options if o.startswith("mem=")}
        options -= budgets
        unknown = options - {"-fused", "-slots", "-triton", "capacity", "cdt", "-win", "winrope", "gwin", "lnk",
                             "bf16res"}
        if {"-win", "winrope"} <= options:
            unknown.add("-win with winrope (winrope needs the window kernels)")
        budget = 1.0
        if budgets:
            try:
                budget = float(next(iter(budgets))[4:])
            except ValueError:
                budget = -1.0
            if len(budgets) > 1 or not 0 < budget <= 1:
                unknown.add("mem= (one budget in (0, 1])")
        if unknown or ((options or budgets) and parts[0] == "hf") or (parts[0] == "hf" and parts[2] == "regional"):
            raise ValueError(f"run spec {text!r}: options {sorted(unknown) or sorted(options)} / compile "
                             "mode not valid here (options -fused -slots -triton capacity cdt -win winrope gwin lnk bf16res "
                             "mem= are for ours; "
                             "transformers compiles none or full)")
        return RunSpec(parts[0], parts[1], parts[2], fused_loss="-fused" not in options,
                       prediction_slots="-slots" not in options, fused_kernels="-triton" not in options,
                       doc_slots="capacity" if "capacity" in options else "bucket", memory_budget=budget,
                       coordinate_descent_tuning="cdt" in options, window_attention_kernel="-win" not in options,
                       window_attention_rope="winrope" in options, global_attention_kernel="gwin" in options,
                       fused_layer_norm="lnk" in options,
                       autocast_residual="bf16res" in options)


@dataclass
class RunResult:
    system: str
    attention: str
    compile: str
    options: str  # RunSpec.label: the optimisations turned off ("-" = none)
    dtype: str
    chunk_tokens: int  # tokens the step computes on, padding included
    real_tokens_per_step: Optional[float] = None
    masked_tokens_per_step: Optional[float] = None
    steps: int = 0
    # The timed steps run back to back, as in training: nothing waits for the device between them
    # (see timed_window); per-step times are the intervals between events at each step's start.
    step_ms_mean: Optional[float] = None
    step_ms_median: Optional[float] = None
    step_ms_min: Optional[float] = None
    tokens_per_s: Optional[float] = None
    # The same number of steps again, each bracketed by a device synchronize (how this script timed
    # until 2026-12-03): each step then also pays for the device idling while the host starts it.
    synced_steps: int = 0
    step_ms_synced_median: Optional[float] = None
    tokens_per_s_synced: Optional[float] = None
    model_tflop_per_step: Optional[float] = None
    mfu: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    warmup_s: Optional[float] = None  # includes compilation
    graphs_compiled: Optional[int] = None  # torch.compile graphs built during warm-up
    graphs_compiled_timed: Optional[int] = None  # ... and during the timed steps (should be 0)
    loss_first: Optional[float] = None
    loss_last: Optional[float] = None
    top_kernels: Optional[list[dict[str, Any]]] = None  # --profile: where the step's device time goes
    ratio_vs_hf: Optional[float] = None  # tokens/s over the fastest transformers run of the process
    ratio_vs_hf_synced: Optional[float] = None  # the same from the synchronized steps
    error: Optional[str] = None


def build_ours(cfg: ModernBertConfig, spec: RunSpec) -> torch.nn.Module:
    return ModernBertForMaskedLM(replace(cfg, attention_backend=spec.attention, fused_head_loss=spec.fused_loss,
                                         fused_kernels=spec.fused_kernels, window_attention_kernel=spec.window_attention_kernel,
                                         window_attention_rope=spec.window_attention_rope,
                                         global_attention_kernel=spec.global_attention_kernel,
                                         fused_layer_norm=spec.fused_layer_norm,
                                         autocast_residual=spec.autocast_residual))


def build_hf(cfg: ModernBertConfig, attn_implementation: str) -> torch.nn.Module:
    import transformers

    hf_cfg = transformers.ModernBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, norm_eps=cfg.norm_eps,
        global_attn_every_n_layers=cfg.global_attn_every_n_layers, local_attention=cfg.local_attention,
        global_rope_theta=cfg.global_rope_theta, local_rope_theta=cfg.local_rope_theta,
        pad_token_id=cfg.pad_token_id, cls_token_id=cfg.cls_token_id, sep_token_id=cfg.sep_token_id,
        bos_token_id=cfg.cls_token_id, eos_token_id=cfg.sep_token_id, hidden_activation="gelu",
        sparse_prediction=True,
        # transformers 4.x compiles parts of the model itself when this is None; we compile (or
        # not) the whole model from outside, the same way for both systems.
        reference_compile=False,
    )
    return transformers.ModernBertForMaskedLM._from_config(hf_cfg, attn_implementation=attn_implementation)


def build_optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """StableAdamW as the training recipe uses it (decoupled decay; Triton kernel on CUDA)."""
    from optimi import StableAdamW
    from optimi.utils import HAS_TRITON

    on_cuda = device.type == "cuda"
    return StableAdamW(model.parameters(), lr=8e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5,
                       decouple_lr=True, max_lr=8e-4, triton=on_cuda and HAS_TRITON,
                       foreach=on_cuda and not HAS_TRITON)


def ours_inputs(batch: StepBatch, spec: RunSpec) -> dict[str, Any]:
    p = batch.packed
    cu_seqlens = p["cu_seqlens_capacity" if spec.doc_slots == "capacity" else "cu_seqlens"]
    mark_varlen_dims(cu_seqlens)
    kwargs = {"input_ids": p["input_ids"], "cu_seqlens": cu_seqlens, "max_seqlen": p["max_seqlen"],
              "position_ids": p["position_ids"], "labels": p["labels"],
              "prediction_slots": p["prediction_slots"] if spec.prediction_slots else None}
    return kwargs


def hf_inputs(batch: StepBatch, spec: RunSpec) -> dict[str, Any]:
    return dict(batch.padded)


def profile_kernels(step_fn, num_steps: int, device: torch.device, top: int = 80) -> list[dict[str, Any]]:
    """Device time per kernel (or CPU op on the CPU) over `num_steps` more steps, most first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for i in range(num_steps):
            step_fn(i)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if device.type == "cuda"
                                                 else e.self_cpu_time_total) > 0]
    key = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    rows = sorted(events, key=key, reverse=True)[:top]
    return [{"name": e.key[:120], "calls_per_step": e.count / num_steps, "ms_per_step": key(e) / 1e3 / num_steps,
             "share": key(e) / total} for e in rows]


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_window(step: Callable[[int], torch.Tensor], indices: Sequence[int],
                 device: torch.device) -> tuple[list[torch.Tensor], list[float], float]:
    """Runs step(i) for each index back to back, as a training loop does: the host queues the next
    step while the device still runs this one, and only the window's two ends wait for the device.
    Returns the steps' losses (still on the device), the seconds of each step (between CUDA events
    recorded as each step is queued, so a step's time includes any idling of the device while the
    host caught up; on the CPU, where ops run as they are called, the host clock) and the window's
    seconds (the host clock between the two synchronizations)."""
    def mark() -> Any:
        if device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(start: Any, end: Any) -> float:
        return end - start if device.type != "cuda" else start.elapsed_time(end) / 1e3

    synchronize(device)
    started = time.perf_counter()
    marks, losses = [], []
    for i in indices:
        marks.append(mark())
        losses.append(step(i))
    marks.append(mark())
    synchronize(device)
    window_s = time.perf_counter() - started
    return losses, [seconds(a, b) for a, b in zip(marks, marks[1:])], window_s


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Linux reports KiB; this is the process high-water mark, so it never goes down between runs.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_config(spec: RunSpec, cfg: ModernBertConfig, batches: list[StepBatch], *, device: torch.device,
               dtype: str, warmup: int, steps: int, peak_flops: Optional[float], seed: int,
               synced_steps: int = 0, profile_steps: int = 0) -> RunResult:
    """Build, (compile,) warm up and time one system; any failure is recorded, not raised."""
    chunk_tokens = int(batches[0].packed["input_ids"].numel())
    result = RunResult(spec.system, spec.attention, spec.compile, spec.label, dtype, chunk_tokens)
    model = compiled = optimizer = None
    try:
        torch.manual_seed(seed)
        torch._dynamo.reset()  # one model's guards must not eat the next one's recompile budget
        model = (build_ours(cfg, spec) if spec.system == "ours"
                 else build_hf(cfg, spec.attention)).to(device).train()
        optimizer = build_optimizer(model, device)
        torch._functorch.config.activation_memory_budget = 1.0  # transformers' compile: the default
        torch._inductor.config.coordinate_descent_tuning = spec.coordinate_descent_tuning
        compiled = compile_model(model, spec.compile, spec.memory_budget) if spec.system == "ours" else \
            (torch.compile(model) if spec.compile == "full" else model)
        make_inputs = ours_inputs if spec.system == "ours" else hf_inputs
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16" \
            else contextlib.nullcontext
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step(i: int) -> torch.Tensor:  # queues one training step; reads nothing back
            kwargs = make_inputs(batches[i % len(batches)], spec)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = compiled(**kwargs).loss
            loss.backward()
            optimizer.step()
            return loss.detach()

        graphs_before = graphs_compiled()
        warm_start = time.perf_counter()
        timed_window(step, range(warmup), device)
        result.warmup_s = time.perf_counter() - warm_start
        result.graphs_compiled = graphs_compiled() - graphs_before

        timed = range(warmup, warmup + steps)
        losses, times_s, total_s = timed_window(step, timed, device)
        flops, real_total, masked_total = 0.0, 0, 0
        for i in timed:
            batch = batches[i % len(batches)]
            real, masked = batch.counts[spec.system]
            flops += training_flops(cfg, real_tokens=real, masked_tokens=masked,
                                    span_lengths=attention_spans(batch, spec.system))
            real_total += real
            masked_total += masked
        result.steps = steps
        result.real_tokens_per_step = real_total / steps
        result.masked_tokens_per_step = masked_total / steps
        result.step_ms_mean = 1e3 * total_s / steps
        result.step_ms_median = 1e3 * statistics.median(times_s)
        result.step_ms_min = 1e3 * min(times_s)
        result.tokens_per_s = real_total / total_s
        result.model_tflop_per_step = flops / steps / 1e12
        result.mfu = flops / total_s / peak_flops if peak_flops else None
        result.peak_mem_bytes = peak_memory_bytes(device)
        result.loss_first, result.loss_last = float(losses[0]), float(losses[-1])
        result.graphs_compiled_timed = graphs_compiled() - graphs_before - result.graphs_compiled
        if not all(math.isfinite(float(x)) for x in losses):
            # A step that computes NaN can run faster than a correct one (2026-11-27 H200: 528k tok/s):
            # its timing is kept in the JSON but the run counts as failed.
            raise FloatingPointError(f"non-finite training loss (first {result.loss_first}, "
                                     f"last {result.loss_last}): timing not comparable")
        if synced_steps:
            after = warmup + steps
            synced = [timed_window(step, [i], device)[2] for i in range(after, after + synced_steps)]
            result.synced_steps = synced_steps
            result.step_ms_synced_median = 1e3 * statistics.median(synced)
            result.tokens_per_s_synced = sum(batches[i % len(batches)].counts[spec.system][0]
                                             for i in range(after, after + synced_steps)) / sum(synced)
            result.graphs_compiled_timed = graphs_compiled() - graphs_before - result.graphs_compiled
        if profile_steps:
            first = warmup + steps + synced_steps
            result.top_kernels = profile_kernels(lambda i: timed_window(step, [first + i], device),
                                                 profile_steps, device)
    except Exception as err:  # noqa: BLE001 - the benchmark records any failure and moves on
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:500]
        log.warning("%s/%s compile=%s failed: %s", spec.system, spec.attention, spec.compile, result.error)
    finally:
        del model, compiled, optimizer
        torch._dynamo.reset()  # drop the compiled graphs that still reference the model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# --- planning, machine description, output ----------------------------------------------------------

def saved_activations(spec: RunSpec, cfg: ModernBertConfig, batch: StepBatch, *, device: torch.device,
                      dtype: str, seed: int) -> dict[str, Any]:
    """What one forward keeps for its backward pass: the autograd saved tensors, each storage once,
    parameters left out, grouped by (shape, dtype). No timing. On CPU a compiled run uses the
    compiler's partitioner without Inductor's code generation (backend aot_eager_decomp_partition):
    the same choice of what to save, and it works under bf16 autocast, where Inductor's CPU code
    does not (torch 2.7)."""
    if spec.system != "ours":
        raise ValueError(f"{spec}: --saved-activations measures our model only")
    torch.manual_seed(seed)
    torch._dynamo.reset()
    model = build_ours(cfg, spec).to(device).train()
    if device.type == "cpu" and spec.compile != "none":
        if spec.compile != "full":
            raise ValueError(f"{spec}: on CPU --saved-activations compiles full or none")
        torch._functorch.config.activation_memory_budget = spec.memory_budget
        model.compile(backend="aot_eager_decomp_partition")
    else:
        compile_model(model, spec.compile, spec.memory_budget)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}
    groups: dict[str, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in storages:
            storages[key] = storage.nbytes()
            group = f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
            groups[group] = groups.get(group, 0) + storage.nbytes()
        return t

    kwargs = ours_inputs(batch, spec)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
        loss = model(**kwargs).loss
    loss.backward()
    total = sum(storages.values())
    chunk_tokens = int(batch.packed["input_ids"].numel())
    return {"run": f"{spec.system}:{spec.attention}:{spec.compile}", "options": spec.label, "dtype": dtype,
            "chunk_tokens": chunk_tokens, "saved_bytes": total, "saved_bytes_per_token": total / chunk_tokens,
            "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}


def format_saved_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | off | saved MiB | KB/token | largest groups (MiB) |", "|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{name}: {b / 2**20:.1f}" for name, b in list(r["groups"].items())[:3])
        lines.append(f"| {r['run']} | {r['options']} | {r['saved_bytes'] / 2**20:,.1f} | "
                     f"{r['saved_bytes_per_token'] / 1024:.1f} | {top} |")
    return "\n".join(lines)


def default_backend(device: torch.device) -> str:
    return fastest_available(device.type)


def plan_runs(args: argparse.Namespace, device: torch.device) -> list[RunSpec]:
    if args.runs:
        return [RunSpec.parse(text) for text in args.runs]
    hf_compile = "none" if args.compile == "none" else "full"
    baseline = [RunSpec("hf", args.hf_attn, hf_compile)] if args.baseline == "hf" else []
    if not args.sweep:
        return [RunSpec("ours", args.backend, args.compile)] + baseline
    candidates = ("torch_varlen", "cudnn", "flash", "flex") if device.type == "cuda" else ("sdpa", "flex")
    backends = [b for b in candidates if unavailable_reason(b) is None]
    # Most informative first (a time limit may cut the sweep short): the fastest backend and the
    # baseline, then the other backends, then everything uncompiled.
    runs = [RunSpec("ours", backends[0], args.compile)] + baseline
    runs += [RunSpec("ours", b, args.compile) for b in backends[1:]]
    if args.compile != "none":
        runs += [RunSpec("ours", b, "none") for b in backends]
        runs += [RunSpec("hf", args.hf_attn, "none")] if args.baseline == "hf" else []
    return runs


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu": cpu_model(), "cpu_threads": torch.get_num_threads()}
    for name in ("transformers", "optimi", "triton"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: the version is simply unknown
            info[name] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops_for(device: torch.device, override_tflops: Optional[float]) -> Optional[float]:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def fill_ratios(results: list[RunResult]) -> None:
    """Each of our runs against the fastest transformers run of the same process, from the
    back-to-back steps and (where measured) from the synchronized ones."""
    for field, ratio in (("tokens_per_s", "ratio_vs_hf"), ("tokens_per_s_synced", "ratio_vs_hf_synced")):
        best_hf = max((getattr(r, field) for r in results
                       if r.system == "hf" and getattr(r, field) and r.error is None), default=None)
        for r in results:
            mine = getattr(r, field)
            setattr(r, ratio, mine / best_hf if r.system == "ours" and mine and best_hf and r.error is None
                    else None)


def check_losses(results: list[RunResult], rel_tol: float = 0.02) -> None:
    """Our runs share seed, initial weights and data, so their first-step losses agree up to bf16 /
    kernel rounding; a run that disagrees with the first of ours computes something else and fails."""
    ours = [r for r in results if r.system == "ours" and r.error is None and r.loss_first is not None]
    for r in ours[1:]:
        if abs(r.loss_first - ours[0].loss_first) > rel_tol * abs(ours[0].loss_first):
            r.error = (f"first-step loss {r.loss_first:.4f} differs from {ours[0].loss_first:.4f} of "
                       f"ours/{ours[0].attention}/{ours[0].compile}/{ours[0].options} by more than {rel_tol:.0%}")


def data_summary(batches: list[StepBatch], seq_len: int, seqs_per_chunk: int) -> dict[str, Any]:
    docs = np.concatenate([np.concatenate(b.doc_lens) for b in batches])
    real = [int(b.packed["num_tokens"]) for b in batches]
    return {"seq_len": seq_len, "seqs_per_chunk": seqs_per_chunk, "chunk_tokens": seqs_per_chunk * seq_len,
            "num_chunks": len(batches), "documents_per_chunk": docs.size / len(batches),
            "doc_len_median": float(np.median(docs)), "doc_len_mean": float(docs.mean()),
            "doc_len_max": int(docs.max()), "fill": sum(real) / (len(batches) * seqs_per_chunk * seq_len),
            "mask_rate": MASK_RATE, "hf_layout": HF_LAYOUT_NOTE}


def format_table(results: list[RunResult], device: torch.device) -> str:
    mem_label = "peak mem GiB" if device.type == "cuda" else "RSS hw GiB"
    header = ["system", "attention", "compile", "off", "tok/step", "tok/s", "ms/step med", "ms/step mean",
              "synced ms med", mem_label, "MFU", "vs best HF", "synced vs HF", "loss 1st", "warmup s", "graphs"]
    rows, errors = [header], {}
    for r in results:
        if r.error:
            errors[len(rows)] = r.error
            rows.append([r.system, r.attention, r.compile, r.options])
            continue
        rows.append([r.system, r.attention, r.compile, r.options, f"{r.real_tokens_per_step:.0f}",
                     f"{r.tokens_per_s:,.0f}", f"{r.step_ms_median:.1f}", f"{r.step_ms_mean:.1f}",
                     "-" if r.step_ms_synced_median is None else f"{r.step_ms_synced_median:.1f}",
                     f"{r.peak_mem_bytes / 2**30:.2f}", "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
                     "-" if r.ratio_vs_hf is None else f"{r.ratio_vs_hf:.2f}x",
                     "-" if r.ratio_vs_hf_synced is None else f"{r.ratio_vs_hf_synced:.2f}x", f"{r.loss_first:.4f}",
                     f"{r.warmup_s:.0f}",
                     f"{r.graphs_compiled}+{r.graphs_compiled_timed}"])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             + (f"  ERROR {errors[n]}" if n in errors else "") for n, row in enumerate(rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)  # a run killed mid-write still leaves the previous complete file


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--seq-len", type=int, default=1024, help="max_seq_len of the packed sequences")
    p.add_argument("--seqs-per-chunk", type=int, default=32,
                   help="packed sequences per microbatch chunk (tokens per step = this x seq-len)")
    p.add_argument("--backend", default=None, choices=["sdpa", "flex", "flash", "torch_varlen", "cudnn"],
                   help="our attention backend (default: fastest available here)")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="how to compile ours (transformers: whole model unless none); "
                        "default full on cuda, none on cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="bf16 autocast or plain fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed steps, run back to back (one device synchronization at each end)")
    p.add_argument("--synced-steps", type=int, default=None,
                   help="then this many more, each bracketed by a device synchronization, timed apart "
                        "(default: --steps; 0: none)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--num-chunks", type=int, default=4, help="distinct chunks cycled through the steps")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--baseline", default="hf", choices=["hf", "none"])
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "flex_attention", "eager"],
                   help="transformers' attn_implementation")
    p.add_argument("--sweep", action="store_true",
                   help="every available backend, compiled and not, plus the baseline, in one process")
    p.add_argument("--runs", nargs="+", default=None, metavar="SPEC",
                   help="explicit configurations in this order, system:attention:compile[:option...] "
                        "(see RunSpec), e.g. ours:torch_varlen:regional hf:sdpa:none ours:flex:full:-fused")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s for MFU (default: table by GPU name; none on cpu)")
    p.add_argument("--out-json", type=Path, default=Path("bench_results/step.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--saved-activations", action="store_true",
                   help="instead of timing, count what one forward keeps for backward (ours only)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps and print the top kernels by device time")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    args.backend = args.backend or default_backend(device)
    args.compile = args.compile or ("full" if on_cuda else "none")
    args.dtype = args.dtype or ("bf16" if on_cuda else "fp32")
    args.synced_steps = args.steps if args.synced_steps is None else args.synced_steps
    if args.steps < 1 or args.warmup < 0 or args.num_chunks < 1 or args.synced_steps < 0:
        raise SystemExit("--steps must be >= 1, --warmup >= 0, --num-chunks >= 1, --synced-steps >= 0")

    cfg = preset(args.preset)
    cfg.num_hidden_layers = args.layers or cfg.num_hidden_layers
    if args.seq_len > cfg.max_position_embeddings:
        log.warning("seq_len %d > preset %s max_position_embeddings %d: raised for this benchmark",
                    args.seq_len, args.preset, cfg.max_position_embeddings)
        cfg.max_position_embeddings = args.seq_len
    batches = [b.to(device) for b in
               build_step_batches(cfg, args.seq_len, args.seqs_per_chunk, args.num_chunks, args.seed)]
    peak_flops = peak_flops_for(device, args.peak_tflops)
    payload: dict[str, Any] = {
        "machine": machine_info(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": cfg.to_dict(),
        "data": data_summary(batches, args.seq_len, args.seqs_per_chunk),
        "timing": TIMING_NOTE,
        "flop_formula": FLOP_FORMULA,
        "peak_flops": peak_flops,
        "peak_flops_basis": "dense bf16 tensor-core peak" if peak_flops else None,
        "peak_mem_kind": "torch.cuda.max_memory_allocated per run" if on_cuda
        else "process RSS high-water (getrusage ru_maxrss), cumulative over runs",
        "results": [],
    }
    if args.saved_activations:
        rows = []
        for spec in plan_runs(args, device):
            rows.append(saved_activations(spec, cfg, batches[0], device=device, dtype=args.dtype, seed=args.seed))
            payload["results"] = rows
            write_json(args.out_json, payload)
        print(f"\nsaved for backward, {args.preset} ({cfg.num_hidden_layers} layers), one {args.seqs_per_chunk} x "
              f"{args.seq_len} chunk, {args.dtype}, torch {torch.__version__}:")
        print(format_saved_table(rows))
        print(f"JSON: {args.out_json}")
        return 0
    results: list[RunResult] = []
    for spec in plan_runs(args, device):
        log.info("running %s", spec)
        results.append(run_config(spec, cfg, batches, device=device, dtype=args.dtype, warmup=args.warmup,
                                  profile_steps=args.profile, synced_steps=args.synced_steps,
                                  steps=args.steps, peak_flops=peak_flops, seed=args.seed))
        check_losses(results)
        fill_ratios(results)
        payload["results"] = [asdict(r) for r in results]
        write_json(args.out_json, payload)  # after every run, so a killed sweep keeps what it measured

    summary = payload["data"]
    print(f"\n{args.preset} on {payload['machine'].get('gpu') or payload['machine']['cpu']} "
          f"(torch {torch.__version__}, {args.dtype}): {args.seqs_per_chunk} x {args.seq_len} = "
          f"{summary['chunk_tokens']} tokens/chunk, fill {100 * summary['fill']:.1f}%, "
          f"{summary['documents_per_chunk']:.0f} docs/chunk (median {summary['doc_len_median']:.0f} tokens)")
    print(format_table(results, device))
    for r in results:
        if r.top_kernels:
            print(f"\ntop kernels, {r.system}/{r.attention}/{r.compile}/{r.options}: ms/step  share  calls/step  name")
            for k in r.top_kernels[:PRINTED_KERNELS]:  # the JSON keeps more
                print(f"  {k['ms_per_step']:8.2f}  {100 * k['share']:5.1f}%  {k['calls_per_step']:6.0f}  {k['name']}")
    print(f"HF layout: {HF_LAYOUT_NOTE}.")
    print(f"JSON: {args.out_json}")
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
