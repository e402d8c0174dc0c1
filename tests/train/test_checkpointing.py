"""The checkpoint saver's settings, save-folder pre-flight and remote keep-N retention, against a
real S3 server (rclone)."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
import torch
from composer.core import Callback

from modernbert_train.train.checkpointing import (CheckpointStorageError, LocalCheckpointSaver, RemoteRetention,
                                                  _s3_store, checkpoint_saver, list_remote_checkpoints,
                                                  preflight_save_folder, prune_local_checkpoints,
                                                  prune_remote_checkpoints, read_latest_target)
from modernbert_train.train.config import CheckpointConfig

REPO = Path(__file__).resolve().parents[2]


def _client():
    return boto3.client("s3")  # endpoint and keys from the fixture's env


def _keys(bucket: str = "test-bucket", prefix: str = "") -> list[str]:
    pages = _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


# ---------------------------------------------------------------- saver


def test_saver_for_a_bucket_stages_each_launch_in_a_fresh_folder_outside_the_cwd(tmp_path, monkeypatch):
    """Autoresume looks for `latest` in the saver's local folder: one left by an earlier launch
    (Composer's Trainer used a cwd-relative `s3:/bucket/...`) would hide the bucket's newer one."""
    monkeypatch.chdir(tmp_path)
    ck = CheckpointConfig(save_folder="s3://test-bucket/runs/tiny", save_interval="4ba", keep_local=2)
    first, second = checkpoint_saver(ck), checkpoint_saver(replace(ck, autoresume=False))
    try:
        for saver in (first, second):
            assert Path(saver.folder).is_absolute() and saver.folder.startswith(tempfile.gettempdir()), saver.folder
            assert not Path(saver.folder).is_relative_to(tmp_path), saver.folder
        assert first.folder != second.folder
        assert first.remote_file_name.filename == "runs/tiny/ep{epoch}-ba{batch}-rank{rank}.pt"
        assert first.latest_remote_file_name.filename == "runs/tiny/latest-rank{rank}.pt"
        assert first.num_checkpoints_to_keep == 2
        # Under autoresume a checkpoint newer than `latest` is one a crash interrupted: overwritable.
        assert (first.overwrite, second.overwrite) == (True, False)
    finally:
        for saver in (first, second):
            shutil.rmtree(saver.staging_folder, ignore_errors=True)


class _Uploader:
    """Stands in for Composer's RemoteUploader at close: waiting for the uploads succeeds or raises."""

    def __init__(self, error: Exception | None):
        self.error, self.waited = error, False

    def wait(self):
        self.waited = True
        if self.error is not None:
            raise self.error

    def wait_and_close(self):
        self.wait()


@pytest.mark.parametrize("upload_error", [None, OSError("connection reset")], ids=["uploaded", "upload-failed"])
def test_bucket_saver_removes_its_staging_folder_only_after_every_upload_finished(upload_error, caplog):
    """Composer never deletes the mkdtemp() staging folder: each launch would leave up to keep_local
    checkpoints in TMPDIR. After a failed upload it may hold the only copy, so it stays."""
    saver = checkpoint_saver(CheckpointConfig(save_folder="s3://test-bucket/runs/tiny", save_interval="4ba"))
    staging = saver.staging_folder
    assert staging is not None and staging.parent == Path(tempfile.gettempdir()).resolve(), staging
    assert Path(saver.folder) == staging / "runs" / "tiny", (saver.folder, staging)
    try:
        Path(saver.folder).mkdir(parents=True)
        (Path(saver.folder) / "ep0-ba4-rank0.pt").write_bytes(b"weights")
        saver.remote_uploader = uploader = _Uploader(upload_error)
        saver.post_close()
        assert uploader.waited
        if upload_error is None:
            assert not staging.exists(), f"staging folder {staging} left behind after the uploads finished"
        else:
            assert (Path(saver.folder) / "ep0-ba4-rank0.pt").read_bytes() == b"weights"
            assert f"kept the local checkpoint copies in {staging}" in caplog.text, caplog.text
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Preempt(Callback):
    """SIGTERMs its own process at the checkpoint event of `batch`, right after the saver (listed
    before it) wrote that checkpoint: Composer's handler exits, so no BATCH_END or FIT_END follows,
    and the trainer closes from the atexit hook, as in a preemption."""

    def __init__(self, batch: int):
        self.batch = batch

    def batch_checkpoint(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


def _toy_trainer(saver, *callbacks, max_batches: int = 12, **kwargs):
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    return Trainer(model=model, optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
                   train_dataloader=DataLoader(data, batch_size=2), max_duration=f"{max_batches}ba",
                   callbacks=[saver, *callbacks], run_name="toy", progress_bar=False,
                   log_to_console=False, **kwargs)


def _preempted_bucket_launch() -> None:
    """Run in a child process: checkpoints every 2 batches to the bucket, SIGTERM after the 6th."""
    logging.basicConfig(level=logging.INFO)
    saver = checkpoint_saver(CheckpointConfig(save_folder="s3://test-bucket/runs/toy", save_interval="2ba",
                                              latest_poll_s=0.2))
    print(f"staging folder: {saver.staging_folder}", flush=True)
    _toy_trainer(saver, _Preempt(batch=6)).fit()


def test_preempted_bucket_run_moves_latest_to_its_last_uploaded_checkpoint_at_close(s3_server, tmp_path):
    """A preemption (SIGTERM -> sys.exit) skips FIT_END, where Composer uploads the final `latest`:
    close must do it once the last upload finished, or the next launch resumes from an older one."""
    proc = subprocess.run(
        [sys.executable, "-c", "from tests.train.test_checkpointing import _preempted_bucket_launch as launch; "
                               "launch()"],
        cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    latest = read_latest_target(_s3_store("test-bucket"), "runs/toy")
    assert latest == (0, 6), (latest, _keys(prefix="runs/toy"), log[-3000:])
    staging = Path(log.split("staging folder: ", 1)[1].split("\n", 1)[0])
    assert not staging.exists(), f"staging folder {staging} kept: {log[-3000:]}"


def test_local_save_folder_is_composers_folder_as_given(tmp_path):
    saver = checkpoint_saver(CheckpointConfig(save_folder=str(tmp_path / "ckpt"), save_interval="4ba"))
    assert type(saver) is LocalCheckpointSaver and saver.folder == str(tmp_path / "ckpt"), type(saver)


def _local_checkpoints(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.glob("ep*-ba*-rank*.pt")),
                  key=lambda n: (n.rsplit("-rank", 1)[1], int(n.split("-ba")[1].split("-")[0])))


def test_keep_local_counts_the_checkpoints_of_earlier_launches(tmp_path):
    """Composer counts only the current launch's saves: each resume left keep_local more behind."""
    ck = CheckpointConfig(save_folder=str(tmp_path / "ckpt"), save_interval="2ba", keep_local=2)
    for max_batches in (6, 12):  # the second launch resumes at ba6
        trainer = _toy_trainer(checkpoint_saver(ck), max_batches=max_batches, autoresume=True)
        trainer.fit()
        trainer.close()
    assert _local_checkpoints(tmp_path / "ckpt") == ["ep0-ba10-rank0.pt", "ep0-ba12-rank0.pt"]
    assert os.readlink(tmp_path / "ckpt" / "latest-rank0.pt") == "ep0-ba12-rank0.pt"


def test_local_prune_keeps_latest_and_newer_and_other_ranks(tmp_path):
    for rank in (0, 1):
        for batch in (2, 4, 6, 8, 10):
            (tmp_path / f"ep0-ba{batch}-rank{rank}.pt").write_bytes(b"w")
    (tmp_path / "notes.txt").write_text("keep me")
    os.symlink("ep0-ba6-rank0.pt", tmp_path / "latest-rank0.pt")  # 8 and 10: a crashed launch's
    deleted = prune_local_checkpoints(tmp_path, keep=2, rank=0)
    assert [p.name for p in deleted] == ["ep0-ba2-rank0.pt"], deleted
    assert _local_checkpoints(tmp_path) == [f"ep0-ba{b}-rank0.pt" for b in (4, 6, 8, 10)] + \
        [f"ep0-ba{b}-rank1.pt" for b in (2, 4, 6, 8, 10)]
    assert (tmp_path / "notes.txt").exists()
    # No `latest` for rank 1 (or a dangling one): nothing is known good, nothing is deleted.
    assert prune_local_checkpoints(tmp_path, keep=1, rank=1) == []
    os.symlink("ep0-ba12-rank1.pt", tmp_path / "latest-rank1.pt")
    assert prune_local_checkpoints(tmp_path, keep=1, rank=1) == []


# ---------------------------------------------------------------- pre-flight: local


def test_preflight_local_ok(tmp_path):
    preflight_save_folder(str(tmp_path / "ckpt" / "nested"), tmp_path / "run")
    assert (tmp_path / "ckpt" / "nested").is_dir() and (tmp_path / "run").is_dir()
    assert list((tmp_path / "ckpt" / "nested").iterdir()) == [], "probe file left behind"


def test_preflight_none_checks_run_dir_only(tmp_path):
    preflight_save_folder(None, tmp_path / "run")
    assert (tmp_path / "run").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_preflight_read_only_local_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(CheckpointStorageError, match=r"checkpoint folder .*ro is not writable"):
            preflight_save_folder(str(ro), tmp_path / "run")
    finally:
        ro.chmod(stat.S_IRWXU)


def test_preflight_local_path_blocked_by_file(tmp_path):
    """Works as root too: a file where the folder should be cannot become a folder."""
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(CheckpointStorageError, match=r"checkpoint folder .*blocker/ckpt is not writable"):
        preflight_save_folder(str(tmp_path / "blocker" / "ckpt"), tmp_path / "run")


def test_preflight_not_enough_disk(tmp_path):
    with pytest.raises(CheckpointStorageError, match=r"GiB free, less than the 1048576.00 GiB required"):
        preflight_save_folder(str(tmp_path / "ckpt"), tmp_path / "run", min_free_bytes=2**50)


def test_preflight_unsupported_scheme(tmp_path):
    with pytest.raises(CheckpointStorageError, match="only local folders and s3://"):
        preflight_save_folder("gs://bucket/x", tmp_path / "run")


# ---------------------------------------------------------------- pre-flight: S3


def test_preflight_s3_ok(s3_server, tmp_path):
    preflight_save_folder("s3://test-bucket/runs/a/ckpt", tmp_path / "run")
    assert _keys() == [], "probe object left behind"


def test_preflight_s3_wrong_secret(s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(CheckpointStorageError, match="credentials were rejected") as info:
        preflight_save_folder("s3://test-bucket/ckpt", tmp_path / "run")
    assert s3_server.endpoint in str(info.value) and "s3://test-bucket/ckpt" in str(info.value)


def test_preflight_s3_missing_bucket(s3_server, tmp_path):
    with pytest.raises(CheckpointStorageError, match="bucket 'no-such-bucket' does not exist"):
        preflight_save_folder("s3://no-such-bucket/ckpt", tmp_path / "run")


def test_preflight_s3_no_credentials(s3_server, tmp_path, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    for var in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(var, str(tmp_path / "absent"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CheckpointStorageError, match="no S3 credentials found"):
        preflight_save_folder("s3://test-bucket/ckpt", tmp_path / "run")


def test_preflight_s3_endpoint_down(s3_server, tmp_path):
    s3_server.stop()
    with pytest.raises(CheckpointStorageError, match="cannot reach the S3 endpoint") as info:
        preflight_save_folder("s3://test-bucket/ckpt", tmp_path / "run")
    assert s3_server.endpoint in str(info.value)


# ---------------------------------------------------------------- remote retention


def _upload_checkpoints(prefix: str, batches: list[int], latest: int | None) -> None:
    client = _client()
    for batch in batches:
        client.put_object(Bucket="test-bucket", Key=f"{prefix}/ep0-ba{batch}-rank0.pt",
                          Body=b"w" * batch)
    # Unrelated objects under the prefix must survive.
    client.put_object(Bucket="test-bucket", Key=f"{prefix}/notes.txt", Body=b"keep me")
    if latest is not None:
        client.put_object(Bucket="test-bucket", Key=f"{prefix}/latest-rank0.pt.symlink",
                          Body=f"{prefix}/ep0-ba{latest}-rank0.pt".encode())


def _remaining_batches(prefix: str) -> list[int]:
    return [c.batch for c in list_remote_checkpoints(_s3_store("test-bucket"), prefix)]


def test_prune_keeps_newest_n(s3_server):
    _upload_checkpoints("run/ckpt", [10, 20, 30, 40, 50], latest=50)
    store = _s3_store("test-bucket")
    assert read_latest_target(store, "run/ckpt") == (0, 50)
    deleted = prune_remote_checkpoints(store, "run/ckpt", keep=2)
    assert deleted == [f"run/ckpt/ep0-ba{b}-rank0.pt" for b in (10, 20, 30)]
    assert _remaining_batches("run/ckpt") == [40, 50]
    assert "run/ckpt/notes.txt" in _keys() and "run/ckpt/latest-rank0.pt.symlink" in _keys()


def test_prune_leaves_checkpoints_newer_than_latest(s3_server):
    """40 and 50 may still be uploading (latest not moved yet): keep them and latest=30."""
    _upload_checkpoints("p", [10, 20, 30, 40, 50], latest=30)
    prune_remote_checkpoints(_s3_store("test-bucket"), "p", keep=1)
    assert _remaining_batches("p") == [30, 40, 50]


def test_prune_without_latest_deletes_nothing(s3_server):
    _upload_checkpoints("p", [10, 20, 30], latest=None)
    assert prune_remote_checkpoints(_s3_store("test-bucket"), "p", keep=1) == []
    assert _remaining_batches("p") == [10, 20, 30]


def test_prune_sharded_folders_at_bucket_root(s3_server):
    client = _client()
    for batch in (5, 10, 15):
        for name in ("__0_0.distcp", "__1_0.distcp", ".metadata"):
            client.put_object(Bucket="test-bucket", Key=f"ep0-ba{batch}/{name}", Body=b"s")
    client.put_object(Bucket="test-bucket", Key="latest-rank0.pt.symlink", Body=b"ep0-ba15")
    deleted = prune_remote_checkpoints(_s3_store("test-bucket"), "", keep=2)
    assert sorted(deleted) == ["ep0-ba5/.metadata", "ep0-ba5/__0_0.distcp", "ep0-ba5/__1_0.distcp"]
    assert _remaining_batches("") == [10, 15]


def test_prune_does_not_touch_other_prefixes(s3_server):
    _upload_checkpoints("run-a", [1, 2, 3], latest=3)
    _upload_checkpoints("run-ab", [1, 2, 3], latest=3)
    prune_remote_checkpoints(_s3_store("test-bucket"), "run-a", keep=1)
    assert _remaining_batches("run-a") == [3]
    assert _remaining_batches("run-ab") == [1, 2, 3]


def test_retention_callback_prunes_on_rank0(s3_server):
    from types import SimpleNamespace

    _upload_checkpoints("runs/demo/ckpt", [100, 200, 300], latest=300)
    cb = RemoteRetention("s3://test-bucket/runs/{run_name}/ckpt", keep=1)
    cb.init(SimpleNamespace(run_name="demo"), None)  # type: ignore[arg-type]
    cb.batch_checkpoint(None, None)  # type: ignore[arg-type]
    assert _remaining_batches("runs/demo/ckpt") == [300]
    assert len(cb.deleted_keys) == 2

    # After close the latest pointer has moved: the final prune runs once (atexit repeats post_close).
    _upload_checkpoints("runs/demo/ckpt", [400], latest=400)
    cb.post_close()
    assert _remaining_batches("runs/demo/ckpt") == [400]
    _upload_checkpoints("runs/demo/ckpt", [500], latest=500)
    cb.post_close()
    assert _remaining_batches("runs/demo/ckpt") == [400, 500]


def test_retention_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs an s3:// save folder"):
        RemoteRetention("/local/ckpt", keep=1)
    with pytest.raises(ValueError, match="keep=0"):
        RemoteRetention("s3://b/ckpt", keep=0)
