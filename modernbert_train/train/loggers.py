"""Logger destinations: W&B that works offline with current wandb, and a metrics.jsonl file."""
from __future__ import annotations

import atexit
import json
import logging
import math
from pathlib import Path
from typing import IO, Any, NamedTuple, Optional

import numpy as np
import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination, WandBLogger
from composer.utils import dist

log = logging.getLogger(__name__)


class WandBCompatLogger(WandBLogger):
    """Composer's WandBLogger, fixed for wandb >= 0.29 and for autoresume without a W&B login.

    - `WandBLogger.init` calls `wandb.run.get_url()`, which wandb removed (`run.url` remains,
      None offline); this `init` does the same work without it.
    - On autoresume, Composer asks every logger destination for the `latest` checkpoint before the
      object store (`Trainer._try_checkpoint_download` -> `download_file`), and WandBLogger answers
      through `wandb.Api()`, which needs an API key and the network. Checkpoints never go to W&B
      here (artifacts off), so `download_file` says "not here" (NotImplementedError, which Composer
      skips) and `can_upload_files` is False.
    - W&B takes steps in increasing order only: metrics are sent in step order (`log_metrics`).
    Works with mode "online", "offline" and "disabled"; the last two need no login.
    """

    def __init__(self, *, project: Optional[str] = None, entity: Optional[str] = None,
                 mode: str = "offline", name: Optional[str] = None, group: Optional[str] = None,
                 tags: Optional[list[str]] = None, wandb_dir: Optional[str | Path] = None,
                 init_kwargs: Optional[dict[str, Any]] = None):
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb mode={mode!r}: use online, offline or disabled")
        kwargs = dict(init_kwargs or {})
        kwargs["mode"] = mode
        if wandb_dir is not None:
            Path(wandb_dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(wandb_dir)
        super().__init__(project=project, group=group, name=name, entity=entity, tags=tags,
                         log_artifacts=False, rank_zero_only=True, init_kwargs=kwargs)
        self._held: dict[int, dict[str, Any]] = {}

    def init(self, state: State, logger: Logger) -> None:
        import wandb

        del logger  # unused
        if self._init_kwargs.get("name") is None:
            self._init_kwargs["name"] = state.run_name
        if self._enabled:
            run = wandb.init(**self._init_kwargs)
            entity = getattr(run, "entity", None) or "offline"
            project = getattr(run, "project", None) or "offline"
            self.run_dir = getattr(run, "dir", None)
            # `Run.url` replaced `Run.get_url()`; offline and disabled runs have none.
            self.run_url = getattr(run, "url", None)
            atexit.register(self._set_is_in_atexit)
            entity_and_project = [str(entity), str(project)]
        else:
            entity_and_project = [None, None]
        dist.broadcast_object_list(entity_and_project)
        self.entity, self.project = entity_and_project

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        """W&B drops a step lower than one it has seen, and a `sync_free_steps` run logs each
        batch's loss while the next batch runs: each step's metrics are held until a step two
        later is logged (or the logger closes), then sent once, in step order."""
        if step is None:
            super().log_metrics(metrics, step)
            return
        self._held.setdefault(step, {}).update(metrics)
        self._send_held(below=step - 1)

    def _send_held(self, below: Optional[int] = None) -> None:
        for step in sorted(s for s in self._held if below is None or s < below):
            super().log_metrics(self._held.pop(step), step)

    def close(self, state: State, logger: Logger) -> None:
        self._send_held()
        super().close(state, logger)

    def can_upload_files(self) -> bool:
        return False

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True) -> None:
        del destination, overwrite, progress_bar
        raise NotImplementedError(
            f"{remote_file_name}: checkpoints are kept in the save folder, not in W&B artifacts")


class Position(NamedTuple):
    tokens: int
    samples: int


class BatchPositions:
    """Where the last few batches started (tokens and samples trained before each), for metrics
    logged after their batch is counted: a `sync_free_steps` run logs each batch's loss one batch
    late (train/trainer.py), under that batch's step."""

    def __init__(self, keep: int = 4):
        self._keep = keep
        self._by_batch: dict[int, Position] = {}

    def at(self, state: State, batch: Optional[int]) -> Optional[Position]:
        """`batch`'s position; None for a batch that is neither the current one nor remembered."""
        now = state.timestamp
        if batch is None or batch == int(now.batch):
            batch, position = int(now.batch), Position(int(now.token), int(now.sample))
            self._by_batch[batch] = position
            for old in [b for b in self._by_batch if b <= batch - self._keep]:
                del self._by_batch[old]
            return position
        return self._by_batch.get(batch)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf; null marks a non-finite value
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class MetricsFileLogger(LoggerDestination):
    """Appends one JSON object per `log_metrics` call to `run_dir/metrics.jsonl` (global rank 0).

    Each line is {"batch", "tokens", "samples", <metric>: value, ...}, flushed at once so a crash
    loses nothing; a resumed run keeps appending to the same file.
    """

    def __init__(self, run_dir: str | Path, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename
        self._state: Optional[State] = None
        self._positions = BatchPositions()
        self._file: Optional[IO[str]] = None

    def init(self, state: State, logger: Logger) -> None:
        del logger
        self._state = state

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        if dist.get_global_rank() != 0:
            return
        record: dict[str, Any] = {"batch": step}
        if self._state is not None:
            if step is None:
                record["batch"] = int(self._state.timestamp.batch)
            position = self._positions.at(self._state, step)
            if position is not None:
                record["tokens"], record["samples"] = position.tokens, position.samples
        record.update({name: _jsonable(value) for name, value in metrics.items()})
        f = self._open()
        f.write(json.dumps(record) + "\n")
        f.flush()

    def close(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._file is not None:
            self._file.close()
            self._file = None
