"""Logger destinations: W&B that works offline with current wandb, and a metrics.jsonl file."""
from __future__ import annotations

import atexit
import json
import logging
import math
from pathlib import Path
from typing import IO, Any, Optional

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

    def can_upload_files(self) -> bool:
        return False

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True) -> None:
        del destination, overwrite, progress_bar
        raise NotImplementedError(
            f"{remote_file_name}: checkpoints are kept in the save folder, not in W&B artifacts")


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
            timestamp = self._state.timestamp
            if step is None:
                record["batch"] = int(timestamp.batch.value)
            record["tokens"] = int(timestamp.token.value)
            record["samples"] = int(timestamp.sample.value)
        record.update({name: _jsonable(value) for name, value in metrics.items()})
        f = self._open()
        f.write(json.dumps(record) + "\n")
        f.flush()

    def close(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._file is not None:
            self._file.close()
            self._file = None
