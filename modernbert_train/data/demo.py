"""Demo assets built from the embedded corpus: a small BPE tokenizer and packed MDS shards (train +
val), created once under a folder, idempotent and safe when several processes ask at once."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from modernbert_train.data.corpus import write_embedded_corpus
from modernbert_train.data.schema import INDEX_FILENAME, SPLITS, read_meta

log = logging.getLogger(__name__)

# The embedded corpus has ~80 long documents; a tenth of them gives a validation split of a few
# dozen packed sequences at the demo's sequence length.
DEMO_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class DemoAssets:
    tokenizer_path: Path  # tokenizer.json
    data_dir: Path  # holds train/ and val/


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _shards_complete(data_dir: Path, tokenizer_sha256: str, max_seq_len: int) -> bool:
    for split in SPLITS:
        if not (data_dir / split / INDEX_FILENAME).is_file():
            return False
        try:
            meta = read_meta(str(data_dir / split))
        except (FileNotFoundError, ValueError):
            return False
        if meta.tokenizer_sha256 != tokenizer_sha256 or meta.max_seq_len != max_seq_len:
            return False
    return True


def ensure_demo_assets(root: Path, max_seq_len: int = 128, vocab_size: int = 4096,
                       val_fraction: float = DEMO_VAL_FRACTION) -> DemoAssets:
    """The demo tokenizer and shards under `root`, built on first use (a few seconds) and reused
    after; each (vocab_size, max_seq_len) gets its own folders."""
    from modernbert_train.data.corpus import embedded_documents
    from modernbert_train.data.shard import ShardConfig, shard
    from modernbert_train.data.tokenizer import TextTokenizer, train_bpe

    root = Path(root)
    tokenizer_dir = root / f"tokenizer-v{vocab_size}"
    tokenizer_path = tokenizer_dir / "tokenizer.json"
    data_dir = root / f"mds-v{vocab_size}-s{max_seq_len}"
    assets = DemoAssets(tokenizer_path=tokenizer_path, data_dir=data_dir)

    with _exclusive(root / ".demo.lock"):
        if tokenizer_path.is_file():
            tok = TextTokenizer.load(tokenizer_path)
        else:
            log.info("training the demo tokenizer (vocab %d) into %s", vocab_size, tokenizer_dir)
            # Trained beside and renamed into place: a crash never leaves a half-written tokenizer.
            partial = root / f".{tokenizer_dir.name}.tmp-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            train_bpe(embedded_documents(), vocab_size, partial)
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
            os.rename(partial, tokenizer_dir)
            tok = TextTokenizer.load(tokenizer_path)
        if _shards_complete(data_dir, tok.sha256, max_seq_len):
            return assets
        corpus = write_embedded_corpus(root / "corpus.jsonl")
        log.info("sharding the demo corpus into %s", data_dir)
        summary = shard(ShardConfig(
            inputs=[str(corpus)], tokenizer=str(tokenizer_path), out=str(data_dir),
            max_seq_len=max_seq_len, val_fraction=val_fraction, if_exists="overwrite",
            progress=False))
        log.info("demo shards: %s", "; ".join(summary.summary_lines()[:4]))
    return assets
