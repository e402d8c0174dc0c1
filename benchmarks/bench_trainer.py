"""Trainer-level throughput: the Composer trainer that `train.py RECIPE` builds, timed on synthetic
shards, against a raw forward/backward/StableAdamW loop on the same chunks in the same process.
Prints a table and writes JSON. Usage (extra key=value overrides go to the run config last):
    python benchmarks/bench_trainer.py [--device cpu] [--recipe yamls/base.yaml] [key=value ...]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import gc
import json
import logging
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters as dynamo_counters
from composer import Trainer
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import reproducibility

from modernbert_train.data.loader import split_batch
from modernbert_train.data.schema import read_meta
from modernbert_train.data.synthetic import TOKENIZER_FILENAME, write_dataset
from modernbert_train.data.tokenizer import TextTokenizer
from modernbert_train.model.modernbert import ModernBertForMaskedLM
from modernbert_train.train.builder import build_trainer, fit, model_config_for
from modernbert_train.train.compile import COMPILE_MODES, compile_model
from modernbert_train.train.composer_model import chunk_inputs
from modernbert_train.train.config import RunConfig, load_run_config
from modernbert_train.train.optim import build_optimizer

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]

# Small enough for the lent GPU's ~90 s (compilation included) and for a CPU smoke run.
DEVICE_DEFAULTS = {
    "cuda": {"recipe": "yamls/base.yaml", "max_seq_len": 1024, "microbatch_seqs": 32,
             "warmup_batches": 8, "batches": 20, "time_limit_s": 30.0},
    "cpu": {"recipe": "yamls/tiny.yaml", "max_seq_len": 128, "microbatch_seqs": 8,
            "warmup_batches": 2, "batches": 4, "time_limit_s": 30.0},
}
COMPILE_COUNT_NOTE = ("torch._dynamo.utils.counters['frames']['total'] deltas: frames Dynamo converted "
                      "(first compiles, recompiles, graph-break resumptions); 'graphs' is "
                      "counters['stats']['unique_graphs'] (FX graphs compiled)")
SYNC_NOTE = ("torch.cuda.synchronize only at the start (end of the last warmup batch) and end of each "
             "timed window; real tokens counted from the host-side batch (no extra syncs)")
GAP_PROFILE_NOTE = ("cProfile of the host from each batch_end to the next batch's first forward, over "
                    "--profile-gap batches after the timed window: the span in which the GPU idles (Composer "
                    "has read the loss back just before batch_end). cum_ms_per_gap is each function's "
                    "cumulative time per gap, with cProfile's own overhead (the gap_ms are inflated by it)")
HOST_SYNC_NOTE = ("host syncs: the waits for the device inside the timed window (torch.cuda.set_sync_debug_mode"
                  "('warn'): values read back, device-to-host copies, data-dependent shapes), per step and by the "
                  "Python line that asked (host_sync_sites); cuda only")


# --- measurements ---------------------------------------------------------------------------------

@dataclass
class PhaseResult:
    loop: str  # "trainer" | "sync-free" (the trainer with sync_free_steps) | "raw"
    warmup_batches: int
    timed_batches: int = 0
    window_s: Optional[float] = None
    ms_per_step: Optional[float] = None
    tokens_per_s: Optional[float] = None  # real (non-pad) tokens over the timed window
    real_tokens_per_step: Optional[float] = None
    chunk_tokens_per_step: Optional[int] = None  # token slots computed on, padding included
    host_gap_ms_median: Optional[float] = None  # trainer: batch_end -> next batch_start (host clock)
    warmup_s: Optional[float] = None  # includes compilation
    peak_gpu_mem_bytes: Optional[int] = None
    gpu_mem_at_start_bytes: Optional[int] = None
    dynamo_frames_warmup: int = 0
    dynamo_frames_timed: int = 0
    dynamo_graphs_timed: int = 0
    optimizer_closure: Optional[bool] = None  # trainer: stepped through Composer's closure (--composer-closure)
    host_syncs_per_step: Optional[float] = None  # cuda: see HOST_SYNC_NOTE
    host_sync_sites: dict[str, int] = field(default_factory=dict)
    loss_last: Optional[float] = None
    stopped_by_time_limit: bool = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_counts() -> tuple[int, int]:
    """(frames Dynamo converted, FX graphs compiled) so far in this process."""
    return int(dynamo_counters["frames"]["total"]), int(dynamo_counters["stats"]["unique_graphs"])


def start_memory(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def peak_memory(device: torch.device) -> Optional[int]:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _short_path(file: str) -> str:
    """A source path from its package on: site-packages, the standard library, or this repo."""
    for marker in ("site-packages/", f"python{sys.version_info[0]}.{sys.version_info[1]}/", f"{REPO_ROOT}/"):
        if marker in file:
            return file.rsplit(marker, 1)[-1]
    return file


class HostSyncCounter:
    """The host's waits for the device between start() and stop(), by call site: CUDA's sync debug
    mode warns at each one, and the warning carries the innermost Python line (Composer's
    `loss.cpu().item()`, say). Other warnings raised meanwhile are passed on. Off unless `enabled`
    (on the CPU nothing waits)."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.sites: collections.Counter[str] = collections.Counter()
        self._catch: Optional[warnings.catch_warnings] = None
        self._records: list[warnings.WarningMessage] = []

    def start(self) -> None:
        if not self.enabled:
            return
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")  # every wait, not one per line
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._catch is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(None, None, None)
        self._catch = None
        for w in self._records:
            if self.MESSAGE in str(w.message):
                self.sites[f"{_short_path(w.filename)}:{w.lineno}"] += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class TimedWindow:
    """One timed span between two synchronizations, the Dynamo compiles and the host syncs inside it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start_s = self.end_s = 0.0
        self.frames0 = self.graphs0 = 0
        self.frames = self.graphs = 0
        self.syncs = HostSyncCounter(enabled=device.type == "cuda")

    def start(self) -> float:
        synchronize(self.device)
        self.start_s = time.perf_counter()
        self.frames0, self.graphs0 = dynamo_counts()
        self.syncs.start()
        return self.start_s

    def stop(self) -> float:
        self.syncs.stop()
        synchronize(self.device)
        self.end_s = time.perf_counter()
        frames, graphs = dynamo_counts()
        self.frames, self.graphs = frames - self.frames0, graphs - self.graphs0
        return self.end_s

    def fill(self, result: PhaseResult, real_tokens: list[int], chunk_tokens: int) -> None:
        n = len(real_tokens)
        result.timed_batches = n
        result.window_s = self.end_s - self.start_s
        result.dynamo_frames_timed, result.dynamo_graphs_timed = self.frames, self.graphs
        result.chunk_tokens_per_step = chunk_tokens
        if n:
            result.ms_per_step = 1e3 * result.window_s / n
            result.tokens_per_s = sum(real_tokens) / result.window_s
            result.real_tokens_per_step = sum(real_tokens) / n
        if self.syncs.enabled:
            result.host_sync_sites = dict(self.syncs.sites.most_common())
            result.host_syncs_per_step = sum(self.syncs.sites.values()) / n if n else None


class StepTimer(Callback):
    """Host timestamps per batch and one timed window, opened at the end of the last warmup batch;
    keeps the host-side step batches so the raw loop can replay them."""

    def __init__(self, device: torch.device, warmup_batches: int, total_batches: int, time_limit_s: float,
                 batches_after_window: int = 0):
        self.device = device
        self.batches_after_window = batches_after_window  # then GapProfiler stops the run
        self.warmup_batches = warmup_batches
        self.total_batches = total_batches
        self.time_limit_s = time_limit_s
        self.window = TimedWindow(device)
        self.result = PhaseResult("trainer", warmup_batches)
        self.batches: list[dict[str, Any]] = []
        self.real_tokens: list[int] = []
        self.batch_start_s: list[float] = []
        self.batch_end_s: list[float] = []
        self.fit_start_s = 0.0
        self.frames0 = 0
        self.closed = False

    def fit_start(self, state: State, logger: Logger) -> None:
        self.result.gpu_mem_at_start_bytes = start_memory(self.device)
        self.fit_start_s = time.perf_counter()
        self.frames0 = dynamo_counts()[0]

    def after_dataloader(self, state: State, logger: Logger) -> None:
        # Still the host batch here: Composer moves each microbatch to the device inside the step.
        self.batches.append(state.batch)
        self.real_tokens.append(int(state.batch["num_tokens"].sum()))

    def batch_start(self, state: State, logger: Logger) -> None:
        self.batch_start_s.append(time.perf_counter())

    def batch_end(self, state: State, logger: Logger) -> None:
        done = len(self.batch_end_s) + 1
        now = time.perf_counter()
        if done == self.warmup_batches:
            now = self.window.start()
            self.result.warmup_s = now - self.fit_start_s
            self.result.dynamo_frames_warmup = dynamo_counts()[0] - self.frames0
        elif done > self.warmup_batches and not self.closed:
            out_of_time = now - self.window.start_s > self.time_limit_s and done < self.total_batches
            if done == self.total_batches or out_of_time:
                now = self.close_window(state, done - self.warmup_batches)
                self.result.stopped_by_time_limit = out_of_time
                if out_of_time and not self.batches_after_window:
                    state.stop_training()
        self.batch_end_s.append(now)

    def close_window(self, state: State, timed: int) -> float:
        self.closed = True
        end = self.window.stop()
        w = self.warmup_batches
        self.window.fill(self.result, self.real_tokens[w:w + timed], int(self.batches[0]["input_ids"].numel()))
        self.result.peak_gpu_mem_bytes = peak_memory(self.device)
        loss = (state.total_loss_dict or {}).get("loss/train/total")  # already a host float (Composer)
        self.result.loss_last = float(loss) if loss is not None else None
        # The gap before batch i: the data fetch and everything Composer runs between two steps.
        gaps = [self.batch_start_s[i] - self.batch_end_s[i - 1] for i in range(w, w + timed)]
        self.result.host_gap_ms_median = 1e3 * statistics.median(gaps)
        return end


class GapProfiler(Callback):
    """After the timer's window: cProfile from each batch_end to the next before_forward, for
    `batches` gaps (GAP_PROFILE_NOTE); then stops the run."""

    def __init__(self, timer: StepTimer, batches: int):
        self.timer, self.batches = timer, batches
        self.profile = cProfile.Profile()
        self.gap_ms: list[float] = []
        self._started_s: Optional[float] = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.timer.closed:
            return
        if len(self.gap_ms) >= self.batches:
            state.stop_training()
            return
        self._started_s = time.perf_counter()
        self.profile.enable()

    def before_forward(self, state: State, logger: Logger) -> None:
        if self._started_s is not None:  # the first microbatch's forward of the next batch
            self.profile.disable()
            self.gap_ms.append(1e3 * (time.perf_counter() - self._started_s))
            self._started_s = None

    def summary(self, top: int = 25) -> dict[str, Any]:
        """The `top` functions by cumulative and by own time per gap (paths from the package on)."""
        rows = []
        if self.gap_ms:
            stats = pstats.Stats(self.profile).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
            for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.items():
                rows.append({"function": f"{_short_path(file)}:{line}({name})",
                             "cum_ms_per_gap": 1e3 * cumtime / len(self.gap_ms),
                             "own_ms_per_gap": 1e3 * tottime / len(self.gap_ms),
                             "calls_per_gap": ncalls / len(self.gap_ms)})
        by = {key: sorted(rows, key=lambda r: -r[f"{key}_ms_per_gap"])[:top] for key in ("cum", "own")}
        return {"gaps": len(self.gap_ms), "gap_ms": self.gap_ms, "top_cumulative": by["cum"], "top_own": by["own"]}


# --- the two loops --------------------------------------------------------------------------------

def run_trainer(cfg: RunConfig, device: torch.device, warmup_batches: int, batches: int,
                time_limit_s: float, composer_closure: bool = False,
                profile_gaps: int = 0) -> tuple[StepTimer, Optional[GapProfiler]]:
    """The CLI's path: build_trainer + fit on the resolved RunConfig, with the timer added.
    `composer_closure`: step the optimizer through Composer's closure, as stock Composer does (the
    ablation of trainer.HostAheadTrainer._use_closures; this trainer object only). `profile_gaps`: that
    many more batches after the window, with the GapProfiler."""
    trainer = build_trainer(cfg)
    if composer_closure:
        trainer._use_closures = types.MethodType(Trainer._use_closures, trainer)
    timer = StepTimer(device, warmup_batches, warmup_batches + batches, time_limit_s,
                      batches_after_window=profile_gaps)
    timer.result.optimizer_closure = trainer._use_closures()
    trainer.state.callbacks.append(timer)
    profiler = GapProfiler(timer, profile_gaps) if profile_gaps else None
    if profiler is not None:
        trainer.state.callbacks.append(profiler)
    fit(trainer, cfg)
    trainer.close()
    del trainer
    return timer, profiler


def run_raw(cfg: RunConfig, device: torch.device, host_batches: list[dict[str, Any]], warmup_batches: int,
            time_limit_s: float) -> PhaseResult:
    """The same model, compile mode, optimizer, precision and clipping as the trainer, as a bare loop
    on the same step batches (moved to the device beforehand): forward, MLM loss, backward, clip, step."""
    if cfg.precision not in ("amp_bf16", "fp32"):
        raise SystemExit(f"raw loop: precision {cfg.precision!r} not mirrored (amp_bf16 or fp32)")
    bf16 = device.type == "cuda" and cfg.precision == "amp_bf16"
    mb = cfg.data.microbatch_seqs
    # chunk_inputs on the device copy, as the trainer's forward does (it marks dynamic dimensions).
    steps = [[chunk_inputs({k: v.to(device) if torch.is_tensor(v) else v for k, v in c.items()})
              for c in split_batch(b, mb)] for b in host_batches]
    real_tokens = [int(b["num_tokens"].sum()) for b in host_batches]
    result = PhaseResult("raw", warmup_batches)
    torch._dynamo.reset()  # the trainer's compiled frames must not count against this model
    result.gpu_mem_at_start_bytes = start_memory(device)
    reproducibility.seed_all(cfg.seed)
    model = ModernBertForMaskedLM(model_config_for(cfg, TextTokenizer.load(cfg.data.tokenizer))).to(device)
    model.train()
    optimizer = build_optimizer(cfg.optimizer, model, device_type=device.type)
    step_model = compile_model(model, cfg.compile)  # as build_trainer does; compiles at the first call
    clip = cfg.optimizer.grad_clip_norm

    def step(chunks: list[dict[str, Any]]) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for inputs in chunks:
            with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = step_model(**inputs).loss
            (loss / len(chunks)).backward()  # Composer weights each chunk by its share of the samples
            total += loss.detach() / len(chunks)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
        optimizer.step()
        return total

    t0 = time.perf_counter()  # as the trainer's warmup: from the first step, the model already built
    frames0 = dynamo_counts()[0]
    for chunks in steps[:warmup_batches]:
        step(chunks)
    window = TimedWindow(device)
    result.warmup_s = window.start() - t0
    result.dynamo_frames_warmup = dynamo_counts()[0] - frames0
    loss = None
    done = 0
    for chunks in steps[warmup_batches:]:
        loss = step(chunks)
        done += 1
        if time.perf_counter() - window.start_s > time_limit_s and done < len(steps) - warmup_batches:
            result.stopped_by_time_limit = True
            break
    window.stop()
    window.fill(result, real_tokens[warmup_batches:warmup_batches + done], int(host_batches[0]["input_ids"].numel()))
    result.peak_gpu_mem_bytes = peak_memory(device)
    result.loss_last = float(loss) if loss is not None else None
    return result


# --- config and data ------------------------------------------------------------------------------

def run_overrides(args: argparse.Namespace, device: torch.device) -> list[str]:
    """What turns the recipe into a short, side-effect-free benchmark run (before --data paths)."""
    global_seqs = args.chunks_per_step * args.microbatch_seqs
    chosen = [f"compile={args.compile}"] if args.compile else []
    if args.attention_backend:
        chosen.append(f"model.attention_backend={args.attention_backend}")
    return chosen + [
        "run_name=bench-trainer",
        f"device={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"max_duration={args.warmup_batches + args.batches + args.profile_gap}ba",
        f"data.max_seq_len={args.max_seq_len}",
        f"data.microbatch_seqs={args.microbatch_seqs}",
        "data.eval_streams=[]",
        "data.demo_root=null",
        f"batch.global_batch_seqs={global_seqs}",
        "batch.warmup_start_seqs=null",
        "batch.warmup_tokens=0",
        "scheduler.decay_tokens=0",  # a recipe's decay may not fit in a few batches
        "checkpoint.save_folder=null",
        "checkpoint.load_path=null",
        "checkpoint.autoresume=false",
        "logging.wandb_mode=disabled",
    ]


def sequences_needed(cfg: RunConfig, total_batches: int) -> int:
    """Sequences for the whole run without an epoch boundary, plus what the workers prefetch."""
    d = cfg.data
    chunks = total_batches * cfg.batch.global_batch_seqs // d.microbatch_seqs
    chunks += max(1, d.num_workers) * (d.prefetch_factor + 1) + 2
    return chunks * d.microbatch_seqs


def index_sequences(split_dir: Path) -> int:
    index = json.loads((split_dir / "index.json").read_text())
    return sum(int(shard["samples"]) for shard in index["shards"])


def prepare_data(root: Path, cfg: RunConfig, num_sequences: int, seed: int) -> tuple[Path, Path]:
    """Synthetic shards under root (reused when they fit); returns (tokenizer path, stream root)."""
    split_dir = root / "train"
    if (split_dir / "index.json").is_file():
        meta = read_meta(str(split_dir))
        have = index_sequences(split_dir)
        if (meta.max_seq_len, meta.vocab_size) == (cfg.data.max_seq_len, cfg.model.vocab_size) \
                and have >= num_sequences:
            log.info("reusing %d synthetic sequences in %s", have, split_dir)
            return root / TOKENIZER_FILENAME, root
        raise SystemExit(f"{split_dir} holds {have} sequences of {meta.max_seq_len} tokens, vocab "
                         f"{meta.vocab_size}; need {num_sequences} of {cfg.data.max_seq_len}, vocab "
                         f"{cfg.model.vocab_size}: pass another --data-dir")
    start = time.perf_counter()
    ds = write_dataset(root, num_sequences=num_sequences, max_seq_len=cfg.data.max_seq_len,
                       vocab_size=cfg.model.vocab_size, seed=seed)
    log.info("wrote %d synthetic sequences (fill %.1f%%) to %s in %.1fs", ds.num_sequences,
             100 * ds.real_tokens / (ds.num_sequences * cfg.data.max_seq_len), ds.split_dir,
             time.perf_counter() - start)
    return ds.tokenizer.path, root


# --- report ---------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for dist_name in ("mosaicml", "mosaicml-streaming", "torch-optimi", "triton"):
        try:
            info[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            info[dist_name] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[PhaseResult]) -> str:
    lines = [f"{'loop':<9} {'steps':>5} {'ms/step':>9} {'tok/s':>11} {'real tok/step':>13} "
             f"{'host gap ms':>11} {'syncs/step':>10} {'peak GiB':>8} {'compiles':>8} {'warmup s':>8}"]
    for r in results:
        peak = None if r.peak_gpu_mem_bytes is None else r.peak_gpu_mem_bytes / 2 ** 30
        lines.append(f"{r.loop:<9} {r.timed_batches:>5} {_fmt(r.ms_per_step, '.1f'):>9} "
                     f"{_fmt(r.tokens_per_s, ',.0f'):>11} {_fmt(r.real_tokens_per_step, ',.0f'):>13} "
                     f"{_fmt(r.host_gap_ms_median, '.2f'):>11} {_fmt(r.host_syncs_per_step, '.1f'):>10} "
                     f"{_fmt(peak, '.2f'):>8} "
                     f"{r.dynamo_frames_timed:>8} {_fmt(r.warmup_s, '.1f'):>8}")
    return "\n".join(lines)


def ratios(results: list[PhaseResult]) -> dict[str, Optional[float]]:
    """Each trainer loop against the raw loop (the last result): step_time_<loop>_over_raw and
    tokens_per_s_<loop>_over_raw, <loop> = trainer or sync_free."""
    raw = results[-1]
    out: dict[str, Optional[float]] = {}
    for r in results[:-1]:
        ok = r.ms_per_step and raw.ms_per_step
        name = r.loop.replace("-", "_")
        out[f"step_time_{name}_over_raw"] = r.ms_per_step / raw.ms_per_step if ok else None
        out[f"tokens_per_s_{name}_over_raw"] = r.tokens_per_s / raw.tokens_per_s if ok else None
    return out


def payload_header(args: argparse.Namespace, device: torch.device, cfg: RunConfig,
                   overrides: list[str]) -> dict[str, Any]:
    return {
        "machine": machine_info(device),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "run_config_overrides": overrides,
        "precision": cfg.precision if device.type == "cuda" else "fp32",
        "model_preset": cfg.model.preset,
        "attention_backend": cfg.model.attention_backend,
        "compile": cfg.compile,
        "measurement": SYNC_NOTE,
        "compile_count": COMPILE_COUNT_NOTE,
        "host_syncs": HOST_SYNC_NOTE,
        "results": [],
        "ratios": None,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


# --- CLI ------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra key=value run-config overrides, applied last")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--recipe", default=None, help="default: yamls/base.yaml on cuda, yamls/tiny.yaml on cpu")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: 1024 on cuda, 128 on cpu")
    p.add_argument("--microbatch-seqs", type=int, default=None, help="sequences per chunk; default 32 / 8")
    p.add_argument("--chunks-per-step", type=int, default=1, help="global batch = this x microbatch-seqs")
    p.add_argument("--warmup-batches", type=int, default=None, help="untimed (compilation); default 8 / 2")
    p.add_argument("--batches", type=int, default=None, help="timed batches; default 20 / 4")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="stop a timed window after this long (the raw loop then runs as many steps)")
    p.add_argument("--attention-backend", default=None, choices=["sdpa", "flex", "flash", "torch_varlen"],
                   help="default: the recipe's model.attention_backend")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="how both loops compile the model (train/compile.py); default: the recipe's")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="write (or reuse) the synthetic shards here instead of a temp dir")
    p.add_argument("--composer-closure", action="store_true",
                   help="trainer only: step the optimizer through Composer's closure, which reads the loss back "
                        "before the step (stock Composer; what train/trainer.py turns off)")
    p.add_argument("--sync-free", choices=["off", "on", "both"], default="on",
                   help="the trainer with sync_free_steps (train/trainer.py: no host wait for the GPU between "
                        "steps; the run config's default): on, off (stock Composer's bookkeeping), or both "
                        "trainers side by side before the raw loop")
    p.add_argument("--profile-gap", type=int, default=0, metavar="N",
                   help="after the timed window, cProfile the host between steps for N more batches "
                        "(JSON host_gap_profile; not timed)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--out-json", type=Path, default=Path("bench_results/trainer.json"))
    args = p.parse_args(argv)
    if args.composer_closure and args.sync_free != "off":
        p.error("--composer-closure times stock Composer's step, which reads the loss back: add --sync-free off")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["WANDB_MODE"] = "disabled"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for key, value in DEVICE_DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.profile_gap < 0:
        raise SystemExit(f"--profile-gap must be >= 0, got {args.profile_gap}")
    if args.warmup_batches < 1 or args.batches < 1:
        raise SystemExit("--warmup-batches and --batches must be >= 1 (the window opens after a warmup batch)")

    overrides = run_overrides(args, device)
    probe = load_run_config(args.recipe, overrides + args.overrides)
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        scratch = Path(tmp)
        tokenizer_path, stream_root = prepare_data(
            args.data_dir or scratch / "data", probe,
            sequences_needed(probe, args.warmup_batches + args.batches + args.profile_gap), args.seed)
        overrides += [f"data.tokenizer='{tokenizer_path}'", f"data.train_streams=[{{local: '{stream_root}'}}]",
                      "data.train_split=train", f"run_dir='{scratch / 'run'}'"]
        cfg = load_run_config(args.recipe, overrides + args.overrides)
        payload = payload_header(args, device, cfg, overrides + args.overrides)

        results, replay = [], []
        for sync_free in {"off": [False], "on": [True], "both": [False, True]}[args.sync_free]:
            cfg = replace(cfg, sync_free_steps=sync_free)
            timer, profiler = run_trainer(cfg, device, args.warmup_batches, args.batches, args.time_limit_s,
                                          composer_closure=args.composer_closure, profile_gaps=args.profile_gap)
            timer.result.loop = "sync-free" if sync_free else "trainer"
            results.append(timer.result)
            replay = replay or timer.batches[:args.warmup_batches + timer.result.timed_batches]
            payload["results"] = [asdict(r) for r in results]
            if profiler is not None:
                payload.setdefault("host_gap_profile", {})[timer.result.loop] = {
                    "note": GAP_PROFILE_NOTE, **profiler.summary()}
            write_json(args.out_json, payload)  # a later loop that fails (e.g. out of memory) keeps this
            del timer, profiler
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(run_raw(cfg, device, replay, args.warmup_batches, args.time_limit_s))

    payload["results"] = [asdict(r) for r in results]
    payload["ratios"] = ratios(results)
    write_json(args.out_json, payload)

    print(f"\n{args.recipe} (model {cfg.model.preset}, {cfg.model.attention_backend}, compile={cfg.compile}, "
          f"{payload['precision']}) on {payload['machine'].get('gpu') or payload['machine']['cpu']}, "
          f"torch {torch.__version__}, composer {payload['machine']['mosaicml']}: "
          f"{args.chunks_per_step} x {args.microbatch_seqs} x {args.max_seq_len} tokens/step")
    print(format_table(results))
    for res in results[:-1]:
        name = res.loop.replace("-", "_")
        step_ratio = payload["ratios"][f"step_time_{name}_over_raw"]
        if step_ratio is not None:
            print(f"{res.loop} / raw step time: {step_ratio:.3f} ({res.loop} reaches "
                  f"{100 * payload['ratios'][f'tokens_per_s_{name}_over_raw']:.1f}% of raw tokens/s)")
    for loop, gap in payload.get("host_gap_profile", {}).items():
        if not gap["gaps"]:
            continue
        print(f"\n{loop}: host between steps (batch_end -> next forward), cProfile over {gap['gaps']} gaps, "
              f"{statistics.median(gap['gap_ms']):.1f} ms median with the profiler on:")
        for key in ("cumulative", "own"):
            print(f"  by {key} time:")
            for row in gap[f"top_{key}"][:10]:
                ms = row["cum_ms_per_gap" if key == "cumulative" else "own_ms_per_gap"]
                print(f"  {ms:8.2f} ms {row['calls_per_gap']:7.1f} calls  {row['function']}")
    for res in results:
        if res.host_sync_sites:
            sites = ", ".join(f"{site} x{count}" for site, count in res.host_sync_sites.items())
            print(f"host syncs in the {res.loop} window ({res.timed_batches} steps): {sites}")
    print(f"compiles = Dynamo frames converted in the timed window; host gap = median batch_end -> "
          f"next batch_start on the host clock (trainer only); syncs/step = host waits for the GPU "
          f"(cuda only)\nJSON: {args.out_json}")
    # The trainer stops itself on a non-finite loss (train/callbacks.py); the raw loop is checked here.
    broken = [r.loop for r in results if r.loss_last is not None and not math.isfinite(r.loss_last)]
    if broken:
        print(f"ERROR: non-finite loss in {', '.join(broken)}: timings not comparable")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
