"""Our Composer callbacks, driven with the state fields they read."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modernbert_train.model.config import ModernBertConfig
from modernbert_train.train.callbacks import NonFiniteLossGuard, RunInfo
from modernbert_train.train.config import load_run_config

REPO = Path(__file__).resolve().parents[2]


def _timestamp(batch: int) -> SimpleNamespace:
    return SimpleNamespace(batch=batch, token=1000 * batch, sample=10 * batch)


def test_non_finite_loss_guard_checks_each_logged_training_loss():
    guard, state = NonFiniteLossGuard(), SimpleNamespace(timestamp=_timestamp(0))
    guard.init(state, logger=None)
    guard.log_metrics({"loss/train/total": 2.5, "metrics/val/Loss": math.nan}, step=0)  # not a training loss
    state.timestamp = _timestamp(1)
    with pytest.raises(RuntimeError, match=r"non-finite training loss nan at batch 1 \(token 1000\)"):
        guard.log_metrics({"loss/train/total": math.nan}, step=1)


def test_non_finite_loss_guard_names_the_batch_a_late_loss_belongs_to():
    """sync_free_steps logs batch k's loss while batch k+1 runs: the guard names batch k."""
    guard, state = NonFiniteLossGuard(), SimpleNamespace(timestamp=_timestamp(4))
    guard.init(state, logger=None)
    guard.log_metrics({"time/batch": 4}, step=4)
    state.timestamp = _timestamp(5)
    guard.log_metrics({"time/batch": 5}, step=5)
    with pytest.raises(RuntimeError, match=r"non-finite training loss inf at batch 4 \(token 4000\)"):
        guard.log_metrics({"loss/train/total": torch.tensor([math.inf])}, step=4)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_run_info_goes_to_the_formatted_save_folder_and_keeps_every_launch(where, tmp_path, monkeypatch, request):
    """The checkpoints go to save_folder with {run_name} filled in, so run_info does too; a resumed
    launch (perhaps on newer code) must not erase the earlier launches' git SHA and config."""
    if where == "s3":
        request.getfixturevalue("s3_server")
        folder = "s3://test-bucket/runs/{run_name}"
    else:
        folder = f"{tmp_path}/ckpt/{{run_name}}"
    cfg = load_run_config(REPO / "yamls/tiny.yaml",
                          [f"checkpoint.save_folder={folder}", f"run_dir={tmp_path}/run"])
    (tmp_path / "run").mkdir()
    starts = iter([1_700_000_000.0, 1_700_003_600.0])  # two launches, an hour apart
    for _ in range(2):
        with monkeypatch.context() as patch:
            patch.setattr(time, "time", lambda start=next(starts): start)
            RunInfo(cfg, ModernBertConfig(), tmp_path / "run").fit_start(SimpleNamespace(run_name="tiny"), None)

    if where == "s3":
        import boto3
        client = boto3.client("s3")
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="test-bucket")["Contents"])
        read = lambda name: json.loads(
            client.get_object(Bucket="test-bucket", Key=f"runs/tiny/{name}")["Body"].read())
    else:
        keys = sorted(str(p.relative_to(tmp_path / "ckpt")) for p in (tmp_path / "ckpt").rglob("*.json"))
        read = lambda name: json.loads((tmp_path / "ckpt" / "tiny" / name).read_text())
    prefix = "runs/tiny" if where == "s3" else "tiny"
    history = ["run_info-20231114T221320Z.json", "run_info-20231114T231320Z.json"]
    assert keys == sorted(f"{prefix}/{n}" for n in ["run_info.json", *history]), keys
    assert read("run_info.json")["started_unix"] == 1_700_003_600.0
    assert [read(n)["started_unix"] for n in history] == [1_700_000_000.0, 1_700_003_600.0]
    local = sorted(p.name for p in (tmp_path / "run").glob("run_info*.json"))
    assert local == sorted(["run_info.json", *history]), local
