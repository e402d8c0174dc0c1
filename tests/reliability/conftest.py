"""Launching the real training CLI for fault tests: a fast variant of the tiny recipe, runs that can
be killed at a chosen batch, and readers for what a run leaves behind (trace, metrics, checkpoints)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

# The tiny recipe made cheaper (about 1 s per batch on 2 busy cores) while keeping what matters for
# resumption: DataLoader workers, batch-size warmup (1 chunk per step, then 2 after 24 sequences),
# a warmup lr schedule, alternating global/local attention (3 layers).
FAST = (
    "device=cpu",
    "logging.progress_bar=false",
    "logging.log_interval=1ba",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=3",
    "model.num_attention_heads=2",
    "data.microbatch_seqs=4",
    "data.num_workers=1",
    "batch.global_batch_seqs=8",
    "batch.warmup_start_seqs=4",
    "batch.warmup_tokens=3072",
    "scheduler.warmup_tokens=2048",
    "scheduler.decay_tokens=0",
    "data.eval_streams=[]",
)
# A run that hangs is a failure, not a stuck CI job.
LAUNCH_TIMEOUT_S = 300


@pytest.fixture(autouse=True)
def launch_tmpdir(monkeypatch) -> Path:
    """Each test's launches get their own TMPDIR, removed afterwards: a killed launch leaves its
    checkpoint staging folder there (checkpointing.BucketCheckpointSaver). Short and outside
    pytest's tmp_path, since DataLoader workers put Unix sockets in it (loader.check_worker_tmpdir)."""
    folder = Path(tempfile.mkdtemp(prefix="rel-"))  # also fixes this process's own tempdir first
    monkeypatch.setenv("TMPDIR", str(folder))  # for the launches only
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class DemoData:
    """The demo tokenizer and MDS shards (train/ and val/ under `data_dir`), built once per session."""

    tokenizer: Path
    data_dir: Path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> DemoData:
    from modernbert_train.data.demo import ensure_demo_assets
    assets = ensure_demo_assets(tmp_path_factory.mktemp("demo"), max_seq_len=128, vocab_size=4096)
    return DemoData(tokenizer=assets.tokenizer_path, data_dir=assets.data_dir)


SHARD_BYTES = 24_000  # uncompressed bytes per shard: the demo's train split becomes ~10 shards


@pytest.fixture(scope="session")
def multi_shard_data(demo_data: DemoData, tmp_path_factory) -> Path:
    """The demo corpus sharded again into many small shards (train/ and val/)."""
    from modernbert_train.data.corpus import write_embedded_corpus
    from modernbert_train.data.shard import ShardConfig, shard
    root = tmp_path_factory.mktemp("multi_shard")
    corpus = write_embedded_corpus(root / "corpus.jsonl")
    shard(ShardConfig(inputs=[str(corpus)], tokenizer=str(demo_data.tokenizer), out=str(root / "mds"),
                      max_seq_len=128, val_fraction=0.1, shard_size_limit_bytes=SHARD_BYTES, progress=False))
    return root / "mds"


def train_command(demo: DemoData, work: Path, *overrides: str, launcher: list[str] | None = None,
                  data_dir: Path | None = None, data_remote: str | None = None,
                  fast: bool = True) -> list[str]:
    """`python train.py yamls/tiny.yaml ...` writing everything under `work` (run dir `work/run`).
    The train stream is `data_dir` (default: the demo shards), or `data_remote` cached in work/cache."""
    stream = f"{{local: {data_dir or demo.data_dir}}}"
    if data_remote is not None:
        stream = f"{{local: {work}/cache, remote: '{data_remote}'}}"
    return ((launcher or [sys.executable]) + [
        str(REPO / "train.py"), str(REPO / "yamls/tiny.yaml"),
        "data.demo_root=null", f"data.tokenizer={demo.tokenizer}",
        f"data.train_streams=[{stream}]", f"run_dir={work}/run",
        *(FAST if fast else ()), *overrides])


def train_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(extra or {})}


@dataclass
class Finished:
    returncode: int
    output: str  # stdout and stderr together
    wall_s: float

    def tail(self, chars: int = 4000) -> str:
        return self.output[-chars:]


def run_train(demo: DemoData, work: Path, *overrides: str, env: dict[str, str] | None = None,
              timeout_s: float = LAUNCH_TIMEOUT_S, **kwargs) -> Finished:
    """Run the CLI to its end; the log is also kept as work/launch-N.log."""
    proc = start_train(demo, work, *overrides, env=env, **kwargs)
    return proc.wait(timeout_s)


class Launch:
    """A training process started in its own session, output to work/launch-N.log."""

    def __init__(self, cmd: list[str], work: Path, env: dict[str, str] | None):
        work.mkdir(parents=True, exist_ok=True)
        self.log_path = work / f"launch-{len(list(work.glob('launch-*.log')))}.log"
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=work, env=train_env(env), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout_s: float = LAUNCH_TIMEOUT_S) -> Finished:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"training run did not end within {timeout_s}s (hang); log tail:\n"
                                 f"{self.output()[-3000:]}") from None
        finally:
            self.reap_children()
        return Finished(rc, self.output(), time.monotonic() - self.started)

    def sigkill(self) -> None:
        """SIGKILL the trainer process only (a preempted or OOM-killed trainer); its DataLoader
        workers and upload processes must notice on their own."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reap_children()

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session this Launch created
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def reap_children(self, grace_s: float = 20.0) -> None:
        """Leftover processes of this launch's session (orphaned workers) get `grace_s` to exit."""
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _session_alive(self.proc.pid):
            time.sleep(0.2)
        if _session_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _session_alive(sid: int) -> bool:
    import psutil
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.info["pid"]) == sid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def start_train(demo: DemoData, work: Path, *overrides: str, env: dict[str, str] | None = None,
                **kwargs) -> Launch:
    return Launch(train_command(demo, work, *overrides, **kwargs), work, env)


def wait_until(launch: Launch, condition: Callable[[], bool], *, what: str,
               timeout_s: float = LAUNCH_TIMEOUT_S, poll_s: float = 0.005) -> None:
    """Poll `condition` until true; fail if the run ends or the time runs out first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if launch.proc.poll() is not None:
            raise AssertionError(f"run ended (rc {launch.proc.returncode}) before {what}; log tail:\n"
                                 f"{launch.output()[-3000:]}")
        if time.monotonic() > deadline:
            launch.kill_all()
            raise AssertionError(f"no {what} within {timeout_s}s")
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------
# What a run leaves behind
# --------------------------------------------------------------------------------------------

def trace_lines(run_dir: Path, rank: int = 0) -> list[dict]:
    path = run_dir / f"data_trace-rank{rank}.jsonl"
    if not path.exists():
        return []
    # A SIGKILL can cut the last line short: only whole lines count.
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def traced_batch_seen(run_dir: Path, batch: int, rank: int = 0) -> Callable[[], bool]:
    """True once the current launch has appended batch `batch` to the trace (the trainer fetched it
    and is training on it)."""
    before = len(trace_lines(run_dir, rank))
    return lambda: any(r["batch"] == batch for r in trace_lines(run_dir, rank)[before:])


def effective_trace(run_dir: Path, rank: int = 0) -> dict[int, dict]:
    """Batch index -> the record whose effect the model keeps (the later line wins)."""
    return {r["batch"]: r for r in trace_lines(run_dir, rank)}


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]


def trained_batches(run_dir: Path) -> list[int]:
    return [r["batch"] for r in metrics_rows(run_dir) if "loss/train/total" in r]


def load_checkpoint(path: Path) -> dict:
    # Our own checkpoint, written by the run under test: pickles are acceptable here (see README).
    return torch.load(path, map_location="cpu", weights_only=False)


def tensor_differences(a, b, where: str = "") -> list[str]:
    """Paths at which two nested state structures differ (tensors compared bitwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{where}: tensor vs {type(b).__name__}"]
        if a.shape != b.shape or a.dtype != b.dtype:
            return [f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "ints"
            return [f"{where}: max |diff| {diff}"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            out += tensor_differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tensor_differences(x, y, f"{where}[{i}]")]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [f"{where}: arrays differ"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


# --------------------------------------------------------------------------------------------
# Fault injection inside the real trainer process
# --------------------------------------------------------------------------------------------

_HOOK = '''
"""Test-only fault injection: after {module!r} is imported, run patch(module) below."""
import importlib.abc, importlib.machinery, sys

class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != {module!r}:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        original_exec = spec.loader.exec_module
        def exec_module(module):
            original_exec(module)
            patch(module)
        spec.loader.exec_module = exec_module
        return spec

{patch_source}

sys.meta_path.insert(0, _AfterImport())
'''


def fault_hook_env(folder: Path, module: str, patch_source: str) -> dict[str, str]:
    """Environment that makes every Python process started with it run `patch(module)` (defined in
    `patch_source`) right after `module` is imported: a fault injected at an exact point of the real
    code path, e.g. a crash in the middle of writing a checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_HOOK.format(module=module, patch_source=patch_source))
    return {"PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}
