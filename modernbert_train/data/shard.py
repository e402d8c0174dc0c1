"""The sharding CLI (`modernbert-shard`): raw text -> tokenized, split, best-fit packed MDS shards in
OUT/train and OUT/val, local or s3://, in parallel workers and across independent jobs."""
from __future__ import annotations

import argparse
import concurrent.futures
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
from modernbert_train.data.schema import (DOC_IDS_COLUMN, DOC_LENS_COLUMN, INPUT_IDS_COLUMN,
                                          SPLITS, DatasetMeta, is_remote, mds_columns,
                                          token_dtype_for, write_meta)
from modernbert_train.data.shard_output import (JOB_FILENAME, REMOTE_INDEX_FILES, REMOTE_METADATA_FILES,
                                                ShardError, existing_output, join, merge_jobs,
                                                merge_parts, publish_local, publish_remote,
                                                remote_delete, remove_replaced, warn_stale_jobs)
from modernbert_train.data.sources import (DEFAULT_TEXT_UNIT, BadInputError, Document, InputFile,
                                           SkipReport, expand_inputs, read_documents)
from modernbert_train.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

MDS_COMPRESSION = "zstd"
MDS_HASHES = ["sha1", "xxh64"]  # both in streaming.base.hashing.get_hashes() of Streaming 0.13
IF_EXISTS_CHOICES = ("error", "overwrite")
_HASH_SPACE = float(1 << 64)


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


def _split_dataset_dirs(cfg: ShardConfig) -> dict[str, str]:
    """Where each split's finished dataset of this run lives (its index.json is written last)."""
    if cfg.num_jobs == 1:
        return {split: join(cfg.out, split) for split in SPLITS}
    return {split: join(cfg.out, split, f"job-{cfg.job_index:05d}") for split in SPLITS}


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
    replaced = existing_output(cfg.out, cfg.num_jobs, cfg.if_exists, targets)

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
            s.shards = merge_parts(staged[split], targets[split] if remote else None, part_names)
            s.documents = sum(r.documents[split] for r in results)
            s.sequences = sum(r.sequences[split] for r in results)
            s.sequence_tokens = sum(r.sequence_tokens[split] for r in results)
        if remote:
            publish_remote(staged, targets, REMOTE_METADATA_FILES)
            published = True  # the new index goes up next: from here this run's parts must stay
            publish_remote(staged, targets, REMOTE_INDEX_FILES)
        else:
            published = True
            publish_local(cfg.out, cfg.num_jobs, staging, targets)
        remove_replaced(cfg.out, replaced, targets, run_parts)
        if cfg.num_jobs > 1:
            warn_stale_jobs(cfg.out, cfg.num_jobs)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if remote and not published:  # remove this run's uploads; the old output is untouched
            for target in targets.values():
                for part in part_names:
                    try:
                        remote_delete(f"{target}/{part}")
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
