"""The whole pipeline through the real CLI on the real tiny recipe: build demo data, train,
checkpoint, autoresume in a new process, continue; the validation MLM loss falls."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_train(tmp: Path, *overrides: str, env_extra: dict | None = None, timeout: int = 600,
              launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + [str(REPO / "train.py"), str(REPO / "yamls/tiny.yaml"),
                                           f"data.demo_root={tmp}/demo", f"data.tokenizer={tmp}/demo/tokenizer-v4096/tokenizer.json",
                                           f"data.train_streams=[{{local: {tmp}/demo/mds-v4096-s128}}]",
                                           f"data.eval_streams=[{{local: {tmp}/demo/mds-v4096-s128}}]",
                                           f"run_dir={tmp}/run", "logging.progress_bar=false", "scheduler.decay_tokens=0", *overrides]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    (tmp / f"log-{len(list(tmp.glob('log-*')))}.txt").write_text(proc.stdout + proc.stderr)
    return proc


def eval_losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["batch"], r["metrics/val/MaskedTokenLoss"]) for r in rows if "metrics/val/MaskedTokenLoss" in r]


def test_train_checkpoint_autoresume_continue(tmp_path):
    ckpt = tmp_path / "ckpt"
    first = run_train(tmp_path, "max_duration=20ba", f"checkpoint.save_folder={ckpt}",
                      "checkpoint.save_interval=20ba", "eval.interval=20ba")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = sorted(p.name for p in ckpt.glob("ep*-ba*-rank0.pt"))
    assert saved == ["ep0-ba20-rank0.pt"], saved

    second = run_train(tmp_path, "max_duration=60ba", f"checkpoint.save_folder={ckpt}",
                       "checkpoint.save_interval=20ba", "eval.interval=20ba")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "Autoresuming training from checkpoint" in log
    assert (ckpt / "ep0-ba60-rank0.pt").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_batches = [r["batch"] for r in rows if "loss/train/total" in r]
    assert train_batches == list(range(60)), "each batch trained exactly once across the two launches"

    losses = eval_losses(tmp_path / "run" / "metrics.jsonl")
    assert [b for b, _ in losses] == [20, 40, 60], losses
    initial = math.log(4096)  # an untrained model's MLM loss: uniform over the vocabulary
    assert losses[-1][1] < losses[0][1] - 0.4 and losses[-1][1] < initial - 1.5, \
        f"validation MLM loss should fall clearly below its start ({initial:.2f}): {losses}"
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 5000
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["packages"]["torch"] and info["config"]["run_name"] == "tiny"

    # A finished run started again has nothing to do and says so.
    third = run_train(tmp_path, "max_duration=60ba", f"checkpoint.save_folder={ckpt}")
    assert third.returncode == 0 and "already complete" in third.stdout, third.stdout[-2000:]

    # Export the last checkpoint to the Hugging Face format and load it with transformers.
    transformers = pytest.importorskip("transformers")
    export = subprocess.run([sys.executable, "-m", "modernbert_train.model.hf_interop",
                             str(ckpt / "ep0-ba60-rank0.pt"), str(tmp_path / "hf"), "--tokenizer",
                             str(tmp_path / "demo/tokenizer-v4096/tokenizer.json")],
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    assert tok.mask_token == "[MASK]" and hf.config.mask_token_id == tok.mask_token_id


def metric_by_batch(metrics: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["batch"]: r[key] for r in rows if key in r}


def test_chained_phases_train_with_their_own_lr_and_continue_the_batch_warmup(tmp_path):
    """Phases chained from a full checkpoint (checkpoint.load_path, load_weights_only=false: what
    yamls/base_decay.yaml does). The checkpoint's optimizer carries the earlier phase's lr: the new
    phase must train with its own, on its own schedule (a decay over 4 batches, in the run's own
    unit). Continued without reset_time, the batch-size warmup goes on where the checkpoint left it."""
    common = ("scheduler.warmup_tokens=0", "batch.warmup_tokens=40000")  # 2 chunks/step, 3 from sample 157
    first = run_train(tmp_path, *common, "max_duration=12ba", "scheduler.name=constant", "optimizer.lr=3e-3",
                      f"checkpoint.save_folder={tmp_path}/a", "checkpoint.save_interval=12ba",
                      "eval.interval=12ba", f"run_dir={tmp_path}/run_a")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    chunks_a = metric_by_batch(tmp_path / "run_a/metrics.jsonl", "data/chunks_per_step")
    assert chunks_a[9] == 2 and chunks_a[11] == 3, chunks_a
    load = (f"checkpoint.load_path={tmp_path}/a/ep0-ba12-rank0.pt", "checkpoint.load_weights_only=false")

    decay = run_train(tmp_path, *common, *load, "checkpoint.reset_time=true", "max_duration=4ba",
                      "scheduler.name=decay", "scheduler.final_lr_ratio=0", "optimizer.lr=1e-3",
                      f"checkpoint.save_folder={tmp_path}/b", "eval.interval=4ba", f"run_dir={tmp_path}/run_b")
    assert decay.returncode == 0, decay.stdout[-3000:] + decay.stderr[-3000:]
    # LRMonitor logs, under batch b + 1, the lr batch b trained with.
    lrs = metric_by_batch(tmp_path / "run_b/metrics.jsonl", "lr-StableAdamW/group0")
    expected = {b + 1: 1e-3 * (1 - math.sqrt(b / 4)) for b in range(4)}
    assert lrs.keys() == expected.keys() and all(abs(lrs[b] - expected[b]) < 1e-9 for b in lrs), \
        f"phase lr 1e-3, 1-sqrt decay over its 4 batches: expected {expected}, logged {lrs}"

    more = run_train(tmp_path, *common, *load, "checkpoint.reset_time=false", "max_duration=14ba",
                     "scheduler.name=constant", f"checkpoint.save_folder={tmp_path}/c", "eval.interval=14ba",
                     f"run_dir={tmp_path}/run_c")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    chunks_c = metric_by_batch(tmp_path / "run_c/metrics.jsonl", "data/chunks_per_step")
    assert chunks_c.get(12) == 3, f"the warmup restarted at 2 chunks per step: {chunks_c}"


def test_checkpoints_in_s3_and_autoresume_from_the_bucket(tmp_path, s3_server):
    """Checkpoints go to a real S3-compatible server; a second launch in a fresh working directory
    (no local copies) resumes from the bucket."""
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    # TMPDIR: where Composer stages checkpoints before uploading them. Short, not under tmp_path:
    # DataLoader workers put Unix sockets there (data/loader.py check_worker_tmpdir).
    tmpdir = Path(tempfile.mkdtemp(prefix="stage-"))
    env = {**s3_server.env(), "TMPDIR": str(tmpdir)}
    try:
        _train_twice_through_the_bucket(first_dir, second_dir, s3_server, tmpdir, env)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _train_twice_through_the_bucket(first_dir: Path, second_dir: Path, s3_server, tmpdir: Path,
                                    env: dict[str, str]) -> None:
    folder = "s3://test-bucket/runs/tiny"
    first = run_train(first_dir, "max_duration=20ba", f"checkpoint.save_folder={folder}",
                      "checkpoint.save_interval=10ba", "eval.interval=20ba", "checkpoint.keep_remote=1",
                      env_extra=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    left = sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*.pt"))
    assert left == [], f"a finished launch left staged checkpoints in TMPDIR: {left}"
    bucket = s3_server.root / "test-bucket" / "runs" / "tiny"
    remote = sorted(p.name for p in bucket.glob("ep*-ba*-rank0.pt"))
    assert remote == ["ep0-ba20-rank0.pt"], f"keep_remote=1 should leave only the newest: {remote}"
    assert (bucket / "run_info.json").exists()

    # Reuse the first run's demo data (tokenizer + shards), but nothing of its checkpoints.
    (second_dir / "demo").symlink_to(first_dir / "demo")
    second = run_train(second_dir, "max_duration=30ba", f"checkpoint.save_folder={folder}",
                       "checkpoint.save_interval=10ba", "eval.interval=30ba", env_extra=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert list(tmpdir.rglob("*.pt")) == [], sorted(tmpdir.rglob("*"))
    assert "ep0-ba20-rank0.pt" in second.stdout + second.stderr, "must resume from the bucket's batch-20 checkpoint"
    assert (bucket / "ep0-ba30-rank0.pt").exists()


def test_two_processes_train_save_and_resume(tmp_path):
    """`composer -n 2` on the CPU (gloo): both ranks train, checkpoint, and resume."""
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port",
                str(__import__("tests.s3_server", fromlist=["free_port"]).free_port())]
    ckpt = tmp_path / "ckpt"
    first = run_train(tmp_path, "max_duration=10ba", f"checkpoint.save_folder={ckpt}",
                      "checkpoint.save_interval=10ba", "eval.interval=10ba", "data.num_workers=0",
                      "sync_free_steps=false", launcher=launcher)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert (ckpt / "ep0-ba10-rank0.pt").exists()
    # sync_free_steps (the default; one process only) still trains on two: stock Composer, a log line.
    second = run_train(tmp_path, "max_duration=20ba", f"checkpoint.save_folder={ckpt}",
                       "checkpoint.save_interval=10ba", "eval.interval=20ba", "data.num_workers=0",
                       launcher=launcher)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "sync_free_steps applies to one process; with 2 processes" in second.stdout + second.stderr
    assert (ckpt / "ep0-ba20-rank0.pt").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Early in the batch-size warmup each rank takes one chunk of 8 sequences per step, so the
    # global count after 20 steps is 20 x 2 ranks x 8 (one rank alone would give 160).
    last = [r for r in rows if r.get("batch") == 20 and "samples" in r][-1]
    assert last["samples"] == 20 * 2 * 8, last


def test_two_processes_with_sync_free_multi_rank_train_and_log_as_stock(tmp_path):
    """`composer -n 2` on the CPU (gloo), sync_free_steps with sync_free_multi_rank: the loss of
    each batch averaged over the ranks and logged under its batch with the global sample and token
    counts, and the weights, exactly as stock Composer's bookkeeping gives them."""
    from tests.s3_server import free_port

    runs = {}
    for mode, flags in (("stock", ["sync_free_steps=false"]), ("sync_free", ["sync_free_multi_rank=true"])):
        work = tmp_path / mode
        work.mkdir()
        if runs:  # the stock run's demo data (tokenizer, shards), built once
            (work / "demo").symlink_to(tmp_path / "stock" / "demo")
        launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port())]
        done = run_train(work, "max_duration=6ba", f"checkpoint.save_folder={work}/ckpt", "checkpoint.save_interval=6ba",
                         "eval.interval=6ba", "data.num_workers=0", "logging.log_interval=1ba", *flags,
                         launcher=launcher)
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-4000:]
        rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        losses = sorted((r["batch"], r["samples"], r["tokens"], r["loss/train/total"])
                        for r in rows if "loss/train/total" in r)
        state = torch.load(work / "ckpt" / "ep0-ba6-rank0.pt", map_location="cpu", weights_only=False)
        runs[mode] = log, losses, state["state"]["model"]
    (_, stock_losses, stock_weights), (free_log, free_losses, free_weights) = runs["stock"], runs["sync_free"]
    assert "sync_free_steps on 2 processes" in free_log and "applies to one process" not in free_log, free_log[-3000:]
    assert [b for b, *_ in stock_losses] == list(range(6)), stock_losses
    assert free_losses == stock_losses
    assert stock_weights.keys() == free_weights.keys()
    assert all(torch.equal(stock_weights[k], free_weights[k]) for k in stock_weights)
