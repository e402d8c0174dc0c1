"""The training-time reader: pre-packed MDS sequences -> fixed-shape varlen chunks -> training steps.

Streaming (one or several streams) yields packed sequences; `collate_chunk` joins `microbatch_seqs`
of them into one chunk of `microbatch_seqs * max_seq_len` tokens; `StepBatcher` stacks `k` chunks
per step (batch-size warmup) and resumes exactly through Streaming's own sample-count resumption.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState  # private in Streaming 0.13: see prepare_shard
from streaming.base.world import World
from torch.utils.data import DataLoader

from modernbert_train.data.chunk_layout import doc_slots, pad_tail_lengths, prediction_slots
from modernbert_train.data.masking import IGNORE_INDEX, MaskingConfig, MLMMasker
from modernbert_train.data.shm_registration import streaming_registration_lock
from modernbert_train.data.schema import (
    DOC_IDS_COLUMN,
    DOC_LENS_COLUMN,
    INPUT_IDS_COLUMN,
    DatasetMeta,
    read_meta,
)

log = logging.getLogger(__name__)

MIN_DOC_TOKENS = 2  # every document piece is at least [CLS][SEP]


@dataclass(frozen=True)
class StreamConfig:
    local: str
    remote: str | None = None
    proportion: float | None = None  # relative weight when mixing streams; None = natural size


@dataclass(frozen=True)
class LoaderConfig:
    streams: tuple[StreamConfig, ...]
    split: str | None
    max_seq_len: int
    microbatch_seqs: int  # packed sequences per chunk (one chunk = one microbatch)
    mask_rate: float
    seed: int  # shuffle seed and masking seed
    shuffle: bool = True
    num_workers: int = 2
    prefetch_factor: int = 2
    predownload: int | None = None
    shuffle_algo: str = "py1e"
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None
    download_timeout_s: float = 60
    persistent_workers: bool = False
    # Pinned chunks (CUDA only): the DataLoader's pin thread unpickles and pins them off the main
    # thread, and Composer's non_blocking host-to-device copies become truly asynchronous.
    pin_memory: bool = False


class SpecialTokenIds(Protocol):
    """What the loader needs from `tokenizer.SpecialIds`."""

    cls: int
    sep: int
    mask: int
    pad: int


class ShardReadError(RuntimeError):
    """A shard could not be downloaded, verified or decompressed; the message names it."""


# Checked when a shard is downloaded or decompressed; `modernbert-shard` writes it into every index
# (shard.MDS_HASHES). A shard already decompressed in the local cache is not checked again.
SHARD_HASH = "xxh64"


class PackedSequenceDataset(StreamingDataset):
    """StreamingDataset of packed sequences; each sample also carries its global `sample_idx`
    and the `epoch` being iterated (the masking key), and its token ids are checked against the vocab.

    A shard that fails to download, verify or decompress is an error naming it, raised by the reader
    of its first sample. Streaming 0.13 only logs such a failure from its download-ahead thread, ends
    the epoch early (samples silently skipped) and leaves the shard marked as being prepared (a later
    reader of it waits forever).

    Its shared memory is registered under the node's registration lock (data/shm_registration.py):
    two jobs starting on one node at once could otherwise leave its ranks disagreeing on the prefix.
    """

    def __init__(self, *, vocab_size: int, **kwargs: Any) -> None:
        try:
            with streaming_registration_lock():
                super().__init__(**kwargs)
        except RuntimeError as err:
            if "no samples" in str(err):
                raise ValueError(f"empty stream, nothing to train on: {err}") from err
            raise
        self.vocab_size = int(vocab_size)
        self._iter_epoch: int | None = None  # set in each worker when its iteration starts
        self._unreadable_shards: set[int] = set()  # failed in this process's download-ahead threads
        self._check_shard_hashes()
        self.drop_storage_clients()

    def _check_shard_hashes(self) -> None:
        """Verify shards against SHARD_HASH where the stream's index records it for every file."""
        for stream_id, stream in enumerate(self.streams):
            infos = [info for shard_id in np.flatnonzero(self.stream_per_shard == stream_id)
                     for pair in self.shards[shard_id].file_pairs for info in pair if info]
            if all(SHARD_HASH in info.hashes for info in infos):
                stream.validate_hash = SHARD_HASH  # Stream's own (public) setting, read per shard
            else:
                log.warning("stream remote=%r local=%r: its index has no %s hashes, so damaged shards "
                            "are caught only if they fail to decompress or decode (re-shard with "
                            "modernbert-shard to get them)", stream.remote, stream.local, SHARD_HASH)

    def drop_storage_clients(self) -> None:
        """Forget the object-store clients (and their keep-alive sockets) of every stream.

        The index download leaves an S3 client with an open connection in this process; forked
        DataLoader workers would inherit that one socket and read each other's responses (seen as
        one shard's bytes saved under another shard's name, and as 30 s read stalls). Each process
        then creates its own client on its first download.
        """
        for stream in self.streams:
            stream._downloader.clean_up()  # Streaming's own per-download reset hook

    def _stream_of(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        return f"stream remote={stream.remote!r} local={stream.local!r}"

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        # Streaming 0.13's download-ahead threads call with blocking=False, readers (get_item) with
        # blocking=True. A shard those threads failed on is left to its readers from then on:
        # otherwise they would download it again for each of its samples.
        if not blocking and shard_id in self._unreadable_shards:
            return
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            shard = self.shards[shard_id]
            stream = self.streams[self.stream_per_shard[shard_id]]
            if stream.remote not in (None, stream.local):
                # A cached copy that failed is dropped, so the next attempt downloads it again
                # rather than trusting it (raw) or failing on the same bytes (compressed).
                shard.evict()
            # Streaming leaves the shard PREPARING, where its readers in every worker wait forever.
            # LOCAL, not REMOTE: Streaming's ready threads wait for LOCAL; each reader then finds no
            # raw file and prepares the shard again itself (Streaming's path for an evicted shard).
            # Only the thread that set PREPARING changes it, so no lock is needed.
            self._shard_states[shard_id] = _ShardState.LOCAL
            files = [info.basename for pair in shard.file_pairs for info in pair if info]
            error = ShardReadError(f"shard {' / '.join(files)} of {self._stream_of(shard_id)} could not "
                                   f"be read: {type(err).__name__}: {err}")
            if blocking:
                raise error from err
            # Raising in a download-ahead thread would only end the epoch early (and when both of
            # them fail, Streaming waits forever for them to exit): the reader raises, in order.
            self._unreadable_shards.add(shard_id)
            log.warning("%s; its reader will try once more", error)

    def _resume_incr_epoch(self) -> tuple[int, int]:
        # The one place where a worker learns which epoch it iterates; recorded here because the
        # shared next_epoch counter is only updated by the local leader, after a barrier (racy).
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self._iter_epoch = epoch
        return epoch, sample_in_epoch

    def _describe_sample(self, idx: int) -> str:
        shard_id, shard_sample_id = self.spanner[idx]
        shard = self.shards[shard_id]
        shard_name = shard.file_pairs[0][0].basename if shard.file_pairs else f"#{shard_id}"
        return f"sample {idx} (row {shard_sample_id} of shard {shard_name}, {self._stream_of(shard_id)})"

    def get_item(self, idx: int, retry: int = 7) -> dict[str, Any]:
        sample = super().get_item(idx, retry)
        input_ids = sample[INPUT_IDS_COLUMN]
        if input_ids.size and int(input_ids.max()) >= self.vocab_size:
            raise ValueError(
                f"token id {int(input_ids.max())} >= vocab_size {self.vocab_size} in "
                f"{self._describe_sample(idx)}: shards and tokenizer do not match"
            )
        return {**sample, "sample_idx": idx, "epoch": self._iter_epoch}


def _fresh_worker_connections(worker_id: int) -> None:
    """worker_init_fn: never reuse a connection inherited from the parent (see drop_storage_clients)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, PackedSequenceDataset):
        info.dataset.drop_storage_clients()


def collate_chunk(
    samples: Sequence[dict[str, Any]],
    *,
    max_seq_len: int,
    microbatch_seqs: int,
    pad_id: int,
    masker: MLMMasker,
    epoch: int,
) -> dict[str, Any]:
    """Join up to `microbatch_seqs` packed sequences into one varlen chunk (DESIGN.md layout).

    Each sequence is masked on its own with key (epoch, sample_idx), so the mask is the same in
    any worker, process or resumed run. `cu_seqlens` has `chunk_layout.doc_slots(D) + 1` entries
    (unused slots repeat the end: empty documents); `prediction_slots` bounds the masked tokens.
    Extra field `doc_ids` (int64, one per `cu_seqlens` slot) gives the source document of each slot
    (pad tail and empty slots: -1). The pad tail is split into documents of at most max_seq_len
    tokens (chunk_layout.pad_tail_lengths), so `max_seqlen` bounds every document.
    """
    if not 1 <= len(samples) <= microbatch_seqs:
        raise ValueError(f"a chunk takes 1..{microbatch_seqs} sequences, got {len(samples)}")
    chunk_tokens = microbatch_seqs * max_seq_len

    input_ids = np.full(chunk_tokens, pad_id, dtype=np.int64)
    labels = np.full(chunk_tokens, IGNORE_INDEX, dtype=np.int64)
    sample_idx = np.empty(len(samples), dtype=np.int64)
    doc_lens_parts, doc_ids_parts = [], []
    offset = 0
    for i, sample in enumerate(samples):
        ids = sample[INPUT_IDS_COLUMN]
        lens = sample[DOC_LENS_COLUMN]
        sample_idx[i] = sample["sample_idx"]
        n = ids.shape[0]
        if n > max_seq_len or int(lens.sum()) != n or (lens.size and int(lens.min()) < MIN_DOC_TOKENS):
            raise ValueError(
                f"malformed packed sequence (sample_idx {sample_idx[i]}): {n} tokens "
                f"(max_seq_len {max_seq_len}), doc_lens sum {int(lens.sum())}, "
                f"shortest document {int(lens.min()) if lens.size else None} (min {MIN_DOC_TOKENS})"
            )
        input_ids[offset:offset + n], labels[offset:offset + n] = masker(ids, (epoch, int(sample_idx[i])))
        doc_lens_parts.append(lens)
        doc_ids_parts.append(sample[DOC_IDS_COLUMN])
        offset += n

    doc_lens = np.concatenate(doc_lens_parts).astype(np.int64)
    real_docs = doc_lens.size
    # The pad tail: documents of their own (no real token attends to padding), max_seq_len at most.
    doc_lens = np.append(doc_lens, pad_tail_lengths(chunk_tokens - offset, max_seq_len))
    slots = doc_slots(doc_lens.size)
    doc_ids = np.full(slots, -1, dtype=np.int64)
    doc_ids[:real_docs] = np.concatenate(doc_ids_parts)
    starts = np.zeros(doc_lens.size + 1, dtype=np.int64)
    np.cumsum(doc_lens, out=starts[1:])
    cu_seqlens = np.full(slots + 1, chunk_tokens, dtype=np.int32)  # repeated last = empty docs
    cu_seqlens[:starts.size] = starts
    position_ids = np.arange(chunk_tokens, dtype=np.int64) - np.repeat(starts[:-1], doc_lens)

    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "cu_seqlens": torch.from_numpy(cu_seqlens),
        "position_ids": torch.from_numpy(position_ids),
        "max_seqlen": max_seq_len,
        "prediction_slots": prediction_slots(chunk_tokens=chunk_tokens, num_sequences=microbatch_seqs,
                                             mask_rate=masker.cfg.mask_rate),
        "num_tokens": torch.tensor(offset, dtype=torch.int64),
        "sample_idx": torch.from_numpy(sample_idx),
        "doc_ids": torch.from_numpy(doc_ids),
    }


@dataclass(frozen=True)
class ChunkCollator:
    """DataLoader collate_fn. The masking epoch is `mask_epoch` when given, else the samples' own
    (the worker's Streaming epoch: training sees a new mask of a sequence each epoch).

    Evaluation fixes it: Composer iterates the eval loader anew at each evaluation, a new Streaming
    epoch each time (restarting from 0 after a resume), so masks that followed it would add mask
    noise to the eval-loss curve and make a resumed run's evals differ from an uninterrupted run's.
    """

    max_seq_len: int
    microbatch_seqs: int
    pad_id: int
    masker: MLMMasker
    mask_epoch: int | None = None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        epoch = samples[0]["epoch"] if self.mask_epoch is None else self.mask_epoch
        if epoch is None:
            raise RuntimeError("samples carry no epoch: iterate PackedSequenceDataset, not index it")
        return collate_chunk(samples, max_seq_len=self.max_seq_len, microbatch_seqs=self.microbatch_seqs,
                             pad_id=self.pad_id, masker=self.masker, epoch=epoch)


def _stream_root(stream: StreamConfig, split: str | None) -> str:
    root = stream.remote if stream.remote is not None else stream.local
    return f"{root.rstrip('/')}/{split}" if split else root


def check_stream_metas(cfg: LoaderConfig, *, special: SpecialTokenIds, vocab_size: int,
                       tokenizer_sha256: str | None = None,
                       tokenizer_path: str | os.PathLike[str] | None = None) -> list[DatasetMeta]:
    """Read each stream's `modernbert_meta.json` and reject data the run cannot train on.

    Shards written with another tokenizer than the run's (`tokenizer_sha256`, `TextTokenizer.sha256`:
    the hash the shard writer records) are only a warning: a re-serialised copy of the same
    tokenizer hashes differently, and vocab size and special ids, which matter to training, are
    checked as errors. The streams must still agree with each other.
    """
    metas = []
    for stream in cfg.streams:
        root = _stream_root(stream, cfg.split)
        meta = read_meta(root)
        problems = []
        if meta.max_seq_len > cfg.max_seq_len:
            problems.append(f"sequences up to {meta.max_seq_len} tokens > max_seq_len {cfg.max_seq_len}")
        elif meta.max_seq_len < cfg.max_seq_len:
            log.warning("stream %s was packed to %d tokens, the run uses max_seq_len %d: chunks carry "
                        "more padding", root, meta.max_seq_len, cfg.max_seq_len)
        if meta.tokenizer_vocab_size != vocab_size:
            problems.append(f"tokenizer_vocab_size {meta.tokenizer_vocab_size} != {vocab_size}")
        for name in ("cls", "sep", "mask", "pad"):
            if meta.special_ids.get(name) != getattr(special, name):
                problems.append(f"special id {name} {meta.special_ids.get(name)} != {getattr(special, name)}")
        if metas and meta.tokenizer_sha256 != metas[0].tokenizer_sha256:
            problems.append(f"tokenizer {meta.tokenizer_sha256[:12]} differs from the first stream's "
                            f"{metas[0].tokenizer_sha256[:12]}")
        if problems:
            raise ValueError(f"stream {root} does not match the run: " + "; ".join(problems))
        if tokenizer_sha256 is not None and meta.tokenizer_sha256 != tokenizer_sha256:
            log.warning("stream %s was tokenized with tokenizer %s, the run's tokenizer %s is %s: same "
                        "vocab size and special ids, but check that the shards come from this tokenizer "
                        "(the model is exported with it)", root, meta.tokenizer_sha256[:12],
                        tokenizer_path, tokenizer_sha256[:12])
        metas.append(meta)
    return metas


def build_packed_dataset(cfg: LoaderConfig, *, vocab_size: int) -> PackedSequenceDataset:
    if not cfg.streams:
        raise ValueError("LoaderConfig.streams is empty: give at least one stream")
    streams = [  # hash checks: set per stream once its index is read (_check_shard_hashes)
        Stream(local=s.local, remote=s.remote, split=cfg.split, proportion=s.proportion,
               download_timeout=cfg.download_timeout_s)
        for s in cfg.streams
    ]
    return PackedSequenceDataset(
        vocab_size=vocab_size,
        streams=streams,
        # Streaming partitions work per (rank, worker, batch): the same batch_size as the
        # DataLoader keeps that partition, and therefore resumption, deterministic.
        batch_size=cfg.microbatch_seqs,
        shuffle=cfg.shuffle,
        shuffle_seed=cfg.seed,
        shuffle_algo=cfg.shuffle_algo,
        shuffle_block_size=cfg.shuffle_block_size,
        num_canonical_nodes=cfg.num_canonical_nodes,
        predownload=cfg.predownload,
        download_timeout=cfg.download_timeout_s,
    )


# DataLoader workers hand each tensor's storage to the main process through a Unix socket that
# multiprocessing creates as TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX; a socket path has at most
# 107 bytes on Linux (103 on macOS), and a longer one stalls the loader with the OSError buried
# in a worker's traceback.
_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107
_WORKER_SOCKET_SUFFIX = len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def check_worker_tmpdir(num_workers: int) -> None:
    """Refuse a TMPDIR too long for the workers' sockets, naming it and the fix."""
    tmp = tempfile.gettempdir()
    longest = _SOCKET_PATH_MAX - _WORKER_SOCKET_SUFFIX
    if num_workers > 0 and len(os.fsencode(tmp)) > longest:
        raise ValueError(
            f"TMPDIR {tmp} is {len(os.fsencode(tmp))} bytes long: DataLoader workers "
            f"(data.num_workers={num_workers}) open Unix sockets under it and a socket path is "
            f"limited to {_SOCKET_PATH_MAX} bytes; set TMPDIR to a folder of at most {longest} "
            f"bytes (or data.num_workers=0)")


def build_chunk_dataloader(
    cfg: LoaderConfig,
    *,
    special: SpecialTokenIds,
    special_ids: Sequence[int],
    vocab_size: int,
    check_meta: bool = True,
    tokenizer_sha256: str | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    mask_epoch: int | None = None,
    drop_last: bool = True,
) -> DataLoader:
    """A DataLoader whose every item is one chunk (see `collate_chunk`) of `cfg.microbatch_seqs` sequences.

    `vocab_size` is the tokenizer's real size (not the padded embedding size): ids at or above it
    are rejected, and random replacement ids are drawn below it. With `check_meta`, each stream's
    metadata must match the run (`check_stream_metas`, given the run tokenizer's hash and path).

    Training keeps the defaults: masks follow the Streaming epoch, and `drop_last` keeps every chunk
    full (StepBatcher's exact sample counts). Evaluation fixes `mask_epoch` (see ChunkCollator) and
    sets `drop_last=False`: the last chunk of each rank, 1..microbatch_seqs sequences, is evaluated
    too (a shorter chunk is just more pad tail). Streaming gives every rank equally many sequences
    (it repeats a few to pad the ranks' partitions), so every rank still runs equally many eval
    batches, and up to ranks - 1 sequences count twice.
    """
    check_worker_tmpdir(cfg.num_workers)
    if check_meta:
        check_stream_metas(cfg, special=special, vocab_size=vocab_size, tokenizer_sha256=tokenizer_sha256,
                           tokenizer_path=tokenizer_path)
    dataset = build_packed_dataset(cfg, vocab_size=vocab_size)
    masker = MLMMasker(MaskingConfig(mask_rate=cfg.mask_rate), mask_id=special.mask,
                       special_ids=special_ids, vocab_size=vocab_size, pad_id=special.pad, seed=cfg.seed)
    collate = ChunkCollator(max_seq_len=cfg.max_seq_len, microbatch_seqs=cfg.microbatch_seqs,
                            pad_id=special.pad, masker=masker, mask_epoch=mask_epoch)
    workers = cfg.num_workers > 0
    return DataLoader(
        dataset,
        batch_size=cfg.microbatch_seqs,
        collate_fn=collate,
        drop_last=drop_last,
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        persistent_workers=cfg.persistent_workers and workers,
        pin_memory=cfg.pin_memory,
        worker_init_fn=_fresh_worker_connections,
        # A hung download or worker becomes an error instead of a silent stall. Twice Streaming's own
        # per-shard timeout, so Streaming's more specific error (naming the shard) wins when it fires.
        timeout=2 * cfg.download_timeout_s if workers else 0,
    )


def num_samples_in_batch(batch: dict[str, Any]) -> int:
    """Packed sequences in a step batch (k, ...) or in one chunk."""
    return int(batch["sample_idx"].numel())


def num_tokens_in_batch(batch: dict[str, Any]) -> int:
    """Real (non-pad) tokens in a step batch or chunk."""
    return int(batch["num_tokens"].sum())


def split_batch(batch: dict[str, Any], microbatch_size: int) -> list[dict[str, Any]]:
    """Split a step batch (k stacked chunks) into k one-chunk microbatches with the chunk layout.

    The chunk is the only microbatch shape of the packed layout, so `microbatch_size` (Composer's
    device_train_microbatch_size, counted in samples like `num_samples_in_batch`) must equal the
    sequences per chunk.
    """
    if batch["input_ids"].ndim == 1:
        return [batch]
    samples_per_chunk = batch["sample_idx"].shape[-1]
    if microbatch_size != samples_per_chunk:
        raise ValueError(f"microbatch_size must be the {samples_per_chunk} sequences of one chunk "
                         f"(set device_train_microbatch_size to microbatch_seqs), got {microbatch_size}")
    k = batch["input_ids"].shape[0]
    return [{key: (value if isinstance(value, int) else value[i]) for key, value in batch.items()}
            for i in range(k)]


# Per-chunk Python ints that are the same for every chunk of a loader.
_CHUNK_CONSTANTS = ("max_seqlen", "prediction_slots")
# Per-document fields whose length varies from chunk to chunk, and the value that pads them.
_DOC_SLOT_FIELDS = {"doc_ids": -1}


def stack_chunks(chunks: list[dict[str, Any]], *, pin_memory: bool = False) -> dict[str, Any]:
    """Stack chunks into one step batch (k, ...). `cu_seqlens` and `doc_ids` are padded to the
    longest among them with empty documents (repeated end offset, doc id -1).

    One chunk becomes a view (no copy, pinned stays pinned); with `pin_memory` (CUDA), several
    are stacked straight into pinned memory.
    """
    batch: dict[str, Any] = {key: chunks[0][key] for key in _CHUNK_CONSTANTS}
    if len(chunks) == 1:
        batch.update({key: value.unsqueeze(0) for key, value in chunks[0].items() if key not in batch})
        return batch
    slots = max(c["cu_seqlens"].numel() for c in chunks)
    for key in chunks[0]:
        if key in _CHUNK_CONSTANTS:
            continue
        values = [c[key] for c in chunks]
        if key == "cu_seqlens":
            values = [torch.cat([v, v[-1:].expand(slots - v.numel())]) for v in values]
        elif key in _DOC_SLOT_FIELDS:
            values = [torch.cat([v, v.new_full((slots - 1 - v.numel(),), _DOC_SLOT_FIELDS[key])])
                      for v in values]
        out = torch.empty((len(values), *values[0].shape), dtype=values[0].dtype, pin_memory=pin_memory)
        batch[key] = torch.stack(values, out=out)
    return batch


@dataclass(frozen=True)
class StepBatcherState:
    epoch: int
    samples_in_epoch: int  # global (all ranks) samples consumed in `epoch`
    samples_seen: int  # global samples consumed since the start of training (batch warmup input)


class StepBatcher:
    """Iterates training steps forever; each step stacks k = chunks_per_step(samples_seen) chunks.

    Counters advance only for chunks the trainer actually received, so `state_dict` is exact with
    any number of workers and any prefetch: resumption hands Streaming the global sample count of
    the current epoch and Streaming drops exactly those samples on every rank.
    """

    def __init__(self, loader: DataLoader, *, chunks_per_step: Callable[[int], int],
                 world_size: int | None = None, stream_names: Sequence[str] = ()) -> None:
        if not isinstance(loader.dataset, PackedSequenceDataset) or loader.batch_size is None:
            raise TypeError("StepBatcher needs a DataLoader from build_chunk_dataloader")
        self.loader = loader
        self.dataset: PackedSequenceDataset = loader.dataset
        self.chunks_per_step = chunks_per_step
        self.microbatch_seqs = int(loader.batch_size)
        self.world_size = World.detect().num_ranks if world_size is None else world_size
        self.stream_names = list(stream_names) or [
            s.remote or s.local for s in self.dataset.streams
        ]
        self.state = StepBatcherState(epoch=0, samples_in_epoch=0, samples_seen=0)
        self._iterator: Iterator[dict[str, Any]] | None = None
        # The DataLoader pins only where an accelerator exists; so does stack_chunks.
        self.pin_memory = bool(loader.pin_memory) and torch.cuda.is_available()

    def __iter__(self) -> StepBatcher:
        return self

    def __next__(self) -> dict[str, Any]:
        k = int(self.chunks_per_step(self.state.samples_seen))
        if k < 1:
            raise ValueError(f"chunks_per_step({self.state.samples_seen}) = {k}, need >= 1")
        chunks = [self._next_chunk() for _ in range(k)]
        return stack_chunks(chunks, pin_memory=self.pin_memory)

    def _next_chunk(self) -> dict[str, Any]:
        fresh_epochs_without_data = 0
        while True:
            if self._iterator is None:
                # Streaming starts its next epoch (or resumes mid-epoch) on each new iter().
                self._iterator = iter(self.loader)
            try:
                chunk = next(self._iterator)
            except StopIteration:
                s = self.state
                if s.samples_in_epoch == 0:
                    fresh_epochs_without_data += 1
                    if fresh_epochs_without_data > 1:
                        raise RuntimeError(
                            f"streams {self.stream_names} yield no full chunk per rank: need at "
                            f"least {self.microbatch_seqs * self.world_size} sequences") from None
                self._iterator = None
                self.state = StepBatcherState(s.epoch + 1, 0, s.samples_seen)
                continue
            except (ValueError, ShardReadError):  # bad data: the message already names the shard
                raise
            except Exception as err:  # DataLoader timeout, dead worker, failed or refused download
                raise RuntimeError(
                    f"reading streams {self.stream_names} failed or stalled (epoch "
                    f"{self.state.epoch}, sample {self.state.samples_in_epoch}): {err}") from err
            n = self.microbatch_seqs * self.world_size
            s = self.state
            self.state = StepBatcherState(s.epoch, s.samples_in_epoch + n, s.samples_seen + n)
            return chunk

    def state_dict(self) -> dict[str, Any]:
        s = self.state
        dataset_state = self.dataset.state_dict(num_samples=s.samples_in_epoch, from_beginning=True)
        # Our epoch counter is authoritative: between the end of an epoch and the next iter(),
        # Streaming's own counter still points at the finished epoch.
        dataset_state.update(epoch=s.epoch, sample_in_epoch=s.samples_in_epoch)
        return {"dataset": dataset_state, "epoch": s.epoch, "samples_in_epoch": s.samples_in_epoch,
                "samples_seen": s.samples_seen, "world_size": self.world_size,
                "microbatch_seqs": self.microbatch_seqs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next step continues right after the last step consumed before `state_dict()`."""
        self.state = StepBatcherState(int(state["epoch"]), int(state["samples_in_epoch"]),
                                      int(state["samples_seen"]))
        self._iterator = None  # drop any live iterator (and its prefetched chunks)
        # Streaming ignores a resume state older than its own epoch counter; rewind the counter so
        # reloading into an already used dataset behaves like a fresh process.
        self.dataset.next_epoch = self.state.epoch
        self.dataset.load_state_dict(state["dataset"])
        if state.get("microbatch_seqs") not in (None, self.microbatch_seqs):
            log.warning("resuming with microbatch_seqs %d (checkpoint had %s); the sample count stays "
                        "exact, masking keys are per sequence", self.microbatch_seqs, state["microbatch_seqs"])
