"""Checkpoints on a real S3-compatible server (rclone serve s3): repeated preemptions resume from
the bucket, a server outage never loses an uploaded checkpoint, and bad credentials or a missing
bucket stop the run before its first step with a message naming the cause.

Composer 0.32.1 uploads each checkpoint from a staging copy in a spawned process (S3 PUTs are
atomic: an object is listed only once complete) and moves the `latest-rank0.pt.symlink` object
only after polling that the checkpoint object exists (every checkpoint.latest_poll_s, 2 s; 30 s in
Composer), so `latest` lags the newest upload by up to that plus a batch; autoresume follows `latest`.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import (load_checkpoint, metrics_rows, run_train, start_train, trained_batches,
                                        wait_until)
from tests.s3_server import S3Server

pytestmark = pytest.mark.slow

FOLDER = "s3://test-bucket/runs/tiny"
def _bucket_dir(server: S3Server) -> Path:
    return server.root / "test-bucket" / "runs" / "tiny"


def _latest_target(server: S3Server) -> str | None:
    link = _bucket_dir(server) / "latest-rank0.pt.symlink"
    return link.read_text().strip().rsplit("/", 1)[-1] if link.exists() else None


def _remote_checkpoints(server: S3Server) -> list[str]:
    return sorted((p.name for p in _bucket_dir(server).glob("ep*-ba*-rank0.pt")),
                  key=lambda n: int(n.split("-ba")[1].split("-")[0]))


# Runs that end only when the test kills them or the outage fails them: however fast the step, they
# cannot finish before `latest` first moves, which a fixed length once did.
UNTIL_STOPPED_BATCHES = 100_000


def _common(save_every: int = 4, max_batches: int = 12) -> tuple[str, ...]:
    return (f"max_duration={max_batches}ba", f"checkpoint.save_folder={FOLDER}",
            f"checkpoint.save_interval={save_every}ba")


def _launch_starts(run_dir: Path, rows_before: int) -> int | None:
    """The first batch trained by the launch that began when metrics.jsonl had `rows_before` rows."""
    rows = [r for r in metrics_rows(run_dir)[rows_before:] if "loss/train/total" in r]
    return rows[0]["batch"] if rows else None


def _batch_of(name: str | None) -> int:
    return int(name.split("-ba")[1].split("-")[0]) if name else 0


# The poll (2 s), the batch end or close that uploads `latest`, slack for two busy cores.
LATEST_LAG_BOUND_S = 12.0


class _Arrivals:
    """What this test's polls saw change on the bucket, and when: each checkpoint object a launch
    (over)writes, and each checkpoint `latest` comes to name."""

    def __init__(self, server: S3Server):
        self.server = server
        self.stamps = self._stamps()
        self.uploaded: dict[str, float] = {}
        self.latest: str | None = _latest_target(server)
        self.named: dict[str, float] = {}

    def _stamps(self) -> dict[str, int]:
        stamps = {}
        for name in _remote_checkpoints(self.server):
            try:
                stamps[name] = (_bucket_dir(self.server) / name).stat().st_mtime_ns
            except FileNotFoundError:  # replaced between the listing and the stat
                pass
        return stamps

    def poll(self) -> None:
        now = time.monotonic()
        for name, stamp in self._stamps().items():
            if self.stamps.get(name) != stamp:
                self.stamps[name], self.uploaded[name] = stamp, now
        latest = _latest_target(self.server)
        if latest != self.latest:
            self.latest, self.named[latest] = latest, now


@pytest.mark.timeout(900)
def test_each_launch_in_the_same_directory_resumes_from_the_buckets_latest(tmp_path, demo_data, s3_server):
    """Three launches that each finish (at 4, 8, 12 batches) in the same working directory: each
    continues from the checkpoint the previous one left as `latest` on the bucket."""
    run_dir = tmp_path / "run"
    for end in (4, 8, 12):
        rows_before = len(metrics_rows(run_dir))
        launch = start_train(demo_data, tmp_path, *_common(max_batches=end), env=s3_server.env())
        on_bucket_since = _Arrivals(s3_server)
        wait_until(launch, lambda: on_bucket_since.poll() or launch.proc.poll() is not None,
                   what="the run to end", poll_s=0.05)
        on_bucket_since.poll()
        result = launch.wait()
        assert result.returncode == 0, result.tail()
        last = f"ep0-ba{end}-rank0.pt"
        assert _latest_target(s3_server) == last
        # The run's end waits for `latest` to name its last checkpoint, within
        # checkpoint.latest_poll_s (2 s) of the upload where Composer's own poll took up to 30 s.
        lag_s = on_bucket_since.named[last] - on_bucket_since.uploaded[last]
        print(f"latest named {last} {lag_s:.1f}s after it was on the bucket")
        assert lag_s < LATEST_LAG_BOUND_S, f"latest named {last} {lag_s:.1f}s after it was on the bucket"
        assert _launch_starts(run_dir, rows_before) == end - 4, trained_batches(run_dir)
        # Composer's Trainer(save_folder=s3://...) kept its autoresume copy in ./s3:/test-bucket/...
        assert not (tmp_path / "s3:").exists(), sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.timeout(1200)
def test_three_preempted_launches_resume_from_the_buckets_latest(tmp_path, demo_data, s3_server):
    """The same command three times in the same directory, each launch SIGKILLed once `latest` on
    the bucket has moved (newer checkpoint objects may be on the bucket by then too).
    Each launch continues from what `latest` named when the previous one died, and the bucket ends
    with every checkpoint up to the last `latest`. (Launches that run to the end: the test above.)"""
    run_dir = tmp_path / "run"
    common = _common(max_batches=UNTIL_STOPPED_BATCHES)
    for _ in range(3):
        before = _latest_target(s3_server)
        rows_before = len(metrics_rows(run_dir))
        launch = start_train(demo_data, tmp_path, *common, env=s3_server.env())
        wait_until(launch, lambda: _latest_target(s3_server) != before, what="latest to move", poll_s=0.05)
        launch.sigkill()  # waits for the launch's upload processes to end too
        assert _launch_starts(run_dir, rows_before) == _batch_of(before), trained_batches(run_dir)
        assert _batch_of(_latest_target(s3_server)) > _batch_of(before), (before, _latest_target(s3_server))
        print(f"killed with latest -> {_latest_target(s3_server)}, on the bucket: {_remote_checkpoints(s3_server)}")
    saved = [_batch_of(name) for name in _remote_checkpoints(s3_server)]
    last = _batch_of(_latest_target(s3_server))
    assert [b for b in saved if b <= last] == list(range(4, last + 1, 4)), (last, saved)


@pytest.mark.timeout(900)
def test_server_outage_fails_clearly_and_loses_no_uploaded_checkpoint(tmp_path, demo_data, s3_server):
    """The server goes away once `latest` names a checkpoint and stays away: the run (long enough
    that only the outage can end it) ends (no hang) with an error naming the endpoint; back up, the bucket still holds every checkpoint that was
    there, each loadable, and `latest` names one of them. (Resuming after it: the tests above.)"""
    launch = start_train(demo_data, tmp_path, *_common(max_batches=UNTIL_STOPPED_BATCHES),
                         env=s3_server.env())
    wait_until(launch, lambda: _latest_target(s3_server) is not None, what="latest on the bucket",
               poll_s=0.05)
    before = _remote_checkpoints(s3_server)
    s3_server.stop()
    down_since = time.monotonic()
    failed = launch.wait(timeout_s=400)
    failed_after_s = time.monotonic() - down_since
    assert failed.returncode != 0, failed.tail()
    assert s3_server.endpoint in failed.output or "Could not connect" in failed.output, failed.tail()
    print(f"run failed {failed_after_s:.0f}s after the outage began; on the bucket: {before}")

    s3_server.start()
    after = _remote_checkpoints(s3_server)
    assert set(before) <= set(after), (before, after)
    assert _latest_target(s3_server) in after
    for name in after:
        state = load_checkpoint(_bucket_dir(s3_server) / name)["state"]
        assert state["timestamp"]["Timestamp"]["batch"] == _batch_of(name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault, expected", [
    ("wrong_secret", "the S3 credentials were rejected"),
    ("missing_bucket", "bucket 'no-such-bucket' does not exist"),
])
def test_bad_credentials_or_missing_bucket_stop_before_the_first_step(tmp_path, demo_data, s3_server,
                                                                      fault, expected):
    env = s3_server.env()
    folder = FOLDER
    if fault == "wrong_secret":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    else:
        folder = "s3://no-such-bucket/runs/tiny"
    result = run_train(demo_data, tmp_path, "max_duration=4ba", f"checkpoint.save_folder={folder}",
                       env=env, timeout_s=200)
    assert result.returncode == 2, result.tail()
    assert expected in result.output and folder in result.output, result.tail()
    assert "Traceback" not in result.output, result.tail()
    assert not any("loss/train/total" in r for r in metrics_rows(tmp_path / "run")), "a batch was trained"


@pytest.mark.timeout(600)
def test_unresponsive_data_server_ends_the_run_within_the_stall_bound(tmp_path, demo_data, s3_server,
                                                                       multi_shard_data):
    """Shards are streamed from the bucket in order; after batch 1 the server is frozen (SIGSTOP:
    the kernel still accepts connections, nothing answers). The run must end with a clear message
    instead of hanging: the stall guard after data.stall_timeout_s without a batch, or the failed
    download naming the shard, whichever comes first."""
    import os
    import shutil
    import signal

    from tests.reliability.conftest import traced_batch_seen

    shutil.copytree(multi_shard_data, s3_server.root / "test-bucket" / "mds",
                    ignore=shutil.ignore_patterns("*.mds"))
    stall_s = 20
    launch = start_train(demo_data, tmp_path, "max_duration=200ba", "data.shuffle=false",
                         f"data.stall_timeout_s={stall_s}", "logging.data_trace=true",
                         "checkpoint.save_folder=null", data_remote="s3://test-bucket/mds",
                         env=s3_server.env())
    wait_until(launch, traced_batch_seen(tmp_path / "run", 1), what="batch 1")
    os.kill(s3_server.process.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        ended = launch.wait(timeout_s=400)
    finally:
        os.kill(s3_server.process.pid, signal.SIGCONT)
    ended_after_s = time.monotonic() - frozen_at
    assert ended.returncode != 0, ended.tail()
    stalled = re.search(rf"data path stalled: no batch for {stall_s}s while fetching batch (\d+)", ended.output)
    named = re.search(r"shard part-\d+/shard\.\d+\.mds.* could not be read", ended.output)
    assert stalled or named, ended.tail()
    batches = trained_batches(tmp_path / "run")
    # Bound: the batches still served from shards already cached, then the stall timeout plus the
    # guard's polling period (timeout / 4, at most 5 s) and process exit.
    print(f"ended {ended_after_s:.0f}s after the freeze, {len(batches)} batches trained, "
          f"{'stall guard' if stalled else 'shard error'}")
    assert ended_after_s < 2 * stall_s + 5 + 3 * len(batches) + 30, (ended_after_s, len(batches))
