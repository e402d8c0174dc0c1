"""Where a sharded dataset lives (a local folder or s3://) and how a run's output replaces,
publishes and merges into it: job folders, the staged-then-renamed or index-last publish, and
`modernbert-shard merge`."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modernbert_train.data.schema import (INDEX_FILENAME, META_FILENAME, SPLITS, is_remote,
                                          read_meta, s3_client, split_s3_url, write_meta)

log = logging.getLogger(__name__)

# In each job folder of a --num-jobs run: {"num_jobs": N, "job_index": I}, so that `merge` can
# tell a job of this run from one left by an earlier run with another --num-jobs. Job folders
# written before it existed have none (unknown).
JOB_FILENAME = "modernbert_job.json"


class ShardError(Exception):
    """A user-facing failure (bad arguments, bad input in strict mode, existing output): the CLI
    prints the message and exits with status 2, no traceback."""


# ---------------------------------------------------------------------------------------------
# Locations: a local path or an s3:// url


def join(root: str, *names: str) -> str:
    if is_remote(root):
        return "/".join([root.rstrip("/"), *names])
    return str(Path(root, *names))


def _remote_exists(url: str) -> bool:
    bucket, prefix = split_s3_url(url)
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1)
    return listing.get("KeyCount", 0) > 0


def remote_delete(url: str, keep: Callable[[str], bool] = lambda key: False) -> None:
    """Delete every object under `url`/ (a prefix, never the bucket root) whose key `keep` does
    not accept."""
    bucket, prefix = split_s3_url(url)
    if not prefix:
        raise ShardError(f"refusing to delete the whole bucket {url}: give a prefix")
    client = s3_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", []) if not keep(obj["Key"])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _remote_delete_key(url: str) -> None:
    bucket, key = split_s3_url(url)
    s3_client().delete_object(Bucket=bucket, Key=key)


def _exists(location: str) -> bool:
    if is_remote(location):
        return _remote_exists(location)
    path = Path(location)
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _file_exists(location: str) -> bool:
    if is_remote(location):
        bucket, key = split_s3_url(location)
        listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        return any(obj["Key"] == key for obj in listing.get("Contents", []))
    return Path(location).is_file()


def _remove_file(location: str) -> None:
    if is_remote(location):
        _remote_delete_key(location)
    else:
        Path(location).unlink(missing_ok=True)


def _read_job_info(job_dir: str) -> tuple[int, int] | None:
    """(num_jobs, job_index) from a job folder's JOB_FILENAME; None when it has none (written
    before the file existed)."""
    location = join(job_dir, JOB_FILENAME)
    if not _file_exists(location):
        return None
    if is_remote(location):
        bucket, key = split_s3_url(location)
        text = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    else:
        text = Path(location).read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
        return int(raw["num_jobs"]), int(raw["job_index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{location}: not a job description ({exc!r}): {text[:200]!r}") from exc


def _job_number(name: str) -> int | None:
    """job-00003 -> 3; None for a name that is not job-<number>."""
    digits = name[len("job-"):]
    return int(digits) if name.startswith("job-") and digits.isdigit() else None


def _list_job_dirs(split_root: str) -> list[str]:
    if is_remote(split_root):
        bucket, prefix = split_s3_url(split_root)
        names = []
        pages = s3_client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/", Delimiter="/")
        for page in pages:
            names += [p["Prefix"][len(prefix) + 1:].strip("/") for p in page.get("CommonPrefixes", [])]
    else:
        root = Path(split_root)
        names = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return sorted(n for n in names if n.startswith("job-"))


def _check_job_set(split_root: str, jobs: list[str], expect_jobs: int | None) -> None:
    """Refuse job folders that cannot be one run's: written with different --num-jobs, numbered
    past the run's job count (left by an earlier run with more jobs), or not job-<number>.
    Merging them would duplicate documents. Folders without JOB_FILENAME (older writers) are
    checked by their number only."""
    numbers = {j: _job_number(j) for j in jobs}
    odd = [j for j, n in numbers.items() if n is None]
    if odd:
        raise ShardError(f"{split_root}: not job folders of modernbert-shard: {', '.join(odd)}")
    infos = {j: info for j in jobs if (info := _read_job_info(join(split_root, j))) is not None}
    renamed = [f"{j} (job_index={i})" for j, (_, i) in infos.items() if i != numbers[j]]
    if renamed:
        raise ShardError(f"{split_root}: job folders renamed after writing: {', '.join(renamed)}")
    counts = sorted({n for n, _ in infos.values()} | ({expect_jobs} if expect_jobs else set()))
    if len(counts) > 1:
        listed = ", ".join(f"{j} (num_jobs={n})" for j, (n, _) in infos.items())
        expected = f"; --expect-jobs {expect_jobs}" if expect_jobs else ""
        raise ShardError(f"{split_root}: job folders of runs with different --num-jobs: {listed}"
                         f"{expected}. Delete the stale ones (or re-run them) before merging")
    if counts:
        extra = [j for j in jobs if numbers[j] >= counts[0]]
        if extra:
            raise ShardError(f"{split_root}: job folders beyond num_jobs={counts[0]} (left by an "
                             f"earlier run?): {', '.join(extra[:10])}. Delete them before merging")


def warn_stale_jobs(out: str, num_jobs: int) -> None:
    """Job folders numbered past --num-jobs were left by an earlier run with more jobs; `merge`
    refuses them, so say so now, while the user is looking."""
    for split in SPLITS:
        split_root = join(out, split)
        stale = [j for j in _list_job_dirs(split_root)
                 if (n := _job_number(j)) is None or n >= num_jobs]
        if stale:
            log.warning("%s holds job folders beyond --num-jobs %d (from an earlier run?): %s; "
                        "`merge` refuses them: delete them first", split_root, num_jobs,
                        ", ".join(stale[:10]))


# ---------------------------------------------------------------------------------------------
# Replacing and publishing a run's output


def existing_output(out: str, num_jobs: int, if_exists: str, targets: dict[str, str]) -> list[str]:
    """Existing output this run would replace: refused (ShardError) unless --if-exists overwrite,
    so data is never silently duplicated. Nothing is removed here: the run replaces it only once
    its own output is complete (a failed run keeps the old one). A job also replaces the merged
    index of earlier jobs (it would no longer match them)."""
    occupied = [out] if num_jobs == 1 and _exists(out) else []
    if num_jobs > 1:
        occupied += [t for t in targets.values() if _exists(t)]
        occupied += [join(out, s, INDEX_FILENAME) for s in SPLITS
                     if _file_exists(join(out, s, INDEX_FILENAME))]
    if occupied and if_exists == "error":
        raise ShardError(f"output already exists: {', '.join(occupied)}; pass --if-exists overwrite "
                         "to replace it (or choose another --out)")
    return occupied


def remove_replaced(out: str, replaced: list[str], targets: dict[str, str], run_parts: str) -> None:
    """After a successful run, remove what it replaced: a merged index of earlier jobs (and its
    metadata), and on S3 every object of the old output that the new one did not overwrite (local
    output was already swapped by renames in publish_local)."""
    new_prefixes = [split_s3_url(t)[1] for t in targets.values()] if is_remote(out) else []
    fixed = {f"{p}/{name}" for p in new_prefixes for name in (INDEX_FILENAME, META_FILENAME,
                                                              JOB_FILENAME)}

    def is_new(key: str) -> bool:
        return key in fixed or any(key.startswith(f"{p}/{run_parts}") for p in new_prefixes)

    for location in replaced:
        if location.endswith(INDEX_FILENAME):
            _remove_file(location)
            _remove_file(location[: -len(INDEX_FILENAME)] + META_FILENAME)
            log.warning("removed the merged index %s of earlier jobs: run `modernbert-shard merge` "
                        "again once every job is done", location)
            continue
        if is_remote(location):
            remote_delete(location, keep=is_new)
        log.warning("replaced existing output %s (--if-exists overwrite)", location)


class _DropStreamingMergeNoise(logging.Filter):
    """merge_index logs two routine warnings per call (a temp folder, an existing directory);
    they read like problems in the CLI's output, so they are dropped while it runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("A temporary folder")
                    or "exists and not empty. But continue" in message)


@contextlib.contextmanager
def _quiet_merge_index() -> Iterator[None]:
    noise = _DropStreamingMergeNoise()
    loggers = [logging.getLogger(), logging.getLogger("streaming.base.storage.upload")]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def merge_parts(split_local: str, split_remote: str | None, part_names: list[str]) -> int:
    """Merge the parts' index.json (local, or uploaded to `split_remote`) into the split's local
    index.json, uploaded later by publish_remote; returns the number of shards."""
    from streaming.base.util import merge_index

    if split_remote is None:
        urls: list = [str(Path(split_local, p, INDEX_FILENAME)) for p in part_names]
    else:
        urls = [(str(Path(split_local, p, INDEX_FILENAME)), f"{split_remote}/{p}/{INDEX_FILENAME}")
                for p in part_names]
    with _quiet_merge_index():
        merge_index(urls, split_local, keep_local=True)
    with open(Path(split_local, INDEX_FILENAME)) as fh:
        return len(json.load(fh)["shards"])


# What publish_remote uploads, in this order: metadata first, the index.json files last, so a reader
# never sees a new index over missing shards or metadata (an upload failing in between can leave
# the old index under the new metadata).
REMOTE_METADATA_FILES = (JOB_FILENAME, META_FILENAME)
REMOTE_INDEX_FILES = (INDEX_FILENAME,)


def publish_remote(staged: dict[str, str], targets: dict[str, str], names: tuple[str, ...]) -> None:
    """Upload each split's `names` (small files) next to its already uploaded parts."""
    client = s3_client()
    for split, target in targets.items():
        bucket, prefix = split_s3_url(target)
        for name in names:
            local = Path(staged[split], name)
            if local.is_file():
                client.upload_file(str(local), bucket, f"{prefix}/{name}")


def publish_local(out: str, num_jobs: int, staging: Path, targets: dict[str, str]) -> None:
    """Move the complete staged output into place with renames, so OUT never holds a partial
    dataset that looks complete."""
    if num_jobs == 1:
        _replace_dir(staging, Path(out))
        return
    for split, target in targets.items():
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        _replace_dir(staging / split, Path(target))


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` onto `target`; an existing target (empty, or replaced under --if-exists
    overwrite) is moved aside first and deleted after."""
    if not target.exists():
        os.rename(new, target)
        return
    trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, trash)
    os.rename(new, target)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# `modernbert-shard merge`: the jobs' indexes into one per split


@dataclass
class MergeSummary:
    out: str
    jobs: dict[str, list[str]]  # split -> job folders merged
    shards: dict[str, int]
    samples: dict[str, int]

    def summary_lines(self) -> list[str]:
        return [f"  {split}: {len(self.jobs[split])} jobs, {self.shards[split]} shards, "
                f"{self.samples[split]:,} sequences -> {join(self.out, split, INDEX_FILENAME)}"
                for split in self.jobs]


def merge_jobs(out: str, expect_jobs: int | None = None) -> MergeSummary:
    """Merge OUT/<split>/job-*/index.json into OUT/<split>/index.json (and its metadata)."""
    from streaming.base.util import merge_index

    summary = MergeSummary(out=out, jobs={}, shards={}, samples={})
    for split in SPLITS:
        split_root = join(out, split)
        jobs = _list_job_dirs(split_root)
        if not jobs:
            raise ShardError(f"nothing to merge in {split_root}: no job-*/ folders (written with "
                             "--num-jobs N --job-index I)")
        _check_job_set(split_root, jobs, expect_jobs)
        if expect_jobs is not None:
            missing = sorted({f"job-{i:05d}" for i in range(expect_jobs)} - set(jobs))
            if missing:
                raise ShardError(f"{split_root}: missing {len(missing)} of {expect_jobs} jobs: "
                                 f"{', '.join(missing[:10])}")
        incomplete = [j for j in jobs if not _file_exists(join(split_root, j, INDEX_FILENAME))]
        if incomplete:
            raise ShardError(f"{split_root}: jobs without {INDEX_FILENAME} (unfinished?): "
                             f"{', '.join(incomplete)}")
        metas = {j: read_meta(join(split_root, j)) for j in jobs}
        first = metas[jobs[0]]
        for j, meta in metas.items():
            if meta != first:
                raise ShardError(f"{join(split_root, j)}: {META_FILENAME} differs from "
                                 f"{jobs[0]}'s (another tokenizer or max_seq_len?): {meta} vs {first}")
        merged_index = join(split_root, INDEX_FILENAME)
        with tempfile.TemporaryDirectory(prefix="modernbert-merge-") as tmp, _quiet_merge_index():
            if is_remote(out):
                if _file_exists(merged_index):
                    _remote_delete_key(merged_index)
                write_meta(split_root, first)
                merge_index([join(split_root, j, INDEX_FILENAME) for j in jobs], (tmp, split_root),
                            keep_local=True)
                index_path = Path(tmp, INDEX_FILENAME)
            else:
                Path(merged_index).unlink(missing_ok=True)  # merge_index will not replace it
                write_meta(split_root, first)
                merge_index([join(split_root, j, INDEX_FILENAME) for j in jobs], split_root,
                            keep_local=True)
                index_path = Path(merged_index)
            shards = json.loads(index_path.read_text())["shards"]
        summary.jobs[split] = jobs
        summary.shards[split] = len(shards)
        summary.samples[split] = sum(s["samples"] for s in shards)
    return summary
