"""The whole pipeline through the real CLI on the real tiny recipe: build demo data, train,
checkpoint, autoresume in a new process, continue; the validation MLM loss falls."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    first = run_train(tmp_path, "max_duration=40ba", f"checkpoint.save_folder={ckpt}",
                      "checkpoint.save_interval=20ba", "eval.interval=20ba")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    saved = sorted(p.name for p in ckpt.glob("ep*-ba*-rank0.pt"))
    assert "ep0-ba40-rank0.pt" in saved, saved

    second = run_train(tmp_path, "max_duration=120ba", f"checkpoint.save_folder={ckpt}",
                       "checkpoint.save_interval=40ba", "eval.interval=40ba")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "ep0-ba40-rank0.pt" in log, "the second launch must autoresume from batch 40"
    assert (ckpt / "ep0-ba120-rank0.pt").exists()

    losses = eval_losses(tmp_path / "run" / "metrics.jsonl")
    batches = [b for b, _ in losses]
    assert batches == sorted(batches) and batches[-1] == 120, losses
    first_loss, last_loss = losses[0][1], losses[-1][1]
    assert last_loss < first_loss - 1.0, f"validation MLM loss should fall clearly: {losses}"
    assert (tmp_path / "run" / "loss_curve.png").stat().st_size > 5000
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["packages"]["torch"] and info["config"]["run_name"] == "tiny"
