"""The node-wide lock around Streaming's shared-memory registration: two jobs starting at once."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from modernbert_train.data.loader import build_packed_dataset
from tests.data.test_loader import (
    MAX_SEQ_LEN, REPO_ROOT, VOCAB, loader_config, make_packed_samples, write_shards)
from tests.s3_server import free_port

# How long rank 0 of job A waits for job B to finish building its dataset before rank 0 scans.
# Without the lock B builds in well under a second once rank 1 has scanned; with it B cannot build
# until job A is done, so rank 0 always waits this long.
B_BUILD_WAIT_S = 8.0
EVENT_TIMEOUT_S = 240.0


def _wait_for(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def job_child(role: str, local: str, events: str) -> None:
    """One process of the race: "a0"/"a1" are the two ranks of job A, "b" is job B (one process).

    Each process's prefix scan is held back so that, without a lock, job B registers its prefix
    after rank 1 of A has scanned and before rank 0 of A does: the interleaving that made A's ranks
    disagree in CI. With the lock, A's leader holds it across both scans and B waits for it.
    """
    from streaming.base.constant import SHM_TO_CLEAN
    import streaming.base.shared.prefix as prefix

    ev = Path(events)
    scan_once = prefix._check_and_find_retrying  # called once per shared-memory name
    calls = 0

    def held_back_scan(*args, **kwargs):
        nonlocal calls
        if calls == 0 and role == "a0":
            _wait_for(ev / "a1_scanned", EVENT_TIMEOUT_S)
            _wait_for(ev / "b_built", B_BUILD_WAIT_S)
        result = scan_once(*args, **kwargs)
        calls += 1
        if calls == len(SHM_TO_CLEAN) and role == "a1":
            (ev / "a1_scanned").touch()
        return result

    prefix._check_and_find_retrying = held_back_scan
    if role == "b":
        # Start once job A's scans have begun, so that with the lock A's leader already holds it.
        assert _wait_for(ev / "a1_scanned", EVENT_TIMEOUT_S), "rank 1 of job A never scanned"
    dataset = build_packed_dataset(loader_config([local]), vocab_size=VOCAB)
    (ev / f"{role}_built").touch()
    first = dataset[0]["input_ids"].tolist()
    (ev / f"{role}.json").write_text(json.dumps({"prefix": dataset._shm_prefix_int, "first": first}))
    # Every dataset stays alive (its prefix taken) until all three exist.
    for other in ("a0", "a1", "b"):
        _wait_for(ev / f"{other}.json", EVENT_TIMEOUT_S)


# Prefixes the other tests running meanwhile may still take, past the highest in use at the start.
OTHER_JOBS_MARGIN = 64


def _prefixes_in_use() -> int:
    """One past the highest Streaming prefix in /dev/shm or in the temp folder's lock files."""
    names = [p.name for folder in (Path("/dev/shm"), Path(tempfile.gettempdir())) if folder.is_dir()
             for p in folder.iterdir()]
    return 1 + max((int(m.group(1)) for m in map(re.compile(r"^(\d{6})_").match, names) if m), default=-1)


def _temp_folder_past_other_prefixes(folder: Path, first_prefix: int) -> None:
    """A temp folder whose Streaming lock files mark the prefixes below first_prefix as taken (lock
    files Streaming leaves behind do the same), so that both jobs scan from first_prefix on: a prefix
    another test frees between two ranks' scans would make them disagree as surely as the race
    under test, and the lock does not cover a dataset's teardown (when its prefix is freed). The
    first full-suite run of this test, with fresh temp folders, hit that: rank 1 took prefix 1,
    rank 0 one freed meanwhile."""
    from streaming.base.constant import BARRIER_FILELOCK
    from streaming.base.shared.prefix import _get_path

    folder.mkdir()
    for prefix in range(first_prefix):
        (folder / _get_path(prefix, BARRIER_FILELOCK)).touch()


def _launch(role: str, local: Path, events: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.data.test_shm_registration import job_child; "
         "job_child(*sys.argv[1:])", role, str(local), str(events)],
        cwd=REPO_ROOT, env=os.environ | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(children: dict[str, subprocess.Popen], timeout_s: float) -> dict[str, str]:
    """Wait for every process; once one fails, stop the others (they would wait for its events)."""
    deadline = time.monotonic() + timeout_s
    while any(c.poll() is None for c in children.values()):
        if time.monotonic() > deadline or any(c.returncode not in (None, 0) for c in children.values()):
            for c in children.values():
                if c.poll() is None:
                    c.kill()
            break
        time.sleep(0.2)
    return {role: c.communicate()[0] for role, c in children.items()}


@pytest.mark.slow  # three processes, one gloo group and the held-back scans: ~20 s
def test_concurrent_jobs_register_distinct_prefixes(tmp_path):
    samples = make_packed_samples(16, max_seq_len=MAX_SEQ_LEN, seed=31)
    write_shards(str(tmp_path / "ds_a"), samples)
    write_shards(str(tmp_path / "ds_b"), samples)
    events = tmp_path / "events"
    events.mkdir()
    # Each job has a temp folder of its own, as jobs of two users or containers would: the lock
    # must be where the prefixes are (/dev/shm), not in the temp folder.
    first_prefix = _prefixes_in_use() + OTHER_JOBS_MARGIN
    for job in ("a", "b"):
        _temp_folder_past_other_prefixes(tmp_path / f"tmp_{job}", first_prefix)
    port = str(free_port())
    children = {
        f"a{rank}": _launch(f"a{rank}", tmp_path / "ds_a", events, {
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TMPDIR": str(tmp_path / "tmp_a")})
        for rank in range(2)}
    children["b"] = _launch("b", tmp_path / "ds_b", events, {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
        "TMPDIR": str(tmp_path / "tmp_b")})
    outputs = _finish(children, timeout_s=2 * EVENT_TIMEOUT_S)
    failed = [role for role, child in children.items() if child.returncode != 0]
    assert not failed, "\n".join(f"{role} (exit {children[role].returncode}):\n{outputs[role][-2000:]}"
                                  for role in failed)
    result = {role: json.loads((events / f"{role}.json").read_text()) for role in children}
    assert result["a0"]["prefix"] == result["a1"]["prefix"], result
    assert result["b"]["prefix"] != result["a0"]["prefix"], result
    assert min(result[role]["prefix"] for role in result) >= first_prefix, (first_prefix, result)
    # Each dataset reads its own stream: the same first sample, built from the same samples.
    assert result["a0"]["first"] == result["b"]["first"] == samples[0]["input_ids"].tolist()
