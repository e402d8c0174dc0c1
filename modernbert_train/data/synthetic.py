"""Synthetic pre-packed datasets for benchmarks: random-token documents with web-like lengths, packed
by the shard-time packer and written as `modernbert-shard` writes a split (same columns, hashes and
`modernbert_meta.json`), next to a word-level tokenizer whose ids and special tokens match."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from streaming import MDSWriter
from tokenizers import AddedToken, Tokenizer, models

from modernbert_train.data.packing import BestFitPacker, PackedSequence
from modernbert_train.data.schema import (DOC_IDS_COLUMN, DOC_LENS_COLUMN, INPUT_IDS_COLUMN, DatasetMeta,
                                          mds_columns, token_dtype_for, write_meta)
from modernbert_train.data.shard import MDS_COMPRESSION, MDS_HASHES
from modernbert_train.data.tokenizer import SPECIAL_TOKENS, TextTokenizer

# Document lengths (tokens, [CLS] and [SEP] included): lognormal, a web-text-like long tail.
DOC_LEN_MEDIAN_TOKENS = 250
DOC_LEN_LOG_SIGMA = 1.0  # ~16% of documents exceed 680 tokens, ~2% exceed 1850
MIN_DOC_TOKENS = 16
PACK_BUFFER_DOCS = 1000  # the shard CLI's default best-fit buffer
TOKENIZER_FILENAME = "tokenizer.json"


def document_lengths(rng: np.random.Generator, n: int, max_seq_len: int) -> np.ndarray:
    """`n` lognormal document lengths, clipped to [MIN_DOC_TOKENS, max_seq_len] (no splitting)."""
    raw = rng.lognormal(mean=math.log(DOC_LEN_MEDIAN_TOKENS), sigma=DOC_LEN_LOG_SIGMA, size=n)
    return np.clip(np.rint(raw), min(MIN_DOC_TOKENS, max_seq_len), max_seq_len).astype(np.int64)


def packed_sequences(rng: np.random.Generator, count: int, *, max_seq_len: int, vocab_size: int,
                     cls_id: int, sep_id: int, special_ids: tuple[int, ...]) -> list[PackedSequence]:
    """`count` packed sequences of `[CLS] random ordinary ids [SEP]` documents, through the packer.

    Sequences emitted before the packer's buffer first fills are dropped: they are the lucky exact
    fits, fuller than what the packer emits for the rest of a corpus.
    """
    ordinary = np.setdiff1d(np.arange(vocab_size), special_ids)
    packer = BestFitPacker(max_seq_len, PACK_BUFFER_DOCS)
    out: list[PackedSequence] = []
    doc_id = 0
    while len(out) < count:
        for n in document_lengths(rng, 256, max_seq_len):
            body = ordinary[rng.integers(0, ordinary.size, int(n) - 2)]
            ready = packer.add(np.concatenate([[cls_id], body, [sep_id]]), doc_id)
            doc_id += 1
            if doc_id > PACK_BUFFER_DOCS:
                out.extend(ready)
    return out[:count]


def tokenizer_sequences(tokenizer: TextTokenizer, count: int, *, max_seq_len: int,
                        seed: int) -> list[PackedSequence]:
    """`packed_sequences` over the ids of `tokenizer` (see `write_tokenizer`)."""
    return packed_sequences(np.random.default_rng(seed), count, max_seq_len=max_seq_len,
                            vocab_size=tokenizer.tokenizer_vocab_size, cls_id=tokenizer.special.cls,
                            sep_id=tokenizer.special.sep, special_ids=tokenizer.special_ids)


def write_tokenizer(path: Path, vocab_size: int) -> TextTokenizer:
    """A word-level tokenizer of `vocab_size` ids: SPECIAL_TOKENS at 0..4, then `t5`, `t6`, ..."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return TextTokenizer.load(path)


def write_split(split_dir: Path, sequences: list[PackedSequence], meta: DatasetMeta,
                shard_size_limit_bytes: int = 1 << 26) -> None:
    """MDS shards of `sequences` plus the metadata file, as `modernbert-shard` lays out one split."""
    with MDSWriter(out=str(split_dir), columns=mds_columns(meta.dtype), compression=MDS_COMPRESSION,
                   hashes=MDS_HASHES, size_limit=shard_size_limit_bytes) as writer:
        for seq in sequences:
            writer.write({INPUT_IDS_COLUMN: seq.input_ids.astype(meta.dtype, copy=False),
                          DOC_LENS_COLUMN: seq.doc_lens, DOC_IDS_COLUMN: seq.doc_ids})
    write_meta(str(split_dir), meta)


@dataclass(frozen=True)
class SyntheticDataset:
    """What `write_dataset` wrote: a stream with `local=root` and one split, and its tokenizer."""

    root: Path
    split_dir: Path
    tokenizer: TextTokenizer  # saved at tokenizer.path
    meta: DatasetMeta
    num_sequences: int
    real_tokens: int


def write_dataset(root: str | Path, *, num_sequences: int, max_seq_len: int, vocab_size: int,
                  seed: int = 0, split: str = "train") -> SyntheticDataset:
    """`root/tokenizer.json` and `root/<split>/` with `num_sequences` packed sequences of random tokens."""
    root = Path(root)
    tokenizer = write_tokenizer(root / TOKENIZER_FILENAME, vocab_size)
    sequences = tokenizer_sequences(tokenizer, num_sequences, max_seq_len=max_seq_len, seed=seed)
    meta = DatasetMeta(max_seq_len=max_seq_len, vocab_size=tokenizer.padded_vocab_size,
                       tokenizer_vocab_size=tokenizer.tokenizer_vocab_size, special_ids=asdict(tokenizer.special),
                       tokenizer_sha256=tokenizer.sha256, dtype=token_dtype_for(tokenizer.padded_vocab_size),
                       split=split)
    write_split(root / split, sequences, meta)
    return SyntheticDataset(root=root, split_dir=root / split, tokenizer=tokenizer, meta=meta,
                            num_sequences=len(sequences),
                            real_tokens=sum(len(seq.input_ids) for seq in sequences))
