"""Bad training data: corrupted or truncated shards, token ids outside the vocabulary, an empty
stream, shards made for another tokenizer. Each is an error that names the problem; none is a
silently shorter epoch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter

from modernbert_train.data.loader import LoaderConfig, StreamConfig, build_chunk_dataloader
from modernbert_train.data.schema import META_FILENAME, mds_columns
from modernbert_train.data.tokenizer import TextTokenizer
from tests.reliability.conftest import DemoData, run_train, trained_batches

def _zip_shards(split_dir: Path) -> list[Path]:
    index = json.loads((split_dir / "index.json").read_text())
    return [split_dir / s["zip_data"]["basename"] for s in index["shards"]]


def _damaged_copy(src: Path, dst: Path, damage: str, shard_index: int) -> Path:
    """A copy of the dataset with only compressed shards (as `modernbert-shard` writes them) and
    one of them damaged; returns the damaged shard's path."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.mds"))
    shards = _zip_shards(dst / "train")
    assert len(shards) >= 6, f"expected many small shards, got {len(shards)}"
    victim = shards[shard_index]
    data = bytearray(victim.read_bytes())
    if damage == "flipped":
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    else:
        del data[len(data) // 2:]
    victim.write_bytes(bytes(data))
    return victim


def _loader(data_dir: Path, demo: DemoData, *, split: str = "train", microbatch_seqs: int = 4, shuffle: bool = True):
    tok = TextTokenizer.load(demo.tokenizer)
    cfg = LoaderConfig(streams=(StreamConfig(local=str(data_dir)),), split=split, max_seq_len=128,
                       microbatch_seqs=microbatch_seqs, mask_rate=0.3, seed=17, num_workers=0, shuffle=shuffle,
                       download_timeout_s=30)
    return build_chunk_dataloader(cfg, special=tok.special, special_ids=tok.special_ids,
                                  vocab_size=tok.tokenizer_vocab_size)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_damaged_shard_is_an_error_naming_it_not_a_shorter_epoch(tmp_path, demo_data, multi_shard_data, damage):
    victim = _damaged_copy(multi_shard_data, tmp_path / "mds", damage, shard_index=3)
    samples = json.loads((tmp_path / "mds/train/index.json").read_text())["shards"]
    total_chunks = sum(s["samples"] for s in samples) // 4
    chunks = 0
    with pytest.raises(Exception, match=victim.name.replace(".", r"\.")) as err:
        for _ in _loader(tmp_path / "mds", demo_data):
            chunks += 1
    # Without the fix the loop ends quietly: e.g. 14 of 202 chunks, no exception.
    assert chunks < total_chunks, (chunks, total_chunks, err)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_damaged_shard_stops_training_with_its_name(tmp_path, demo_data, multi_shard_data):
    """Through the CLI, reading in order (no shuffle), a truncated shard after three good ones: the
    run must stop with an error naming the shard. (Without the fix Streaming leaves the shard
    marked as being prepared and the reader waits forever: only the stall guard ends the run,
    with a message that does not name the shard.)"""
    victim = _damaged_copy(multi_shard_data, tmp_path / "mds", "truncated", shard_index=3)
    result = run_train(demo_data, tmp_path, "max_duration=60ba", "data.shuffle=false",
                       "data.stall_timeout_s=30", data_dir=tmp_path / "mds")
    assert result.returncode != 0, f"trained to the end on a damaged dataset: {trained_batches(tmp_path / 'run')}"
    assert f"shard part-00000/{victim.stem}" in result.output, result.tail()
    assert "data path stalled" not in result.output, result.tail()


# --------------------------------------------------------------------------------------------
# Hand-written MDS datasets
# --------------------------------------------------------------------------------------------

def _write_dataset(split_dir: Path, demo: DemoData, token_rows: list[np.ndarray]) -> None:
    """One document per sample ([CLS] ... [SEP]), with the demo's metadata (same tokenizer)."""
    with MDSWriter(out=str(split_dir), columns=mds_columns("uint16"), compression="zstd",
                   hashes=["sha1", "xxh64"]) as writer:
        for i, ids in enumerate(token_rows):
            writer.write({"input_ids": ids.astype(np.uint16), "doc_lens": np.array([ids.size], np.int32),
                          "doc_ids": np.array([1000 + i], np.int64)})
    shutil.copy(demo.data_dir / "train" / META_FILENAME, split_dir / META_FILENAME)


def _document(i: int, length: int = 100) -> np.ndarray:
    body = 10 + (np.arange(length - 2) * 7 + i) % 4000
    return np.concatenate([[0], body, [1]])  # [CLS]=0, [SEP]=1 in the demo tokenizer


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_token_id_beyond_vocab_stops_at_the_batch_that_holds_it(tmp_path, demo_data):
    rows = [_document(i) for i in range(40)]
    rows[13][50] = 5000  # the demo vocabulary has 4096 ids
    _write_dataset(tmp_path / "mds/train", demo_data, rows)
    result = run_train(demo_data, tmp_path, "max_duration=8ba", "data.shuffle=false",
                       data_dir=tmp_path / "mds")
    assert result.returncode != 0, result.tail()
    assert "token id 5000 >= vocab_size 4096 in sample 13 (row 13 of shard shard.00000.mds" in result.output, \
        result.tail()
    # Sample 13 is in the 4th chunk (4 sequences each), i.e. batch 3 (1 chunk per step in warmup):
    # batches 0-2 train, nothing after the bad one.
    assert trained_batches(tmp_path / "run") == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_empty_stream_fails_at_start_up(tmp_path, demo_data):
    _write_dataset(tmp_path / "mds/train", demo_data, [])
    result = run_train(demo_data, tmp_path, "max_duration=4ba", data_dir=tmp_path / "mds", timeout_s=200)
    assert result.returncode == 2, result.tail()
    assert "empty stream, nothing to train on" in result.output, result.tail()
    assert "Traceback" not in result.output, result.tail()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_shards_of_another_tokenizer_fail_at_start_up(tmp_path, demo_data):
    shutil.copytree(demo_data.data_dir, tmp_path / "mds", ignore=shutil.ignore_patterns("*.mds"))
    meta_path = tmp_path / "mds/train" / META_FILENAME
    meta = json.loads(meta_path.read_text())
    meta["special_ids"]["mask"] = 7
    meta_path.write_text(json.dumps(meta))
    result = run_train(demo_data, tmp_path, "max_duration=4ba", data_dir=tmp_path / "mds", timeout_s=200)
    assert result.returncode == 2, result.tail()
    assert f"stream {tmp_path}/mds/train does not match the run: special id mask 7 != 2" in result.output, \
        result.tail()


def test_stream_smaller_than_one_chunk_is_an_error(tmp_path, demo_data):
    """Fewer sequences than one chunk: an error saying how many are needed, not an endless loop."""
    _write_dataset(tmp_path / "mds/train", demo_data, [_document(i) for i in range(3)])
    from modernbert_train.data.loader import StepBatcher
    batcher = StepBatcher(_loader(tmp_path / "mds", demo_data), chunks_per_step=lambda _: 1, world_size=1)
    with pytest.raises(RuntimeError, match="yield no full chunk per rank: need at least 4 sequences"):
        next(batcher)
