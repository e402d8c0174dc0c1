"""Composer callbacks owned by this project: data resumption, run provenance, fault guards."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from composer.core import Callback, Event, State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist
from omegaconf import OmegaConf

from modernbert_train.data.loader import StepBatcher
from modernbert_train.model.config import ModernBertConfig
from modernbert_train.train.loggers import BatchPositions

log = logging.getLogger(__name__)


class DataResumption(Callback):
    """Saves the step batcher's exact position with every checkpoint and restores it on resume."""

    def __init__(self, batcher: StepBatcher):
        self.batcher = batcher

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)


class PhaseStart(Callback):
    """A run that starts from another run's checkpoint (`checkpoint.load_path`; autoresume restores
    its own run exactly and is left alone). A full load brings the optimizer back whole,
    hyperparameters included: at FIT_START this phase's own (lr, betas, eps, weight decay, ...)
    replace them, and the lr schedule restarts from this phase's lr, the moments kept. Without
    `reset_time` the clock continues, and so does the batch-size warmup, from the checkpoint's
    sample count (the data position itself belongs to another dataset and is not loaded)."""

    def __init__(self, load_path: str, *, reset_time: bool, weights_only: bool,
                 hyperparameters: list[dict[str, Any]], batcher: StepBatcher):
        self.load_path = load_path
        self.reset_time = reset_time
        self.weights_only = weights_only
        self.hyperparameters = hyperparameters  # per param group, from the freshly built optimizer
        self.batcher = batcher

    def fit_start(self, state: State, logger: Logger) -> None:
        if state.load_path != self.load_path:
            return  # autoresumed from this run's own checkpoint, or nothing loaded
        if not self.weights_only:
            self._apply_hyperparameters(state)
        if not self.reset_time and not self.weights_only:  # a weights-only load has no clock to go on
            samples = int(state.timestamp.sample)
            self.batcher.state = replace(self.batcher.state, samples_seen=samples)
            log.info("continuing %s without reset_time: the batch-size warmup goes on from sample %d",
                     self.load_path, samples)

    def _apply_hyperparameters(self, state: State) -> None:
        optimizer = state.optimizers[0]
        groups = optimizer.param_groups
        if len(groups) != len(self.hyperparameters):
            raise ValueError(f"checkpoint {self.load_path} has {len(groups)} optimizer param groups, this "
                             f"config builds {len(self.hyperparameters)} (optimizer."
                             "exclude_norms_and_biases_from_weight_decay changed?): load_weights_only=true "
                             "starts a fresh optimizer")
        for group, configured in zip(groups, self.hyperparameters):
            group.update(configured)
            group["initial_lr"] = configured["lr"]
        for scheduler in state.schedulers:  # Composer's LambdaLR over our stateless schedule
            scheduler.base_lrs = [group["initial_lr"] for group in groups]
            for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base * factor(scheduler.last_epoch)
        log.info("new phase from %s: the optimizer's moments kept, its settings from this config "
                 "(lr %g, weight decay %g)", self.load_path, self.hyperparameters[0]["lr"],
                 self.hyperparameters[0]["weight_decay"])


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    names = ["modernbert-train", "torch", "mosaicml", "mosaicml-streaming", "torch-optimi", "tokenizers",
             "omegaconf", "wandb", "transformers", "flash-attn"]
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class RunInfo(Callback):
    """Writes the resolved config, git SHA and package versions next to the checkpoints; keeps the
    model config inside every checkpoint so `modernbert-export` can rebuild the model.

    Each launch writes `run_info.json` (the latest launch's) and `run_info-<UTC start>.json`, so a
    resume on newer code keeps the earlier launches' record. A file per launch rather than a list
    appended to one file: nothing to read back first, the same upload on a bucket as on disk.
    """

    def __init__(self, run_config, model_config: ModernBertConfig, run_dir: Path):
        self.run_config = run_config
        self.model_config = model_config
        self.run_dir = Path(run_dir)

    def info(self) -> dict[str, Any]:
        return {"config": OmegaConf.to_container(OmegaConf.structured(self.run_config)),
                "model_config": asdict(self.model_config), "git_sha": git_sha(),
                "packages": package_versions(), "world_size": dist.get_world_size(),
                "started_unix": time.time()}

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        info = self.info()
        text = json.dumps(info, indent=2, default=str) + "\n"
        started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(info["started_unix"]))
        names = ["run_info.json", f"run_info-{started}.json"]
        for name in names:
            (self.run_dir / name).write_text(text)
        save_folder = self.run_config.checkpoint.save_folder
        if not save_folder:
            return
        # The checkpoints' folder: Composer's saver fills in {run_name} (and {rank}) the same way.
        from composer.utils import format_name_with_dist, maybe_create_object_store_from_uri, parse_uri
        save_folder = format_name_with_dist(save_folder, state.run_name)
        if "://" in save_folder:
            store = maybe_create_object_store_from_uri(save_folder)
            _, _, prefix = parse_uri(save_folder)
            for name in names:
                store.upload_object(f"{prefix.rstrip('/')}/{name}".lstrip("/"), str(self.run_dir / name))
        else:
            Path(save_folder).mkdir(parents=True, exist_ok=True)
            for name in names:
                (Path(save_folder) / name).write_text(text)

    def state_dict(self) -> dict[str, Any]:
        return {"model_config": asdict(self.model_config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("model_config", {})
        shape_keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        diff = {k: (saved.get(k), getattr(self.model_config, k)) for k in shape_keys
                if k in saved and saved[k] != getattr(self.model_config, k)}
        if diff:
            raise ValueError(f"checkpoint model shape differs from the recipe (checkpoint, recipe): {diff}")


def checkpoint_due(state: State) -> bool:
    """Whether a CheckpointSaver writes a checkpoint at this batch's BATCH_CHECKPOINT event."""
    from composer.callbacks import CheckpointSaver
    return any(cb.save_interval(state, Event.BATCH_CHECKPOINT)
               for cb in state.callbacks if isinstance(cb, CheckpointSaver))


class NonFiniteLossGuard(LoggerDestination):
    """Stops the run at the first NaN/inf training loss, naming the batch.

    It checks the losses as they are logged (`loss/train/*`: totals over every microbatch, summed
    over the ranks, so all ranks stop at the same batch), under the batch they are logged for:
    Composer logs them right after the step, a `sync_free_steps` run one batch later, and before a
    checkpoint of that batch is written (train/trainer.py). No device sync of its own. Batches are
    named by their index in metrics.jsonl and the data trace (from 0). An fp16 step that the grad
    scaler skipped logs no loss and is not checked: skipping it is how the scaler handles an
    overflow. A logger destination, so that it sees each loss under its batch; listed after the
    metrics file, which then records the bad value first.
    """

    def __init__(self) -> None:
        self._state: State | None = None
        self._positions = BatchPositions()

    def init(self, state: State, logger: Logger) -> None:
        del logger
        self._state = state

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        position = self._positions.at(self._state, step) if self._state is not None else None
        for name, value in metrics.items():
            if name.startswith("loss/train/") and not math.isfinite(float(value)):
                token = f" (token {position.tokens})" if position is not None else ""
                raise RuntimeError(
                    f"non-finite training loss {float(value)} at batch {step}{token}; "
                    "stopping before this state is checkpointed. Resume from the last checkpoint, "
                    "perhaps with a lower lr.")


class NonFiniteWeightsGuard(Callback):
    """Refuses to checkpoint non-finite weights (an inf gradient can poison the weights while the
    loss is still finite), so the last good checkpoint stays `latest`. A callback listed before
    Composer's CheckpointSaver; it reads the weights back only when a checkpoint is due."""

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if not checkpoint_due(state):
            return  # only pay for the check when a checkpoint is about to be written
        import torch
        bad = torch.zeros((), device=next(state.model.parameters()).device)
        for p in state.model.parameters():
            bad += (~torch.isfinite(p)).sum()
        if dist.get_world_size() > 1:  # one rank: the sum is the count itself
            dist.all_reduce(bad)
        if int(bad):
            raise RuntimeError(
                f"{int(bad)} non-finite weights after batch {int(state.previous_timestamp.batch)}; not "
                "checkpointing them, the last good checkpoint stays latest. Resume from it, "
                "perhaps with a lower lr or gradient clipping.")


class PackingEfficiency(Callback):
    """Logs real tokens / token slots of each step (padding at chunk ends is the only waste)."""

    def after_dataloader(self, state: State, logger: Logger) -> None:
        batch = state.batch
        slots = batch["input_ids"].numel()
        real = int(batch["num_tokens"].sum())
        logger.log_metrics({"data/packing_efficiency": real / max(1, slots),
                            "data/chunks_per_step": int(batch["input_ids"].shape[0])
                            if batch["input_ids"].dim() > 1 else 1})


class StalledDataGuard(Callback):
    """Turns a data path that stops delivering into a clear error within a bounded time.

    DataLoader workers already time out; this covers the main process (num_workers=0, a hung
    remote read): if one batch takes longer than `timeout_s`, the process exits with a message.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._waiting_since: float | None = None
        self._batch = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stalled-data-guard")
        self._thread.start()

    def before_dataloader(self, state: State, logger: Logger) -> None:
        self._batch = int(state.timestamp.batch)
        self._waiting_since = time.monotonic()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self._waiting_since = None

    def fit_end(self, state: State, logger: Logger) -> None:
        self._stop.set()

    def close(self, state: State, logger: Logger) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            since = self._waiting_since
            if since is not None and time.monotonic() - since > self.timeout_s:
                msg = (f"data path stalled: no batch for {self.timeout_s:.0f}s while fetching batch "
                       f"{self._batch} (rank {dist.get_global_rank()}). Check the object store / "
                       "shards; raise data.stall_timeout_s if downloads are just slow.")
                log.error(msg)
                print(f"ERROR: {msg}", file=sys.stderr, flush=True)
                os._exit(3)


class DataTrace(Callback):
    """Appends, per training batch, the Streaming sample ids and document ids it consumed to
    `run_dir/data_trace-rank{R}.jsonl` (audit of exactly-once data; off by default).

    After a crash, the batches since the last checkpoint are trained again and appear twice; the
    later line for a batch index is the one whose effect the model keeps.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / f"data_trace-rank{dist.get_global_rank()}.jsonl"
        self._file = None

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        batch = state.batch
        doc_ids = batch["doc_ids"].reshape(-1)
        record = {"batch": int(state.timestamp.batch), "sample_idx": batch["sample_idx"].reshape(-1).tolist(),
                  "doc_ids": doc_ids[doc_ids >= 0].tolist()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
