"""The sharding CLI (`modernbert-shard`): raw text -> tokenized, split, best-fit packed MDS shards in
OUT/train and OUT/val, local or s3://, in parallel workers and across independent jobs."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from streaming import MDSWriter

from modernbert_train.data.packing import BestFitPacker, PackedSequence, split_document
from modernbert_train.data.schema import (DOC_IDS_COLUMN, DOC_LENS_COLUMN, INDEX_FILENAME,
                                          INPUT_IDS_COLUMN, META_FILENAME, SPLITS, DatasetMeta,
                                          is_remote, mds_columns, read_meta, s3_client,
                                          split_s3_url, token_dtype_for, write_meta)
from modernbert_train.data.sources import (DEFAULT_TEXT_UNIT, BadInputError, Document, InputFile,
                                           SkipReport, expand_inputs, read_documents)
from modernbert_train.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

MDS_COMPRESSION = "zstd"
MDS_HASHES = ["sha1", "xxh64"]  # both in streaming.base.hashing.get_hashes() of Streaming 0.13
IF_EXISTS_CHOICES = ("error", "overwrite")
# In each job folder of a --num-jobs run: {"num_jobs": N, "job_index": I}, so that `merge` can
# tell a job of this run from one left by an earlier run with another --num-jobs. Job folders
# written before it existed have none (unknown).
JOB_FILENAME = "modernbert_job.json"
_HASH_SPACE = float(1 << 64)


class ShardError(Exception):
    """A user-facing failure (bad arguments, bad input in strict mode, existing output): the CLI
    prints the message and exits with status 2, no traceback."""


@dataclass
class ShardConfig:
    inputs: list[str]
    tokenizer: str  # a tokenizer.json or a HF tokenizer folder
    out: str  # a local folder or s3://bucket/prefix
    max_seq_len: int = 1024
    val_fraction: float = 0.005  # of documents, chosen by a stable hash of the text
    input_format: str = "auto"
    text_field: str = "text"  # JSONL key / Parquet or HF column
    text_unit: str = DEFAULT_TEXT_UNIT  # plain text: line, paragraph or file
    workers: int = 1
    num_jobs: int = 1  # independent machines; this one runs job `job_index`
    job_index: int = 0
    if_exists: str = "error"
    strict: bool = False
    shard_size_limit_bytes: int = 1 << 26  # uncompressed bytes per MDS shard
    encode_batch_docs: int = 256
    pack_buffer_docs: int = 1000
    progress: bool = True


@dataclass
class SplitSummary:
    location: str
    documents: int = 0
    sequences: int = 0
    sequence_tokens: int = 0  # [CLS]/[SEP] included
    shards: int = 0


@dataclass
class ShardSummary:
    out: str
    max_seq_len: int
    files: int
    workers: int
    documents: int
    content_tokens: int  # tokenizer output, no special tokens
    bytes_in: int  # UTF-8 bytes of the documents' text
    sequences: int
    sequence_tokens: int
    shards: int
    elapsed_s: float
    splits: dict[str, SplitSummary]
    skips: SkipReport

    @property
    def packing_efficiency(self) -> float:
        capacity = self.sequences * self.max_seq_len
        return self.sequence_tokens / capacity if capacity else 1.0

    @property
    def tokens_per_s(self) -> float:
        return self.content_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary_lines(self) -> list[str]:
        lines = [
            f"output: {self.out}",
            f"files: {self.files}  workers: {self.workers}",
            f"documents: {self.documents:,}  tokens: {self.content_tokens:,}  "
            f"bytes in: {self.bytes_in:,}",
            f"sequences: {self.sequences:,} of {self.max_seq_len} tokens  shards: {self.shards}  "
            f"packing efficiency: {self.packing_efficiency:.4f}",
            f"time: {self.elapsed_s:.1f} s  throughput: {self.tokens_per_s:,.0f} tokens/s",
        ]
        for name, s in self.splits.items():
            lines.append(f"  {name}: {s.documents:,} documents, {s.sequences:,} sequences, "
                         f"{s.shards} shards -> {s.location}")
        return lines + self.skips.summary_lines()


# ---------------------------------------------------------------------------------------------
# Document identity and split


def doc_hash(text: str) -> tuple[int, bool, int]:
    """(63-bit document id, 64-bit split hash, UTF-8 byte count) of a document's text, both hashes
    from one blake2b digest: the same text always gets the same id and the same split."""
    raw = text.encode("utf-8")
    digest = hashlib.blake2b(raw, digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") >> 1, int.from_bytes(digest[8:], "little"), len(raw)


def is_val_document(split_hash: int, val_fraction: float) -> bool:
    return split_hash < val_fraction * _HASH_SPACE


def files_for_job(files: Sequence[InputFile], num_jobs: int, job_index: int) -> list[InputFile]:
    """Job `job_index`'s share: files sorted by path, every `num_jobs`-th one. Disjoint and complete
    over the jobs, and the same on every machine given the same inputs."""
    ordered = sorted(files, key=lambda f: f.path)
    return ordered[job_index::num_jobs]


def files_for_workers(files: Sequence[InputFile], workers: int) -> list[list[InputFile]]:
    """Balance files over at most `workers` by size (largest first onto the lightest worker);
    deterministic, ties broken by path and worker index. Empty workers are dropped."""
    def size(f: InputFile) -> int:
        p = Path(f.path)
        if p.is_dir():
            return sum(c.stat().st_size for c in p.rglob("*") if c.is_file())
        return p.stat().st_size

    sized = sorted(((size(f), f) for f in files), key=lambda t: (-t[0], t[1].path))
    loads = [0] * max(1, min(workers, len(files)))
    shares: list[list[InputFile]] = [[] for _ in loads]
    for nbytes, f in sized:
        w = min(range(len(loads)), key=lambda i: (loads[i], i))
        loads[w] += nbytes
        shares[w].append(f)
    return [sorted(share, key=lambda f: f.path) for share in shares if share] or [[]]


# ---------------------------------------------------------------------------------------------
# One worker: read, tokenize, split, pack, write its own MDS part of each split


@dataclass
class _WorkerTask:
    cfg: ShardConfig
    files: list[InputFile]
    part_dirs: dict[str, tuple[str, str | None]]  # split -> (local dir, remote url or None)


@dataclass
class _WorkerResult:
    documents: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    sequences: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    sequence_tokens: dict[str, int] = field(default_factory=lambda: {s: 0 for s in SPLITS})
    content_tokens: int = 0
    bytes_in: int = 0
    skips: SkipReport = field(default_factory=SkipReport)
    error: str | None = None


ProgressFn = Callable[[int, int], None]  # (documents, tokens) just processed


def _batched(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_worker(task: _WorkerTask, progress: ProgressFn) -> _WorkerResult:
    cfg = task.cfg
    tok = TextTokenizer.load(cfg.tokenizer)
    vocab_size = tok.padded_vocab_size
    token_dtype = np.dtype(token_dtype_for(vocab_size))
    cls_id, sep_id = tok.special.cls, tok.special.sep
    result = _WorkerResult()
    writers = {
        split: MDSWriter(out=local if remote is None else (local, remote),
                         columns=mds_columns(token_dtype.name), compression=MDS_COMPRESSION,
                         hashes=MDS_HASHES, size_limit=cfg.shard_size_limit_bytes,
                         keep_local=remote is None, exist_ok=False)
        for split, (local, remote) in task.part_dirs.items()
    }
    packers = {split: BestFitPacker(cfg.max_seq_len, cfg.pack_buffer_docs) for split in SPLITS}

    def write(split: str, sequences: list[PackedSequence]) -> None:
        for seq in sequences:
            writers[split].write({INPUT_IDS_COLUMN: seq.input_ids.astype(token_dtype, copy=False),
                                  DOC_LENS_COLUMN: seq.doc_lens, DOC_IDS_COLUMN: seq.doc_ids})
            result.sequences[split] += 1
            result.sequence_tokens[split] += len(seq.input_ids)

    try:
        for f in task.files:
            docs = read_documents(f, text_field=cfg.text_field, text_unit=cfg.text_unit,
                                  strict=cfg.strict, skips=result.skips)
            for batch in _batched(docs, cfg.encode_batch_docs):
                encoded = tok.encode_batch([d.text for d in batch])
                highest = max((int(ids.max()) for ids in encoded if ids.size), default=-1)
                if highest >= vocab_size:
                    raise ShardError(f"{f.path}: token id {highest} >= vocabulary size "
                                     f"{vocab_size} of {cfg.tokenizer}: the tokenizer is broken")
                batch_tokens = 0
                for doc, ids in zip(batch, encoded):
                    if ids.size == 0:
                        result.skips.add(doc.source, doc.line, "no_tokens")
                        continue
                    doc_id, split_hash, nbytes = doc_hash(doc.text)
                    split = "val" if is_val_document(split_hash, cfg.val_fraction) else "train"
                    result.documents[split] += 1
                    result.bytes_in += nbytes
                    batch_tokens += int(ids.size)
                    for piece in split_document(ids, cfg.max_seq_len, cls_id, sep_id):
                        write(split, packers[split].add(piece, doc_id))
                result.content_tokens += batch_tokens
                progress(len(batch), batch_tokens)
        for split in SPLITS:
            write(split, packers[split].flush())
    except (BadInputError, ShardError) as exc:
        result.error = str(exc)
    finally:
        for writer in writers.values():
            writer.finish()
    return result


_progress_queue: multiprocessing.Queue | None = None


def _init_pool_worker(progress_queue: multiprocessing.Queue) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    # One tokenizer thread per worker process: the workers are the parallelism.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    logging.basicConfig(level=logging.WARNING)


def _pool_worker(task: _WorkerTask) -> _WorkerResult:
    def progress(docs: int, tokens: int) -> None:
        assert _progress_queue is not None
        _progress_queue.put((docs, tokens))
    return _run_worker(task, progress)


def _run_workers(tasks: list[_WorkerTask], show_progress: bool) -> list[_WorkerResult]:
    from tqdm import tqdm

    bar = tqdm(unit="doc", desc="sharding", disable=None if show_progress else True,
               dynamic_ncols=True)
    tokens = 0

    def progress(docs: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        bar.update(docs)
        bar.set_postfix(tokens=f"{tokens:,}", refresh=False)

    try:
        if len(tasks) == 1:
            return [_run_worker(tasks[0], progress)]
        # fork starts workers in milliseconds (spawn re-imports torch + streaming in each, seconds).
        # The workers run the tokenizer single-threaded (_init_pool_worker), which is also what
        # tokenizers falls back to in a child forked after its thread pool ran, so a parent that
        # already tokenized (a test, a notebook) is safe too.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        progress_queue = context.Queue()
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=len(tasks), mp_context=context, initializer=_init_pool_worker,
                initargs=(progress_queue,)) as pool:
            futures = [pool.submit(_pool_worker, task) for task in tasks]
            while True:
                try:
                    progress(*progress_queue.get(timeout=0.2))
                except queue.Empty:
                    if all(fut.done() for fut in futures):
                        break
            while not progress_queue.empty():
                progress(*progress_queue.get_nowait())
            return [fut.result() for fut in futures]
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# Output locations, existing output, merging


def _join(root: str, *names: str) -> str:
    if is_remote(root):
        return "/".join([root.rstrip("/"), *names])
    return str(Path(root, *names))


def _remote_exists(url: str) -> bool:
    bucket, prefix = split_s3_url(url)
    listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/", MaxKeys=1)
    return listing.get("KeyCount", 0) > 0


def _remote_delete(url: str, keep: Callable[[str], bool] = lambda key: False) -> None:
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
    location = _join(job_dir, JOB_FILENAME)
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


def _split_dataset_dirs(cfg: ShardConfig) -> dict[str, str]:
    """Where each split's finished dataset of this run lives (its index.json is written last)."""
    if cfg.num_jobs == 1:
        return {split: _join(cfg.out, split) for split in SPLITS}
    return {split: _join(cfg.out, split, f"job-{cfg.job_index:05d}") for split in SPLITS}


def _existing_output(cfg: ShardConfig, targets: dict[str, str]) -> list[str]:
    """Existing output this run would replace: refused (ShardError) unless --if-exists overwrite,
    so data is never silently duplicated. Nothing is removed here: the run replaces it only once
    its own output is complete (a failed run keeps the old one). A job also replaces the merged
    index of earlier jobs (it would no longer match them)."""
    occupied = [cfg.out] if cfg.num_jobs == 1 and _exists(cfg.out) else []
    if cfg.num_jobs > 1:
        occupied += [t for t in targets.values() if _exists(t)]
        occupied += [_join(cfg.out, s, INDEX_FILENAME) for s in SPLITS
                     if _file_exists(_join(cfg.out, s, INDEX_FILENAME))]
    if occupied and cfg.if_exists == "error":
        raise ShardError(f"output already exists: {', '.join(occupied)}; pass --if-exists overwrite "
                         "to replace it (or choose another --out)")
    return occupied


def _remove_replaced(cfg: ShardConfig, replaced: list[str], targets: dict[str, str],
                     run_parts: str) -> None:
    """After a successful run, remove what it replaced: a merged index of earlier jobs (and its
    metadata), and on S3 every object of the old output that the new one did not overwrite (local
    output was already swapped by renames in _publish_local)."""
    new_prefixes = [split_s3_url(t)[1] for t in targets.values()] if is_remote(cfg.out) else []
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
            _remote_delete(location, keep=is_new)
        log.warning("replaced existing output %s (--if-exists overwrite)", location)


def _warn_stale_jobs(cfg: ShardConfig) -> None:
    """Job folders numbered past --num-jobs were left by an earlier run with more jobs; `merge`
    refuses them, so say so now, while the user is looking."""
    for split in SPLITS:
        split_root = _join(cfg.out, split)
        stale = [j for j in _list_job_dirs(split_root)
                 if (n := _job_number(j)) is None or n >= cfg.num_jobs]
        if stale:
            log.warning("%s holds job folders beyond --num-jobs %d (from an earlier run?): %s; "
                        "`merge` refuses them: delete them first", split_root, cfg.num_jobs,
                        ", ".join(stale[:10]))


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


def _merge_parts(split_local: str, split_remote: str | None, part_names: list[str]) -> int:
    """Merge the parts' index.json (local, or uploaded to `split_remote`) into the split's local
    index.json, uploaded later by _publish_remote; returns the number of shards."""
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


# ---------------------------------------------------------------------------------------------
# The programmatic entry point


def _validate(cfg: ShardConfig) -> None:
    if cfg.max_seq_len < 8:
        raise ShardError(f"--max-seq-len must be >= 8, got {cfg.max_seq_len}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ShardError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.workers < 1:
        raise ShardError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.pack_buffer_docs < 1:
        raise ShardError(f"--pack-buffer-docs must be >= 1, got {cfg.pack_buffer_docs}")
    if cfg.num_jobs < 1 or not 0 <= cfg.job_index < cfg.num_jobs:
        raise ShardError(f"--job-index must be in [0, --num-jobs={cfg.num_jobs}), got {cfg.job_index}")
    if cfg.if_exists not in IF_EXISTS_CHOICES:
        raise ShardError(f"--if-exists must be one of {IF_EXISTS_CHOICES}, got {cfg.if_exists!r}")
    if is_remote(cfg.out) and not cfg.out.startswith("s3://"):
        raise ShardError(f"--out {cfg.out}: only local folders and s3:// are supported")


def shard(cfg: ShardConfig) -> ShardSummary:
    """Shard `cfg.inputs` into `cfg.out`/{train,val}. Raises ShardError on user errors.

    Output replaced under --if-exists overwrite is removed only once the new output is complete:
    locally by renaming a staging folder into place; on S3 the new shards go under part folders
    of their own run, the index.json files are uploaded last and the old objects deleted after.
    A run that fails before that (bad input in strict mode, a crash) keeps the old output whole;
    one whose final index uploads fail halfway may leave splits of both runs (run it again)."""
    start = time.perf_counter()
    _validate(cfg)
    try:
        tok = TextTokenizer.load(cfg.tokenizer)
    except Exception as exc:  # any unreadable tokenizer is a user error, reported without a trace
        raise ShardError(f"cannot load tokenizer {cfg.tokenizer}: {exc}") from exc
    try:
        files = files_for_job(expand_inputs(cfg.inputs, cfg.input_format), cfg.num_jobs,
                              cfg.job_index)
    except ValueError as exc:
        raise ShardError(str(exc)) from exc
    if not files:
        log.warning("job %d of %d has no input files: writing empty splits", cfg.job_index,
                    cfg.num_jobs)
    targets = _split_dataset_dirs(cfg)
    replaced = _existing_output(cfg, targets)

    remote = is_remote(cfg.out)
    out_path = Path(cfg.out)
    if remote:
        staging = Path(tempfile.mkdtemp(prefix="modernbert-shard-"))
    elif cfg.num_jobs == 1:  # a sibling, renamed onto OUT when complete
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staging = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    else:
        staging = out_path / f".job-{cfg.job_index:05d}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True, exist_ok=remote)  # mkdtemp made the remote one
    staged = {split: str(staging / split) for split in SPLITS}

    shares = files_for_workers(files, cfg.workers)
    # On S3 the parts are written in place while the old output stays readable: names of this
    # run's own keep them apart from the old objects, deleted once the new index is up.
    run_parts = f"part-{uuid.uuid4().hex[:8]}-" if remote else "part-"
    part_names = [f"{run_parts}{w:05d}" for w in range(len(shares))]
    tasks = [
        _WorkerTask(cfg=cfg, files=share, part_dirs={
            split: (str(Path(staged[split], part)),
                    f"{targets[split]}/{part}" if remote else None) for split in SPLITS})
        for share, part in zip(shares, part_names)
    ]
    published = False  # from here on, failing leaves the new output (partly) in place
    try:
        results = _run_workers(tasks, cfg.progress)
        errors = [r.error for r in results if r.error]
        if errors:
            raise ShardError(errors[0])
        splits = {split: SplitSummary(location=targets[split]) for split in SPLITS}
        for split in SPLITS:
            meta = DatasetMeta(max_seq_len=cfg.max_seq_len, vocab_size=tok.padded_vocab_size,
                               tokenizer_vocab_size=tok.tokenizer_vocab_size,
                               special_ids=asdict(tok.special), tokenizer_sha256=tok.sha256,
                               dtype=token_dtype_for(tok.padded_vocab_size), split=split)
            write_meta(staged[split], meta)
            if cfg.num_jobs > 1:
                Path(staged[split], JOB_FILENAME).write_text(json.dumps(
                    {"num_jobs": cfg.num_jobs, "job_index": cfg.job_index}) + "\n")
            s = splits[split]
            s.shards = _merge_parts(staged[split], targets[split] if remote else None, part_names)
            s.documents = sum(r.documents[split] for r in results)
            s.sequences = sum(r.sequences[split] for r in results)
            s.sequence_tokens = sum(r.sequence_tokens[split] for r in results)
        published = True
        if remote:
            _publish_remote(staged, targets)
        else:
            _publish_local(cfg, staging, targets)
        _remove_replaced(cfg, replaced, targets, run_parts)
        if cfg.num_jobs > 1:
            _warn_stale_jobs(cfg)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if remote and not published:  # remove this run's uploads; the old output is untouched
            for target in targets.values():
                for part in part_names:
                    try:
                        _remote_delete(f"{target}/{part}")
                    except Exception:  # cleanup must not mask the original error
                        log.exception("could not clean up %s/%s", target, part)

    skips = SkipReport()
    for r in results:
        skips.merge(r.skips)
    return ShardSummary(
        out=cfg.out, max_seq_len=cfg.max_seq_len, files=len(files), workers=len(shares),
        documents=sum(s.documents for s in splits.values()),
        content_tokens=sum(r.content_tokens for r in results),
        bytes_in=sum(r.bytes_in for r in results),
        sequences=sum(s.sequences for s in splits.values()),
        sequence_tokens=sum(s.sequence_tokens for s in splits.values()),
        shards=sum(s.shards for s in splits.values()),
        elapsed_s=time.perf_counter() - start, splits=splits, skips=skips)


def _publish_remote(staged: dict[str, str], targets: dict[str, str]) -> None:
    """Upload each split's small files next to its (already uploaded) parts: metadata first, the
    index.json files last, so a reader never sees a new index over missing shards or metadata."""
    client = s3_client()
    for group in ((JOB_FILENAME, META_FILENAME), (INDEX_FILENAME,)):
        for split, target in targets.items():
            bucket, prefix = split_s3_url(target)
            for name in group:
                local = Path(staged[split], name)
                if local.is_file():
                    client.upload_file(str(local), bucket, f"{prefix}/{name}")


def _publish_local(cfg: ShardConfig, staging: Path, targets: dict[str, str]) -> None:
    """Move the complete staged output into place with renames, so OUT never holds a partial
    dataset that looks complete."""
    if cfg.num_jobs == 1:
        _replace_dir(staging, Path(cfg.out))
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


@dataclass
class MergeSummary:
    out: str
    jobs: dict[str, list[str]]  # split -> job folders merged
    shards: dict[str, int]
    samples: dict[str, int]

    def summary_lines(self) -> list[str]:
        return [f"  {split}: {len(self.jobs[split])} jobs, {self.shards[split]} shards, "
                f"{self.samples[split]:,} sequences -> {_join(self.out, split, INDEX_FILENAME)}"
                for split in self.jobs]


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
    infos = {j: info for j in jobs if (info := _read_job_info(_join(split_root, j))) is not None}
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


def merge_jobs(out: str, expect_jobs: int | None = None) -> MergeSummary:
    """Merge OUT/<split>/job-*/index.json into OUT/<split>/index.json (and its metadata)."""
    from streaming.base.util import merge_index

    summary = MergeSummary(out=out, jobs={}, shards={}, samples={})
    for split in SPLITS:
        split_root = _join(out, split)
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
        incomplete = [j for j in jobs if not _file_exists(_join(split_root, j, INDEX_FILENAME))]
        if incomplete:
            raise ShardError(f"{split_root}: jobs without {INDEX_FILENAME} (unfinished?): "
                             f"{', '.join(incomplete)}")
        metas = {j: read_meta(_join(split_root, j)) for j in jobs}
        first = metas[jobs[0]]
        for j, meta in metas.items():
            if meta != first:
                raise ShardError(f"{_join(split_root, j)}: {META_FILENAME} differs from "
                                 f"{jobs[0]}'s (another tokenizer or max_seq_len?): {meta} vs {first}")
        merged_index = _join(split_root, INDEX_FILENAME)
        with tempfile.TemporaryDirectory(prefix="modernbert-merge-") as tmp, _quiet_merge_index():
            if is_remote(out):
                if _file_exists(merged_index):
                    _remote_delete_key(merged_index)
                write_meta(split_root, first)
                merge_index([_join(split_root, j, INDEX_FILENAME) for j in jobs], (tmp, split_root),
                            keep_local=True)
                index_path = Path(tmp, INDEX_FILENAME)
            else:
                Path(merged_index).unlink(missing_ok=True)  # merge_index will not replace it
                write_meta(split_root, first)
                merge_index([_join(split_root, j, INDEX_FILENAME) for j in jobs], split_root,
                            keep_local=True)
                index_path = Path(merged_index)
            shards = json.loads(index_path.read_text())["shards"]
        summary.jobs[split] = jobs
        summary.shards[split] = len(shards)
        summary.samples[split] = sum(s["samples"] for s in shards)
    return summary


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_size(text: str) -> int:
    from streaming.base.util import bytes_to_int

    try:
        return int(bytes_to_int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 67108864, 64mb)") from exc


def _shard_parser() -> argparse.ArgumentParser:
    d = ShardConfig(inputs=[], tokenizer="", out="")
    p = argparse.ArgumentParser(
        prog="modernbert-shard",
        description="Tokenize, split and best-fit pack text into MDS shards (OUT/train, OUT/val). "
                    "`modernbert-shard merge OUT` merges the indexes of --num-jobs runs.")
    # Inputs positionally or with --input (as `modernbert-tokenizer train` takes them), not both.
    inputs_help = ("files, globs or directories: .txt / .jsonl / .parquet (+ .gz / .zst), "
                   "HF save_to_disk folders")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help=inputs_help)
    p.add_argument("--input", dest="input_option", nargs="+", metavar="PATH",
                   help=f"the same as INPUT ({inputs_help})")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or a HF tokenizer folder")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of documents (by text hash) in OUT/val")
    p.add_argument("--format", dest="input_format", default=d.input_format,
                   choices=("auto", "text", "jsonl", "parquet", "hf"))
    p.add_argument("--text-field", default=d.text_field, help="JSONL key / Parquet or HF column")
    p.add_argument("--text-unit", default=d.text_unit, choices=("line", "paragraph", "file"),
                   help="document unit of plain text files")
    p.add_argument("--workers", type=int, default=d.workers, help="parallel processes (by file)")
    p.add_argument("--num-jobs", type=int, default=d.num_jobs,
                   help="independent machines sharing the inputs; then run `merge`")
    p.add_argument("--job-index", type=int, default=d.job_index)
    p.add_argument("--if-exists", default=d.if_exists, choices=IF_EXISTS_CHOICES,
                   help="overwrite: replace existing output once the new output is complete (a "
                        "failed run keeps the old one; on S3, a failure while uploading the final "
                        "index files can leave splits of both runs: run again)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record")
    p.add_argument("--shard-size-limit", dest="shard_size_limit_bytes", type=_parse_size,
                   default=d.shard_size_limit_bytes, metavar="SIZE",
                   help="uncompressed bytes per shard (e.g. 64mb)")
    p.add_argument("--pack-buffer-docs", type=int, default=d.pack_buffer_docs)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--summary-json", type=Path, help="also write the summary here")
    return p


def _parse_shard_args(argv: Sequence[str]) -> dict:
    """ShardConfig fields (and summary_json) from the command line; exits 2 unless the inputs come
    either positionally or after --input."""
    parser = _shard_parser()
    args = vars(parser.parse_args(argv))
    option = args.pop("input_option")
    if args["inputs"] and option:
        parser.error("give inputs either positionally or after --input, not both")
    if not args["inputs"] and not option:
        parser.error("no inputs: pass INPUT ... or --input PATH ...")
    args["inputs"] = args["inputs"] or option
    return args


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modernbert-shard merge",
                                description="Merge OUT/<split>/job-*/ indexes into OUT/<split>/index.json")
    p.add_argument("out", help="the --out of the jobs (local or s3://)")
    p.add_argument("--expect-jobs", type=int, help="fail unless job-00000 .. job-(N-1) all exist")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["merge"]:
            args = _merge_parser().parse_args(argv[1:])
            merged = merge_jobs(args.out, args.expect_jobs)
            print(f"merged {args.out}")
            print("\n".join(merged.summary_lines()))
            return 0
        args = _parse_shard_args(argv)
        summary_json = args.pop("summary_json")
        summary = shard(ShardConfig(**args))
    except (ShardError, BadInputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary.summary_lines()))
    if summary_json is not None:
        record = {**{k: v for k, v in asdict(summary).items() if k not in ("skips", "splits")},
                  "packing_efficiency": summary.packing_efficiency,
                  "tokens_per_s": summary.tokens_per_s,
                  "splits": {k: asdict(v) for k, v in summary.splits.items()},
                  "skipped": dict(summary.skips.counts)}
        summary_json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
