"""W&B logger offline/disabled with a real Composer Trainer (incl. autoresume), and metrics.jsonl."""
from __future__ import annotations

import json
import math

import pytest
import torch
from composer import Trainer
from composer.models import ComposerModel
from torch.utils.data import DataLoader, TensorDataset

from modernbert_train.train.loggers import MetricsFileLogger, WandBCompatLogger


class ToyModel(ComposerModel):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def forward(self, batch):
        inputs, _ = batch
        return self.net(inputs)

    def loss(self, outputs, batch, *args, **kwargs):
        _, targets = batch
        return torch.nn.functional.mse_loss(outputs, targets)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=2)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B with no key and no network: anything reaching for wandb.Api() fails the test."""
    import wandb

    for var in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))

    def no_api(*args, **kwargs):
        raise AssertionError("wandb.Api() was called: that needs a login and the network")

    monkeypatch.setattr(wandb, "Api", no_api)
    return tmp_path / "wandb"


def _trainer(tmp_path, logger, max_duration: str, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = ToyModel()
    return Trainer(model=model, train_dataloader=_loader(), max_duration=max_duration,
                   optimizers=torch.optim.SGD(model.parameters(), lr=0.01), device="cpu", run_name="toy", loggers=[logger],
                   progress_bar=False, log_to_console=False, seed=1, **kwargs)


def test_offline_run_completes_and_writes_run_dir(tmp_path, offline_wandb):
    logger = WandBCompatLogger(project="toy-project", mode="offline", wandb_dir=offline_wandb)
    trainer = _trainer(tmp_path, logger, "3ba")
    trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 3
    runs = sorted(p.name for p in (offline_wandb / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list((offline_wandb / "wandb" / runs[0]).glob("*.wandb")), "no offline run file written"
    assert logger.run_url is None and logger.project == "toy-project"


def test_disabled_mode_completes(tmp_path, offline_wandb):
    logger = WandBCompatLogger(project="toy", mode="disabled", wandb_dir=offline_wandb)
    trainer = _trainer(tmp_path, logger, "2ba")
    trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 2
    assert not list((offline_wandb / "wandb").glob("offline-run-*"))


def test_autoresume_never_asks_wandb(tmp_path, offline_wandb):
    save_folder = str(tmp_path / "ckpt")
    ckpt_kwargs = dict(save_folder=save_folder, save_interval="1ba", autoresume=True)

    # First run: autoresume finds no checkpoint; Composer asks each logger, ours says "not here".
    first = _trainer(tmp_path, WandBCompatLogger(project="toy", wandb_dir=offline_wandb), "3ba",
                     **ckpt_kwargs)
    first.fit()
    first.close()
    assert (tmp_path / "ckpt" / "latest-rank0.pt").exists()

    second = _trainer(tmp_path, WandBCompatLogger(project="toy", wandb_dir=offline_wandb), "5ba",
                      **ckpt_kwargs)
    assert int(second.state.timestamp.batch) == 3, "did not resume from the batch-3 checkpoint"
    second.fit()
    second.close()
    assert int(second.state.timestamp.batch) == 5


def test_download_file_is_not_implemented():
    logger = WandBCompatLogger(mode="disabled")
    assert logger.can_upload_files() is False
    with pytest.raises(NotImplementedError, match="latest-rank0.pt"):
        logger.download_file("latest-rank0.pt", "/nonexistent")


def test_bad_mode():
    with pytest.raises(ValueError, match="mode='online2'"):
        WandBCompatLogger(mode="online2")


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_file_from_trainer_appends_across_runs(tmp_path):
    run_dir = tmp_path / "run"
    for duration in ("3ba", "5ba"):
        trainer = _trainer(tmp_path, MetricsFileLogger(run_dir), duration)
        trainer.fit()
        trainer.close()
    records = _read(run_dir / "metrics.jsonl")
    loss_records = [r for r in records if "loss/train/total" in r]
    assert [r["batch"] for r in loss_records] == [0, 1, 2, 0, 1, 2, 3, 4], loss_records
    assert loss_records[2]["samples"] == 4 and loss_records[2]["tokens"] == 0, loss_records[2]
    assert all(isinstance(r["loss/train/total"], float) for r in loss_records)


def test_metrics_file_values(tmp_path):
    from types import SimpleNamespace

    from composer.core import Time, TimeUnit

    ts = SimpleNamespace(batch=Time(7, TimeUnit.BATCH), token=Time(7168, TimeUnit.TOKEN),
                         sample=Time(14, TimeUnit.SAMPLE))
    state = SimpleNamespace(timestamp=ts)
    logger = MetricsFileLogger(tmp_path)
    logger.init(state, None)  # type: ignore[arg-type]
    logger.log_metrics({"time/batch": 7})
    logger.log_metrics({"loss/train/total": torch.tensor(2.5), "lr": 1e-3, "bad": math.nan}, step=7)
    state.timestamp = SimpleNamespace(batch=Time(8, TimeUnit.BATCH), token=Time(8192, TimeUnit.TOKEN),
                                      sample=Time(16, TimeUnit.SAMPLE))
    logger.log_metrics({"time/batch": 8})
    # A sync_free_steps run logs batch 7's loss while batch 8 runs: batch 7's position, not 8's.
    logger.log_metrics({"loss/train/total": 2.25}, step=7)
    logger.log_metrics({"metrics/eval/LanguageCrossEntropy": 3.0}, step=9)  # a batch it never saw
    logger.close(None, None)  # type: ignore[arg-type]
    assert _read(tmp_path / "metrics.jsonl") == [
        {"batch": 7, "tokens": 7168, "samples": 14, "time/batch": 7},
        {"batch": 7, "tokens": 7168, "samples": 14, "loss/train/total": 2.5, "lr": 1e-3, "bad": None},
        {"batch": 8, "tokens": 8192, "samples": 16, "time/batch": 8},
        {"batch": 7, "tokens": 7168, "samples": 14, "loss/train/total": 2.25},
        {"batch": 9, "metrics/eval/LanguageCrossEntropy": 3.0},
    ]


def test_wandb_gets_each_step_once_in_step_order(monkeypatch):
    """W&B drops a step lower than one it has seen; a sync_free_steps run logs batch k's loss while
    batch k+1 runs. Held back until a step two later arrives (or close), each step goes out once."""
    import wandb

    sent = []
    monkeypatch.setattr(wandb, "log", lambda metrics, step=None: sent.append((step, dict(metrics))))
    logger = WandBCompatLogger(mode="disabled")
    logger.log_metrics({"time/batch": 0}, step=0)
    logger.log_metrics({"time/batch": 1}, step=1)
    logger.log_metrics({"loss": 2.5}, step=0)  # batch 0's loss, landed during batch 1
    assert sent == []
    logger.log_metrics({"time/batch": 2}, step=2)
    assert sent == [(0, {"time/batch": 0, "loss": 2.5})]
    logger.log_metrics({"loss": 2.4}, step=1)
    logger.log_metrics({"metrics/val": 3.0}, step=2)
    logger.close(None, None)  # type: ignore[arg-type]
    assert sent == [(0, {"time/batch": 0, "loss": 2.5}), (1, {"time/batch": 1, "loss": 2.4}),
                    (2, {"time/batch": 2, "metrics/val": 3.0})]


# plotting.py reads what MetricsFileLogger writes, so its test lives with the logger's.
def _synthetic_metrics(path, n_steps: int = 200) -> None:
    with open(path, "w") as f:
        for step in range(n_steps):
            record = {"batch": step, "tokens": step * 4096, "samples": step * 4,
                      "loss/train/total": 10.0 * math.exp(-step / 60) + 2.0 + 0.1 * math.sin(step)}
            if step % 50 == 49:
                record["metrics/eval/LanguageCrossEntropy"] = 9.0 * math.exp(-step / 60) + 2.2
            f.write(json.dumps(record) + "\n")
        f.write('{"batch": 200, "tok')  # a torn last line from a killed run


def test_plot_loss_curve_writes_png(tmp_path):
    from modernbert_train.train.plotting import plot_loss_curve

    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    _synthetic_metrics(metrics)
    out = plot_loss_curve(metrics, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    assert len(data) > 30_000, f"PNG only {len(data)} bytes: curves missing?"


def test_plot_empty_curve_is_smaller(tmp_path):
    """The size check above can fail: a plot with no lines is much smaller."""
    from modernbert_train.train.plotting import plot_loss_curve

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"batch": 0, "tokens": 0, "samples": 0, "lr": 1e-3}) + "\n")
    size = plot_loss_curve(metrics, tmp_path / "empty.png").stat().st_size
    assert size < 30_000, size
