"""Checkpoint storage: Composer's CheckpointSaver as this project configures it, a pre-flight check
of the save folder, and keep-N retention on disk and on the bucket.

The saver's `num_checkpoints_to_keep` prunes only local copies; `RemoteRetention` prunes the remote
ones. Neither touches a checkpoint that `latest` does not already vouch for.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import botocore.exceptions as bex
from composer.callbacks import CheckpointSaver
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import S3ObjectStore, dist, format_name_with_dist, parse_uri
from composer.utils.remote_uploader import RemoteFilesExistingCheckStatus

from modernbert_train.train.config import CheckpointConfig

log = logging.getLogger(__name__)

DEFAULT_MIN_FREE_BYTES = 1 << 30
# Checkpoint names (`checkpoint_saver`; Composer's defaults): monolithic checkpoints are
# `ep{E}-ba{B}-rank0.pt`, sharded ones a folder `ep{E}-ba{B}/`; the latest pointer is an object
# `latest-rank0.pt.symlink` whose body is the target's object name.
CHECKPOINT_FILENAME = "ep{epoch}-ba{batch}-rank{rank}.pt"
LATEST_FILENAME = "latest-rank{rank}.pt"
_CHECKPOINT_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)(?:-rank\d+\.pt|/)")
DEFAULT_LATEST_NAME = LATEST_FILENAME.format(rank=0)


class CheckpointStorageError(RuntimeError):
    """The save folder cannot hold checkpoints; the message names the folder and the cause."""


# --------------------------------------------------------------------------------------------
# Object store access
# --------------------------------------------------------------------------------------------

def _s3_store(bucket: str, *, max_attempts: int = 3) -> S3ObjectStore:
    """Composer's S3 store (it honours S3_ENDPOINT_URL; boto3 itself AWS_ENDPOINT_URL_S3)."""
    return S3ObjectStore(bucket=bucket, client_config={
        "retries": {"mode": "standard", "max_attempts": max_attempts},
        "connect_timeout": 10, "read_timeout": 60,
    })


def _endpoint(store: S3ObjectStore) -> str:
    return str(store.client.meta.endpoint_url)


def _join(prefix: str, name: str) -> str:
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


def _explain_s3_error(err: Exception, *, folder: str, bucket: str, endpoint: str) -> str:
    """One sentence for the common failures instead of a botocore traceback."""
    where = f"checkpoint folder {folder} (endpoint {endpoint})"
    if isinstance(err, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return (f"{where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or an AWS profile)")
    if isinstance(err, (bex.EndpointConnectionError, bex.ConnectTimeoutError,
                        bex.ReadTimeoutError, bex.ConnectionClosedError)):
        return (f"{where}: cannot reach the S3 endpoint {endpoint} ({type(err).__name__}); check "
                f"S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and that the server is up")
    if isinstance(err, bex.ClientError):
        code = str(err.response.get("Error", {}).get("Code", "?"))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (code == "404" and status == 404):
            return f"{where}: bucket '{bucket}' does not exist ({code})"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                    "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"):
            return (f"{where}: the S3 credentials were rejected ({code}); check "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions")
        return f"{where}: S3 error {code} (HTTP {status}): {err}"
    return f"{where}: {type(err).__name__}: {err}"


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def checkpoint_saver(ck: CheckpointConfig) -> CheckpointSaver:
    """Composer's CheckpointSaver for `ck.save_folder`, built here rather than by
    Trainer(save_folder=...):

    - for an s3:// folder, Composer 0.32.1's Trainer looks for the autoresume copy under a
      cwd-relative `s3:/bucket/prefix/` folder and reuses a copy an earlier launch downloaded there
      instead of the bucket's newer `latest`; the saver's own local folder is a fresh temporary one,
      so every launch downloads what `latest` names now;
    - with autoresume, existing checkpoints newer than `latest` are ones a crash interrupted
      (written in place, or uploaded before `latest` moved): they must be overwritten when the
      run gets there again, where Composer would refuse to start or to upload.
    """
    backend, _, prefix = parse_uri(ck.save_folder)
    common = dict(
        folder=ck.save_folder, filename=CHECKPOINT_FILENAME,
        remote_file_name=_join(prefix, CHECKPOINT_FILENAME), latest_filename=LATEST_FILENAME,
        latest_remote_file_name=_join(prefix, LATEST_FILENAME), overwrite=ck.autoresume,
        save_interval=ck.save_interval,
        num_checkpoints_to_keep=ck.keep_local if ck.keep_local is not None else -1)
    if backend:
        return BucketCheckpointSaver(latest_poll_s=ck.latest_poll_s, **common)
    return LocalCheckpointSaver(**common)


_LATEST_POLL_ATTR = "_symlink_upload_wait_before_next_try_in_seconds"


class BucketCheckpointSaver(CheckpointSaver):
    """A CheckpointSaver for an object-store folder that moves `latest` within `latest_poll_s` of an
    upload finishing (at close too, not only at FIT_END, which a preemption skips), and deletes its
    local staging folder once every upload has finished.

    Composer stages checkpoints for a bucket in a fresh `mkdtemp()` folder per launch and never
    removes it: each launch (a preemption restart, a new phase) would leave up to `keep_local`
    full checkpoints in TMPDIR. If an upload failed, the staging folder may hold the only copy, so
    it is kept and its path logged.
    """

    def __init__(self, *, folder: str, latest_poll_s: float, **kwargs) -> None:
        super().__init__(folder=folder, **kwargs)
        self.bucket = parse_uri(folder)[1]
        # How often the check that an upload finished polls before `latest` moves: Composer 0.32.1
        # keeps it in this attribute (30 s) and says tests may override it; no argument sets it.
        if not isinstance(getattr(self, _LATEST_POLL_ATTR, None), float):
            raise RuntimeError(f"this Composer's CheckpointSaver has no {_LATEST_POLL_ATTR} "
                               "(0.32.1 has): checkpoint.latest_poll_s cannot be applied")
        setattr(self, _LATEST_POLL_ATTR, float(latest_poll_s))
        # Composer's local folder is mkdtemp() joined with the bucket prefix.
        staging = Path(self.folder)
        for _ in Path(parse_uri(folder)[2]).parts:
            staging = staging.parent
        # Only a folder directly in TMPDIR is the mkdtemp() one, and ours to delete.
        ours = staging.parent.resolve() == Path(tempfile.gettempdir()).resolve()
        self.staging_folder: Path | None = staging if ours else None

    def fit_end(self, state: State, logger: Logger) -> None:
        super().fit_end(state, logger)  # waits for the uploads and moves `latest` to the newest
        self.symlink_upload_tasks = []

    def post_close(self) -> None:
        uploader, self.remote_uploader = self.remote_uploader, None
        uploaded = True
        if uploader is not None:
            try:
                uploader.wait()  # every upload (the checks that they landed: _upload_pending_latest)
                self._upload_pending_latest()
                uploader.wait_and_close()
            except Exception as e:  # noqa: BLE001 - Composer logs and carries on here, too
                uploaded = False
                log.error("checkpoint upload failed (%s: %s)", type(e).__name__, e)
        super().post_close()
        staging = self.staging_folder
        if not uploaded:
            log.warning("kept the local checkpoint copies in %s: an upload failed", staging or self.folder)
        elif staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
            log.info("removed the checkpoint staging folder %s (uploads finished)", staging)

    def _upload_pending_latest(self) -> None:
        """Point `latest` at the newest checkpoint whose upload was confirmed and `latest` not yet
        moved to. Composer does this only at FIT_END; a preemption (SIGTERM -> sys.exit) or an
        error skips it and reaches only close, so without this the next launch would resume from
        an older checkpoint than the bucket holds. A plain PUT from this process: after sys.exit,
        close runs from an atexit hook, when the uploader's process pool takes no new work."""
        pending, self.symlink_upload_tasks = self.symlink_upload_tasks, []
        if not self.rank_saves_symlinks:
            return
        for check, local_symlink, remote_symlink in reversed(pending):
            if check.result() == RemoteFilesExistingCheckStatus.EXIST:
                target = Path(local_symlink).read_bytes()
                _s3_store(self.bucket).client.put_object(Bucket=self.bucket, Key=remote_symlink, Body=target)
                log.info("moved s3://%s/%s to %s at close", self.bucket, remote_symlink, target.decode())
                return
        if pending:
            log.warning("%s not moved at close: no pending checkpoint upload was confirmed", pending[-1][2])


_LOCAL_CHECKPOINT_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)-rank(?P<rank>\d+)\.pt$")


def prune_local_checkpoints(folder: Path, keep: int, rank: int) -> list[Path]:
    """Delete all but rank `rank`'s newest `keep` checkpoints in `folder` at or before its `latest`
    symlink; return the deleted paths. The rules of `prune_remote_checkpoints`: nothing without a
    valid `latest`, never its target, never anything newer (a crashed launch's, to be overwritten)."""
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least one local checkpoint")
    latest = folder / LATEST_FILENAME.format(rank=rank)
    target = _LOCAL_CHECKPOINT_NAME.match(Path(os.readlink(latest)).name) if latest.is_symlink() else None
    if target is None or not latest.exists():
        return []
    mine = sorted((int(m["batch"]), path) for path in folder.iterdir()
                  if (m := _LOCAL_CHECKPOINT_NAME.match(path.name)) and int(m["rank"]) == rank)
    confirmed = [path for batch, path in mine if batch <= int(target["batch"])]
    doomed = confirmed[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    if doomed:
        log.info("local retention: deleted %s, kept %s", [p.name for p in doomed],
                 [p.name for p in confirmed[-keep:]])
    return doomed


class LocalCheckpointSaver(CheckpointSaver):
    """A CheckpointSaver for a local folder whose keep-N counts the checkpoints already there.

    Composer's counts only the checkpoints this launch saved: every resume would leave up to
    `num_checkpoints_to_keep` of the earlier launch's behind. After each save, each rank prunes its
    own files on disk instead (`prune_local_checkpoints`).
    """

    def _rotate_checkpoints(self, sharding_enabled: bool = False) -> None:
        if sharding_enabled or self.num_checkpoints_to_keep < 1:
            super()._rotate_checkpoints(sharding_enabled=sharding_enabled)
            return
        folder = Path(self.saved_checkpoints[-1]).parent  # the folder with {run_name} filled in
        self.saved_checkpoints = []  # the folder on disk is the record
        prune_local_checkpoints(folder, self.num_checkpoints_to_keep, dist.get_global_rank())


# --------------------------------------------------------------------------------------------
# Pre-flight
# --------------------------------------------------------------------------------------------

def _check_local_dir(folder: Path, *, what: str, min_free_bytes: int) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".preflight-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"modernbert-train preflight\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointStorageError(
            f"{what} {folder} is not writable: {e.strerror or e} (errno {e.errno})") from None
    free_bytes = shutil.disk_usage(folder).free
    if free_bytes < min_free_bytes:
        raise CheckpointStorageError(
            f"{what} {folder} has {free_bytes / 2**30:.2f} GiB free, less than the "
            f"{min_free_bytes / 2**30:.2f} GiB required")
    log.info("%s %s is writable, %.1f GiB free", what, folder, free_bytes / 2**30)


def _check_bucket(save_folder: str) -> None:
    backend, bucket, prefix = parse_uri(save_folder)
    if backend != "s3":
        raise CheckpointStorageError(
            f"checkpoint folder {save_folder}: only local folders and s3:// are supported")
    # Few retries: a wrong endpoint should fail in seconds, not after minutes of backoff.
    store = _s3_store(bucket, max_attempts=2)
    key = _join(prefix, f".preflight-{uuid.uuid4().hex}")
    body = b"modernbert-train preflight\n"
    try:
        store.client.put_object(Bucket=bucket, Key=key, Body=body)
        size = store.get_object_size(key)
        store.client.delete_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        raise CheckpointStorageError(
            f"checkpoint folder {save_folder} (endpoint {_endpoint(store)}): a probe object "
            f"written to s3://{bucket}/{key} could not be read back") from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one readable sentence
        raise CheckpointStorageError(_explain_s3_error(
            e, folder=save_folder, bucket=bucket, endpoint=_endpoint(store))) from None
    if size != len(body):
        raise CheckpointStorageError(
            f"checkpoint folder {save_folder} (endpoint {_endpoint(store)}): probe object "
            f"read back {size} bytes, wrote {len(body)}")
    log.info("checkpoint bucket %s is writable (endpoint %s)", save_folder, _endpoint(store))


def preflight_save_folder(save_folder: str | None, run_dir: Path, *,
                          min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> None:
    """Fail before the first step if checkpoints could not be written.

    The run dir must be writable; a local save folder must be writable with `min_free_bytes` free;
    an s3:// folder must accept a put + head + delete under its prefix, and the local staging
    folder that Composer writes checkpoints to before uploading needs the free space.
    """
    _check_local_dir(Path(run_dir), what="run dir", min_free_bytes=0)
    if save_folder is None:
        return
    backend, _, _ = parse_uri(save_folder)
    if backend == "":
        _check_local_dir(Path(save_folder), what="checkpoint folder", min_free_bytes=min_free_bytes)
        return
    _check_bucket(save_folder)
    _check_local_dir(Path(tempfile.gettempdir()), what="upload staging folder (TMPDIR)",
                     min_free_bytes=min_free_bytes)


# --------------------------------------------------------------------------------------------
# Remote keep-N
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteCheckpoint:
    """One checkpoint on the bucket: a single object, or every object of a sharded folder."""

    epoch: int
    batch: int
    keys: tuple[str, ...]


def _parse_checkpoint_name(relative_name: str) -> tuple[int, int] | None:
    match = _CHECKPOINT_NAME.match(relative_name)
    return (int(match["epoch"]), int(match["batch"])) if match else None


def list_remote_checkpoints(store: S3ObjectStore, prefix: str) -> list[RemoteCheckpoint]:
    """The checkpoints under `prefix` (objects complete: S3 lists an object once its PUT ends),
    oldest first."""
    head = _join(prefix, "")
    groups: dict[tuple[int, int], list[str]] = {}
    paginator = store.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=store.bucket, Prefix=head):
        for obj in page.get("Contents", []):
            parsed = _parse_checkpoint_name(obj["Key"][len(head):])
            if parsed is not None:
                groups.setdefault(parsed, []).append(obj["Key"])
    return [RemoteCheckpoint(epoch, batch, tuple(sorted(keys)))
            for (epoch, batch), keys in sorted(groups.items(), key=lambda kv: kv[0][1])]


def read_latest_target(store: S3ObjectStore, prefix: str,
                       latest_name: str = DEFAULT_LATEST_NAME) -> tuple[int, int] | None:
    """(epoch, batch) of the checkpoint the `latest` symlink object points to, None if absent."""
    key = _join(prefix, latest_name + ".symlink")
    try:
        body = store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    except bex.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    target = body.decode().strip()
    head = _join(prefix, "")
    relative = target[len(head):] if target.startswith(head) else target
    # A sharded target is the folder `ep{E}-ba{B}` itself: the trailing "/" lets both forms parse.
    parsed = _parse_checkpoint_name(relative + "/")
    if parsed is None:
        log.warning("latest symlink s3://%s/%s points to %r, not a checkpoint name",
                    store.bucket, key, target)
    return parsed


def prune_remote_checkpoints(store: S3ObjectStore, prefix: str, keep: int,
                             latest_name: str = DEFAULT_LATEST_NAME) -> list[str]:
    """Delete all but the newest `keep` checkpoints at or before the `latest` target; return the
    deleted keys.

    Composer moves `latest` only after every file of a checkpoint is confirmed on the bucket, and
    only forward, so anything newer than its target may still be uploading and is left alone,
    and the target itself (the autoresume point) always stays.
    """
    if keep < 1:
        raise ValueError(f"keep={keep}: keep at least one remote checkpoint")
    latest = read_latest_target(store, prefix, latest_name)
    if latest is None:
        return []
    checkpoints = list_remote_checkpoints(store, prefix)
    if not any((c.epoch, c.batch) == latest for c in checkpoints):
        log.warning("latest symlink under s3://%s/%s points to ep%d-ba%d, which is not on the "
                    "bucket; not pruning", store.bucket, prefix, *latest)
        return []
    confirmed = [c for c in checkpoints if c.batch <= latest[1]]
    doomed = confirmed[:-keep]
    deleted: list[str] = []
    for ckpt in doomed:
        for key in ckpt.keys:
            store.client.delete_object(Bucket=store.bucket, Key=key)
            deleted.append(key)
    if deleted:
        log.info("remote retention: deleted %d checkpoint(s) up to ba%d under s3://%s/%s, kept %s",
                 len(doomed), doomed[-1].batch, store.bucket, prefix,
                 [f"ba{c.batch}" for c in confirmed[-keep:]])
    return deleted


class RemoteRetention(Callback):
    """Keep the newest `keep` checkpoints on the bucket under `save_folder` (global rank 0 prunes).

    Pruning runs at each checkpoint event, at FIT_END and after close (once Composer's
    CheckpointSaver has waited for its uploads and moved `latest`): call `trainer.close()`.
    A failed prune is logged and retried at the next event; it never stops training.
    """

    def __init__(self, save_folder: str, keep: int, *, latest_name: str = DEFAULT_LATEST_NAME):
        backend, _, _ = parse_uri(save_folder)
        if backend != "s3":
            raise ValueError(f"RemoteRetention needs an s3:// save folder, got {save_folder!r}")
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least one remote checkpoint")
        self.save_folder = save_folder
        self.keep = keep
        self.latest_name = latest_name
        self._store: S3ObjectStore | None = None
        self._prefix = ""
        self._final_prune_done = False
        self.deleted_keys: list[str] = []

    def init(self, state: State, logger: Logger) -> None:
        del logger
        folder = format_name_with_dist(self.save_folder, state.run_name)
        _, bucket, self._prefix = parse_uri(folder)
        latest = format_name_with_dist(self.latest_name, state.run_name)
        self.latest_name = latest
        if dist.get_global_rank() == 0:
            self._store = _s3_store(bucket)

    def _prune(self) -> None:
        if self._store is None:
            return
        try:
            self.deleted_keys += prune_remote_checkpoints(
                self._store, self._prefix, self.keep, self.latest_name)
        except Exception as e:  # noqa: BLE001 - retention must not kill a long run
            log.warning("remote retention under s3://%s/%s failed, will retry at the next "
                        "checkpoint: %s: %s", self._store.bucket, self._prefix, type(e).__name__, e)

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune()

    def iteration_checkpoint(self, state: State, logger: Logger) -> None:
        self._prune()

    def fit_start(self, state: State, logger: Logger) -> None:
        self._final_prune_done = False

    def fit_end(self, state: State, logger: Logger) -> None:
        self._prune()

    def post_close(self) -> None:
        # Composer runs post_close on trainer.close() and again from its atexit hook: prune once.
        if not self._final_prune_done:
            self._final_prune_done = True
            self._prune()
