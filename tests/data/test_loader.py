"""The training-time reader: chunk layout, epochs, exact resume across processes, ranks, streams, S3."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import MDSWriter, Stream

from modernbert_train.data.loader import (
    LoaderConfig,
    ShardReadError,
    StepBatcher,
    StreamConfig,
    build_chunk_dataloader,
    collate_chunk,
    stack_chunks,
    num_samples_in_batch,
    num_tokens_in_batch,
    split_batch,
)
from modernbert_train.data.chunk_layout import doc_slots
from modernbert_train.data.masking import IGNORE_INDEX, MaskingConfig, MLMMasker
from modernbert_train.data.schema import DatasetMeta, mds_columns, write_meta
from modernbert_train.data.shard import MDS_HASHES
from tests.s3_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL_IDS = (PAD, CLS, SEP, MASK, UNK)
VOCAB = 1000
COLUMNS = mds_columns("uint16")
MAX_SEQ_LEN = 64
MICROBATCH_SEQS = 4


@dataclass(frozen=True)
class Special:
    cls: int = CLS
    sep: int = SEP
    mask: int = MASK
    pad: int = PAD
    unk: int = UNK


def make_packed_samples(num_samples: int, *, max_seq_len: int, seed: int, full: bool = False,
                        doc_id_base: int = 0) -> list[dict[str, np.ndarray]]:
    """Packed sequences of [CLS] body [SEP] documents (2..max_seq_len/2 tokens); doc id = base + 1000*i + j."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num_samples):
        remaining = max_seq_len if full else int(rng.integers(max_seq_len // 2, max_seq_len + 1))
        lens = []
        while remaining >= 2:
            n = int(rng.integers(2, min(remaining, max_seq_len // 2) + 1))
            n += remaining - n == 1  # never leave a 1-token gap: `full` sequences fill exactly
            lens.append(n)
            remaining -= n
        ids = np.concatenate([np.r_[CLS, rng.integers(5, VOCAB, n - 2), SEP] for n in lens])
        samples.append({"input_ids": ids.astype(np.uint16), "doc_lens": np.array(lens, np.int32),
                        "doc_ids": doc_id_base + 1000 * i + np.arange(len(lens), dtype=np.int64)})
    return samples


def dataset_meta(**overrides) -> DatasetMeta:
    base = DatasetMeta(max_seq_len=MAX_SEQ_LEN, vocab_size=1024, tokenizer_vocab_size=VOCAB,
                       special_ids={"cls": CLS, "sep": SEP, "mask": MASK, "pad": PAD, "unk": UNK},
                       tokenizer_sha256="ab" * 32, dtype="uint16", split="train")
    return replace(base, **overrides)


def write_shards(out: str, samples: list[dict[str, np.ndarray]], meta: DatasetMeta | None = None,
                 hashes: list[str] = MDS_HASHES) -> None:
    """MDS shards (several, small) plus the metadata file, as the shard writer lays them out."""
    with MDSWriter(out=out, columns=COLUMNS, compression="zstd", hashes=hashes, size_limit=1 << 12) as writer:
        for sample in samples:
            writer.write(sample)
    write_meta(out, meta or dataset_meta())


def make_masker(seed: int) -> MLMMasker:
    return MLMMasker(MaskingConfig(mask_rate=0.3), mask_id=MASK, special_ids=SPECIAL_IDS,
                     vocab_size=VOCAB, pad_id=PAD, seed=seed)


def loader_config(locals_: list[str], **overrides) -> LoaderConfig:
    base = LoaderConfig(streams=tuple(StreamConfig(local=d) for d in locals_), split=None,
                        max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, mask_rate=0.3, seed=17,
                        num_workers=2, prefetch_factor=2, download_timeout_s=30)
    return replace(base, **overrides)


def build_loader(cfg: LoaderConfig, check_meta: bool = True):
    return build_chunk_dataloader(cfg, special=Special(), special_ids=SPECIAL_IDS, vocab_size=VOCAB,
                                  check_meta=check_meta)


def unmasked(chunk: dict) -> np.ndarray:
    """The original token ids of a chunk: labels where masked, inputs elsewhere."""
    labels = chunk["labels"].numpy()
    return np.where(labels != IGNORE_INDEX, labels, chunk["input_ids"].numpy())


def assert_chunk_matches(chunk: dict, samples: list[dict[str, np.ndarray]], *, max_seq_len: int,
                         microbatch_seqs: int) -> None:
    """Every invariant of the chunk layout, against the packed sequences it claims to hold."""
    T = microbatch_seqs * max_seq_len
    picked = [samples[i] for i in chunk["sample_idx"].tolist()]
    ids = np.concatenate([s["input_ids"] for s in picked]).astype(np.int64)
    lens = np.concatenate([s["doc_lens"] for s in picked])
    n = ids.size
    tail_docs = -(-(T - n) // max_seq_len)  # the pad tail, in documents of max_seq_len at most
    slots = doc_slots(lens.size + tail_docs)  # rounded up to 64
    assert slots % 64 == 0 and slots >= lens.size + tail_docs, slots
    assert chunk["input_ids"].shape == (T,) and chunk["input_ids"].dtype == torch.int64
    assert chunk["cu_seqlens"].shape == (slots + 1,) and chunk["cu_seqlens"].dtype == torch.int32
    assert chunk["doc_ids"].shape == (slots,) and chunk["max_seqlen"] == max_seq_len
    assert int(chunk["num_tokens"]) == n, (int(chunk["num_tokens"]), n)
    # No token lost or duplicated; the tail is padding and never a label.
    original = unmasked(chunk)
    assert (original[:n] == ids).all(), f"chunk tokens differ at {np.flatnonzero(original[:n] != ids)[:5]}"
    assert (chunk["input_ids"][n:] == PAD).all() and (chunk["labels"][n:] == IGNORE_INDEX).all()
    # Labels only at selected positions, never on specials.
    labels = chunk["labels"].numpy()
    selected = labels != IGNORE_INDEX
    assert not np.isin(ids[selected[:n]], SPECIAL_IDS).any()
    assert selected.sum() <= chunk["prediction_slots"] <= T, (selected.sum(), chunk["prediction_slots"])
    assert (chunk["input_ids"].numpy()[~selected] == original[~selected]).all()
    # cu_seqlens: the documents, then the pad tail in max_seq_len pieces, then repeats of T. No
    # document is longer than max_seqlen: varlen kernels compute only that many rows of each.
    cu = chunk["cu_seqlens"].numpy().astype(np.int64)
    tail = [min(T, n + max_seq_len * (i + 1)) for i in range(tail_docs)]
    expected = np.concatenate([[0], np.cumsum(lens), tail]).astype(np.int64)
    assert (cu[:expected.size] == expected).all(), (cu[:expected.size], expected)
    assert (cu[expected.size:] == T).all() and cu[-1] == T
    assert np.diff(cu).max() <= chunk["max_seqlen"], np.diff(cu).max()
    # Positions restart at 0 in every document, including the pad tail's (so they stay in RoPE's tables).
    pos = chunk["position_ids"].numpy()
    for start, stop in zip(expected[:-1], expected[1:]):
        assert (pos[start:stop] == np.arange(stop - start)).all(), (start, stop, pos[start:stop])
    doc_ids = chunk["doc_ids"].numpy()
    assert (doc_ids[:lens.size] == np.concatenate([s["doc_ids"] for s in picked])).all()
    assert (doc_ids[lens.size:] == -1).all()


# ---------------------------------------------------------------- collate (no Streaming)


@pytest.mark.parametrize(
    "num_seqs, full",
    [(MICROBATCH_SEQS, False), (MICROBATCH_SEQS, True), (MICROBATCH_SEQS - 1, False), (1, True)],
    ids=["padded-tail", "exactly-full", "short-chunk", "one-sequence"],
)
def test_collate_invariants(num_seqs, full):
    samples = make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=3, full=full)
    for s_idx, s in enumerate(samples):
        s["sample_idx"] = s_idx
    chosen = [samples[i] for i in (5, 0, 7, 2)[:num_seqs]]
    chunk = collate_chunk(chosen, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, pad_id=PAD,
                          masker=make_masker(1), epoch=0)
    assert chunk["sample_idx"].tolist() == [5, 0, 7, 2][:num_seqs]
    assert_chunk_matches(chunk, samples, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS)
    assert (int(chunk["num_tokens"]) == num_seqs * MAX_SEQ_LEN) == full


def test_collate_worst_case_document_count_fits():
    # Every document is the minimum [CLS][SEP]: the most documents a chunk can hold.
    sample = {"input_ids": np.tile(np.array([CLS, SEP], np.uint16), MAX_SEQ_LEN // 2),
              "doc_lens": np.full(MAX_SEQ_LEN // 2, 2, np.int32),
              "doc_ids": np.arange(MAX_SEQ_LEN // 2, dtype=np.int64), "sample_idx": 0}
    chunk = collate_chunk([sample] * MICROBATCH_SEQS, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS,
                          pad_id=PAD, masker=make_masker(1), epoch=0)
    docs = MICROBATCH_SEQS * MAX_SEQ_LEN // 2  # the chunk is full: no pad tail
    cu = chunk["cu_seqlens"].numpy()
    assert cu.size == doc_slots(docs) + 1 and (np.diff(cu)[:docs] == 2).all() and (cu[docs:] == cu[-1]).all()
    # doc_ids follows the document slots of cu_seqlens; the slots left over are empty documents.
    assert (chunk["doc_ids"].numpy()[:docs] != -1).all() and (chunk["doc_ids"].numpy()[docs:] == -1).all()


def test_masked_tokens_never_exceed_the_prediction_slots():
    # Short sequences and documents maximise the rounding up of each sequence's masked count.
    masker = MLMMasker(MaskingConfig(mask_rate=0.3), mask_id=MASK, special_ids=[CLS, SEP], vocab_size=VOCAB,
                       pad_id=PAD, seed=0)
    for seed in range(40):
        samples = make_packed_samples(MICROBATCH_SEQS, max_seq_len=MAX_SEQ_LEN, seed=seed, full=seed % 2 == 0)
        for s_idx, s in enumerate(samples):
            s["sample_idx"] = s_idx
        chunk = collate_chunk(samples, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, pad_id=PAD,
                              masker=masker, epoch=seed)
        masked = int((chunk["labels"] != IGNORE_INDEX).sum())
        assert masked <= chunk["prediction_slots"], (seed, masked, chunk["prediction_slots"])


def test_collate_masks_per_sequence_by_epoch_and_sample_idx():
    samples = make_packed_samples(4, max_seq_len=MAX_SEQ_LEN, seed=4)
    for s_idx, s in enumerate(samples):
        s["sample_idx"] = 100 + s_idx
    kw = dict(max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, pad_id=PAD, masker=make_masker(1))
    a = collate_chunk(samples, epoch=0, **kw)
    b = collate_chunk(samples[::-1], epoch=0, **kw)  # other position in the chunk: same mask
    c = collate_chunk(samples, epoch=1, **kw)
    n0 = samples[0]["input_ids"].size
    assert (a["labels"][:n0] == b["labels"][-n0 - (MICROBATCH_SEQS * MAX_SEQ_LEN - int(b["num_tokens"])):][:n0]).all()
    assert (a["labels"] != c["labels"]).any(), "epoch does not change the mask"


@pytest.mark.parametrize("field, value, match", [
    ("doc_lens", np.array([3, 3], np.int32), "doc_lens sum"),
    ("input_ids", np.ones(MAX_SEQ_LEN + 2, np.uint16), "max_seq_len"),
])
def test_collate_rejects_malformed_sequences(field, value, match):
    sample = make_packed_samples(1, max_seq_len=MAX_SEQ_LEN, seed=5)[0] | {"sample_idx": 9, field: value}
    with pytest.raises(ValueError, match=match):
        collate_chunk([sample], max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, pad_id=PAD,
                      masker=make_masker(1), epoch=0)


def test_split_batch_and_counts():
    samples = make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=6)
    for s_idx, s in enumerate(samples):
        s["sample_idx"] = s_idx
    kw = dict(max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, pad_id=PAD, masker=make_masker(1), epoch=0)
    chunks = [collate_chunk(samples[:4], **kw), collate_chunk(samples[4:], **kw)]
    # One chunk with many more documents: stacking pads the other's cu_seqlens / doc_ids.
    chunks[1] = collate_chunk([{"input_ids": np.tile(np.array([CLS, SEP], np.uint16), MAX_SEQ_LEN // 2),
                                "doc_lens": np.full(MAX_SEQ_LEN // 2, 2, np.int32),
                                "doc_ids": np.arange(MAX_SEQ_LEN // 2, dtype=np.int64), "sample_idx": 4 + i}
                               for i in range(4)], **kw)
    samples[4:] = [{"input_ids": np.zeros(MAX_SEQ_LEN)}] * 4
    assert chunks[0]["cu_seqlens"].numel() < chunks[1]["cu_seqlens"].numel()
    batch = stack_chunks(chunks)
    assert num_samples_in_batch(batch) == 8
    assert num_tokens_in_batch(batch) == sum(s["input_ids"].size for s in samples)
    parts = split_batch(batch, MICROBATCH_SEQS)
    assert len(parts) == 2
    slots = chunks[1]["cu_seqlens"].numel()
    for part, chunk in zip(parts, chunks):
        assert part.keys() == chunk.keys()
        for k in chunk:
            if k in ("max_seqlen", "prediction_slots"):
                assert part[k] == chunk[k], k
            elif k in ("cu_seqlens", "doc_ids"):  # padded with empty documents
                n = chunk[k].numel()
                assert part[k].numel() == slots - (k == "doc_ids") and torch.equal(part[k][:n], chunk[k]), k
                assert (part[k][n:] == (chunk[k][-1] if k == "cu_seqlens" else -1)).all(), k
            else:
                assert torch.equal(part[k], chunk[k]), k
        assert num_samples_in_batch(part) == MICROBATCH_SEQS
    with pytest.raises(ValueError, match="microbatch_size"):
        split_batch(batch, 1)


def test_one_chunk_steps_are_views_of_the_chunk():
    """k = 1 (the usual step after batch warmup): the same batch as stacking, without a copy, so a
    chunk the DataLoader pinned stays pinned for Composer's non_blocking host-to-device copy."""
    samples = make_packed_samples(4, max_seq_len=MAX_SEQ_LEN, seed=7)
    for s_idx, s in enumerate(samples):
        s["sample_idx"] = s_idx
    chunk = collate_chunk(samples, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, pad_id=PAD,
                          masker=make_masker(1), epoch=0)
    batch = stack_chunks([chunk])
    assert batch.keys() == chunk.keys(), (batch.keys(), chunk.keys())
    for key, value in chunk.items():
        if not torch.is_tensor(value):
            assert batch[key] == value, key
            continue
        stacked = torch.stack([value])
        assert batch[key].dtype == stacked.dtype and torch.equal(batch[key], stacked), key
        assert batch[key].data_ptr() == value.data_ptr(), f"{key} was copied"
    assert split_batch(batch, MICROBATCH_SEQS)[0]["input_ids"].shape == chunk["input_ids"].shape


# ---------------------------------------------------------------- Streaming: epochs and resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_yields_every_sample_once(tmp_path, num_workers):
    samples = make_packed_samples(96, max_seq_len=MAX_SEQ_LEN, seed=7)  # 96 = 12 chunks of 4 x 2 workers
    write_shards(str(tmp_path / "ds"), samples)
    loader = build_loader(loader_config([str(tmp_path / "ds")], num_workers=num_workers))
    seen, doc_ids = [], []
    for chunk in loader:
        assert_chunk_matches(chunk, samples, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS)
        seen += chunk["sample_idx"].tolist()
        doc_ids += [d for d in chunk["doc_ids"].tolist() if d >= 0]
    assert sorted(seen) == list(range(96)), f"missing {set(range(96)) - set(seen)}, {len(seen)} seen"
    assert seen != sorted(seen), "shuffle=True gave the stored order"
    assert sorted(doc_ids) == sorted(int(d) for s in samples for d in s["doc_ids"])


def warmup_chunks_per_step(samples_seen: int) -> int:
    """Batch-size warmup used by the resume tests: 1, then 2, then 3 chunks per step."""
    return 1 if samples_seen < 16 else 2 if samples_seen < 64 else 3


RESUME_SAMPLES = 203  # not a multiple of workers x microbatch: the epoch ends in a partial batch
RESUME_STEPS = 30  # 76 chunks; an epoch has 50 full chunks, so step 22 straddles the epoch boundary


def record(batch: dict) -> dict[str, np.ndarray]:
    return {k: batch[k].numpy().copy() for k in ("input_ids", "labels", "sample_idx", "cu_seqlens")}


def run_steps(batcher: StepBatcher, num_steps: int) -> list[dict[str, np.ndarray]]:
    return [record(next(batcher)) for _ in range(num_steps)]


def resume_child(spec_path: str) -> None:
    """Entry point of the fresh process: resume from a saved state and record the remaining steps."""
    spec = json.loads(Path(spec_path).read_text())
    batcher = StepBatcher(build_loader(loader_config([spec["local"]], num_workers=spec["num_workers"])),
                          chunks_per_step=warmup_chunks_per_step)
    batcher.load_state_dict(spec["state"])
    torch.save(run_steps(batcher, spec["num_steps"]), spec["out"])


def assert_same_steps(got: list[dict], want: list[dict], first_step: int) -> None:
    assert len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        for key in w:
            assert np.array_equal(g[key], w[key]), (
                f"step {first_step + i}: {key} differs; sample_idx got {g['sample_idx'].tolist()} "
                f"want {w['sample_idx'].tolist()}")


@pytest.mark.slow  # two fresh Python processes, one after the other (torch + streaming imports): ~25 s
def test_resume_in_fresh_process_is_exact(tmp_path):
    samples = make_packed_samples(RESUME_SAMPLES, max_seq_len=MAX_SEQ_LEN, seed=8)
    local = str(tmp_path / "ds")
    write_shards(local, samples)
    batcher = StepBatcher(build_loader(loader_config([local])), chunks_per_step=warmup_chunks_per_step)
    reference, states = [], {}
    for step in range(RESUME_STEPS):
        if step in (7, 21):  # mid epoch 0 before the warmup changes k; just before the straddling step
            states[step] = batcher.state_dict()
        reference += run_steps(batcher, 1)
    assert batcher.state.epoch == 1 and states[21]["samples_in_epoch"] == 196, (batcher.state, states)
    for chunk_steps in reference:
        for idx in chunk_steps["sample_idx"].ravel():
            assert 0 <= idx < RESUME_SAMPLES
    del batcher

    # One child at a time: Streaming registers its shared-memory prefix without a cross-process
    # lock, so two unrelated processes creating datasets at the same instant can collide.
    for step, state in states.items():
        spec = {"local": local, "num_workers": 2, "state": state, "num_steps": RESUME_STEPS - step,
                "out": str(tmp_path / f"resumed_{step}.pt")}
        spec_path = tmp_path / f"spec_{step}.json"
        spec_path.write_text(json.dumps(spec))
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from tests.data.test_loader import resume_child; "
             "resume_child(sys.argv[1])", str(spec_path)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        assert child.returncode == 0, f"resume from step {step} failed:\n{child.stdout[-3000:]}"
        resumed = torch.load(tmp_path / f"resumed_{step}.pt", weights_only=False)
        assert_same_steps(resumed, reference[step:], first_step=step)


@pytest.mark.parametrize("num_workers, persistent", [(0, False), (2, False), (2, True)],
                         ids=["no-workers", "2-workers", "2-persistent-workers"])
def test_resume_same_process_reloaded_batcher(tmp_path, num_workers, persistent):
    # Reload into a batcher that already ran past the checkpoint (later epoch): the rewind must hold.
    samples = make_packed_samples(20, max_seq_len=MAX_SEQ_LEN, seed=9)  # 5 full chunks per epoch
    write_shards(str(tmp_path / "ds"), samples)
    cfg = loader_config([str(tmp_path / "ds")], num_workers=num_workers, persistent_workers=persistent)
    batcher = StepBatcher(build_loader(cfg), chunks_per_step=lambda seen: 2)
    run_steps(batcher, 2)
    state = batcher.state_dict()
    reference = run_steps(batcher, 6)  # crosses two epoch boundaries
    assert batcher.state.epoch == 3, batcher.state
    batcher.load_state_dict(state)
    assert_same_steps(run_steps(batcher, 6), reference, first_step=2)


def test_batches_do_not_depend_on_worker_count(tmp_path):
    # The per-rank sample order and the (epoch, sample_idx) masking keys are the same with 0 or 2
    # workers, so the batches are too (40 samples: 10 full chunks per epoch either way).
    write_shards(str(tmp_path / "ds"), make_packed_samples(40, max_seq_len=MAX_SEQ_LEN, seed=19))
    runs = []
    for num_workers in (0, 2):
        batcher = StepBatcher(build_loader(loader_config([str(tmp_path / "ds")], num_workers=num_workers)),
                              chunks_per_step=lambda seen: 3)
        runs.append(run_steps(batcher, 8))  # 24 chunks: into the third epoch
        assert batcher.state.epoch == 2, batcher.state
        del batcher
    assert_same_steps(runs[1], runs[0], first_step=0)


def rank_child(out_path: str, local: str) -> None:
    """One simulated rank: one epoch of steps, recording which samples it saw."""
    batcher = StepBatcher(build_loader(loader_config([local], num_workers=2)), chunks_per_step=lambda seen: 1)
    seen = [next(batcher)["sample_idx"].ravel().tolist() for _ in range(64 // (MICROBATCH_SEQS * 2))]
    Path(out_path).write_text(json.dumps({"seen": seen, "state": batcher.state_dict()}))


@pytest.mark.slow  # two rank processes with a gloo group: ~15 s
def test_two_ranks_see_disjoint_samples(tmp_path):
    samples = make_packed_samples(64, max_seq_len=MAX_SEQ_LEN, seed=10)
    local = str(tmp_path / "ds")
    write_shards(local, samples)
    port = str(free_port())
    children = []
    for rank in range(2):
        env = os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        children.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.data.test_loader import rank_child; "
             "rank_child(sys.argv[1], sys.argv[2])", str(tmp_path / f"rank{rank}.json"), local],
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, child in enumerate(children):
        output, _ = child.communicate(timeout=120)
        assert child.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    per_rank = [{i for step in res["seen"] for i in step} for res in results]
    assert per_rank[0].isdisjoint(per_rank[1]), sorted(per_rank[0] & per_rank[1])
    assert per_rank[0] | per_rank[1] == set(range(64))
    # Each rank counts the global consumption: 8 steps x 4 sequences x 2 ranks.
    assert [res["state"]["samples_in_epoch"] for res in results] == [64, 64]


def test_stream_proportions(tmp_path):
    a = make_packed_samples(160, max_seq_len=MAX_SEQ_LEN, seed=11)
    b = make_packed_samples(160, max_seq_len=MAX_SEQ_LEN, seed=12, doc_id_base=10**9)
    write_shards(str(tmp_path / "a"), a)
    write_shards(str(tmp_path / "b"), b)
    cfg = loader_config([], num_workers=0, streams=(StreamConfig(local=str(tmp_path / "a"), proportion=3.0),
                                                    StreamConfig(local=str(tmp_path / "b"), proportion=1.0)))
    from_a = total = 0
    for chunk in build_loader(cfg):
        idx = chunk["sample_idx"]
        from_a += int((idx < 160).sum())
        total += idx.numel()
        # Global sample ids index the concatenation of the streams.
        assert_chunk_matches(chunk, a + b, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS)
    assert total == 320, total
    assert abs(from_a / total - 0.75) < 0.02, f"{from_a}/{total} from stream a, want 0.75"


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class FakeTokenizer:
    """What build_train_data / build_eval_data read from a TextTokenizer."""

    special: Special = Special()
    special_ids: tuple[int, ...] = SPECIAL_IDS
    tokenizer_vocab_size: int = VOCAB
    sha256: str = "ab" * 32  # dataset_meta()'s tokenizer_sha256
    path: Path = Path("tokenizer.json")


def eval_spec(local: str, *, num_workers: int):
    from modernbert_train.train.builder import build_eval_data
    from modernbert_train.train.config import DataConfig, RunConfig, StreamSpec

    cfg = RunConfig(run_name="t", max_duration="1ba", device="cpu", data=DataConfig(
        tokenizer="tokenizer.json", eval_streams=[StreamSpec(local=local)], eval_split=None,
        max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, num_workers=num_workers))
    return build_eval_data(cfg, FakeTokenizer())


@pytest.mark.parametrize("num_seqs, num_workers", [(10, 1), (10, 0), (MICROBATCH_SEQS - 1, 1)],
                         ids=["partial-last-chunk", "partial-last-chunk-no-workers", "fewer-than-a-chunk"])
def test_eval_loader_masks_alike_at_every_evaluation_and_keeps_every_sequence(tmp_path, num_seqs, num_workers):
    """Composer iterates the eval loader anew at each evaluation (a new Streaming epoch): the masks
    must not follow it, or the eval-loss curve mixes model change with mask noise. Every sequence is
    evaluated, the last ones in a short chunk; fewer than microbatch_seqs still make one chunk (with
    full chunks only there would be no eval batch at all, and the metrics would read 0)."""
    samples = make_packed_samples(num_seqs, max_seq_len=MAX_SEQ_LEN, seed=21)
    write_shards(str(tmp_path / "val"), samples)
    spec = eval_spec(str(tmp_path / "val"), num_workers=num_workers)
    evaluations = [[record(chunk) for chunk in spec.dataloader] for _ in range(3)]
    seen = [i for chunk in evaluations[0] for i in chunk["sample_idx"].tolist()]
    assert seen == list(range(num_seqs)), f"evaluated sequences {seen} of {num_seqs}"
    for evaluation in evaluations[1:]:
        assert_same_steps(evaluation, evaluations[0], first_step=0)
    for chunk in spec.dataloader:
        assert_chunk_matches(chunk, samples, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS)
        [part] = spec.split_batch(chunk, MICROBATCH_SEQS)
        assert part is chunk
        assert spec.get_num_samples_in_batch(chunk) == chunk["sample_idx"].numel()


def test_training_loader_masks_differ_from_epoch_to_epoch(tmp_path):
    """The counterpart of the fixed eval masks: without mask_epoch, each pass (Streaming epoch) masks
    the same sequences anew; with it, every pass masks them alike."""
    write_shards(str(tmp_path / "ds"), make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=22))
    cfg = loader_config([str(tmp_path / "ds")], num_workers=0, shuffle=False)
    for mask_epoch in (None, 3):
        loader = build_chunk_dataloader(cfg, special=Special(), special_ids=SPECIAL_IDS, vocab_size=VOCAB,
                                        mask_epoch=mask_epoch)
        passes = [[record(chunk) for chunk in loader] for _ in range(2)]
        assert [c["sample_idx"].tolist() for c in passes[0]] == [c["sample_idx"].tolist() for c in passes[1]]
        same = all(np.array_equal(a["labels"], b["labels"]) for a, b in zip(*passes))
        assert same == (mask_epoch is not None), (mask_epoch, same)


# ---------------------------------------------------------------- failures name their source


def test_out_of_vocab_ids_name_the_shard(tmp_path):
    samples = make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=13)
    samples[5]["input_ids"][3] = VOCAB + 7
    write_shards(str(tmp_path / "ds"), samples)
    loader = build_loader(loader_config([str(tmp_path / "ds")], num_workers=0, shuffle=False))
    with pytest.raises(ValueError, match=r"token id 1007 >= vocab_size 1000 in sample 5 .*shard\.\d+\.mds"):
        list(loader)


def test_empty_stream_is_named(tmp_path):
    write_shards(str(tmp_path / "full"), make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=14))
    write_shards(str(tmp_path / "empty"), [])
    with pytest.raises(ValueError, match=r"empty stream.*empty"):
        build_loader(loader_config([str(tmp_path / "full"), str(tmp_path / "empty")], num_workers=0))


@pytest.mark.parametrize("meta, match", [
    (dataset_meta(max_seq_len=2 * MAX_SEQ_LEN), "sequences up to 128 tokens > max_seq_len 64"),
    (dataset_meta(tokenizer_vocab_size=VOCAB + 1), "tokenizer_vocab_size 1001 != 1000"),
    (dataset_meta(special_ids={"cls": CLS, "sep": SEP, "mask": 9, "pad": PAD, "unk": UNK}), "mask 9 != 3"),
], ids=["longer-sequences", "other-vocab", "other-mask-id"])
def test_mismatched_metadata_is_rejected(tmp_path, meta, match):
    write_shards(str(tmp_path / "ok"), make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=17))
    write_shards(str(tmp_path / "bad"), make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=18), meta)
    with pytest.raises(ValueError, match=rf"stream .*bad does not match the run: .*{match}"):
        build_loader(loader_config([str(tmp_path / "ok"), str(tmp_path / "bad")], num_workers=0))


@pytest.mark.parametrize("run_sha256, warned", [("ab" * 32, False), ("cd" * 32, True), (None, False)],
                         ids=["same-tokenizer", "other-tokenizer", "no-run-tokenizer"])
def test_shards_of_another_tokenizer_are_a_warning(tmp_path, caplog, run_sha256, warned):
    """Same vocab size and special ids (checked as errors), another tokenizer hash: a warning naming
    the stream, both hashes and the run's tokenizer (a re-serialised copy hashes differently)."""
    write_shards(str(tmp_path / "ds"), make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=23))
    build_chunk_dataloader(loader_config([str(tmp_path / "ds")], num_workers=0), special=Special(),
                           special_ids=SPECIAL_IDS, vocab_size=VOCAB, tokenizer_sha256=run_sha256,
                           tokenizer_path="/tok/tokenizer.json")
    warnings = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "tokenized with tokenizer" in r.getMessage()]
    if not warned:
        assert warnings == [], warnings
        return
    assert len(warnings) == 1, warnings
    assert (f"stream {tmp_path / 'ds'} was tokenized with tokenizer {'ab' * 6}, the run's tokenizer "
            f"/tok/tokenizer.json is {'cd' * 6}") in warnings[0], warnings[0]


def test_tokenizer_hash_warning_reaches_the_training_data(tmp_path, caplog):
    """build_train_data hands the run tokenizer's hash and path to the metadata check."""
    from modernbert_train.train.builder import build_train_data
    from modernbert_train.train.config import DataConfig, RunConfig, StreamSpec

    write_shards(str(tmp_path / "ds"), make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=24))
    cfg = RunConfig(run_name="t", max_duration="1ba", device="cpu", data=DataConfig(
        tokenizer="tokenizer.json", train_streams=[StreamSpec(local=str(tmp_path / "ds"))], train_split=None,
        max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS, num_workers=0))
    build_train_data(cfg, replace(FakeTokenizer(), sha256="ef" * 32, path=Path("/run/tok.json")))
    assert f"tokenizer {'ab' * 6}, the run's tokenizer /run/tok.json is {'ef' * 6}" in caplog.text, caplog.text


def _flip_bytes(path: Path) -> bytes:
    """Damage `path` in place (64 bytes inverted in the middle); returns the original bytes."""
    good = path.read_bytes()
    middle = len(good) // 2
    path.write_bytes(good[:middle] + bytes(b ^ 0xFF for b in good[middle:middle + 64]) + good[middle + 64:])
    return good


def test_damaged_shard_is_named_and_its_cached_copy_downloaded_again(tmp_path):
    """A remote shard that fails its hash check is an error naming it (not a shorter epoch), and
    its cached copy is dropped: once the remote is repaired, the same cache reads every sample."""
    samples = make_packed_samples(48, max_seq_len=MAX_SEQ_LEN, seed=19)
    write_shards(str(tmp_path / "remote"), samples)
    victim = sorted((tmp_path / "remote").glob("shard.*.mds.zstd"))[2]
    good = _flip_bytes(victim)
    cache = tmp_path / "cache"
    cfg = loader_config([], streams=(StreamConfig(local=str(cache), remote=str(tmp_path / "remote")),),
                        num_workers=0, shuffle=False)
    chunks = 0
    with pytest.raises(ShardReadError, match=rf"shard {victim.stem} / {victim.name} of stream .*"
                                             rf"Checksum failure: .*{victim.name}"):
        for _ in build_loader(cfg):
            chunks += 1
    assert chunks < 48 // MICROBATCH_SEQS, chunks
    assert not (cache / victim.name).exists() and not (cache / victim.stem).exists(), sorted(os.listdir(cache))

    victim.write_bytes(good)
    seen = [i for chunk in build_loader(cfg) for i in chunk["sample_idx"].tolist()]
    assert seen == list(range(48)), seen


@pytest.mark.parametrize("seed", [1, 2])  # orders in which one worker waited forever on the other's failure
def test_damaged_shard_is_named_with_two_workers_reading_it(tmp_path, monkeypatch, seed):
    """While one worker downloads the damaged shard (3 s here), the other reaches it and waits. It
    must get the error too rather than wait until the DataLoader timeout (not naming the shard)."""
    write_shards(str(tmp_path / "remote"), make_packed_samples(192, max_seq_len=MAX_SEQ_LEN, seed=seed))
    victim = sorted((tmp_path / "remote").glob("shard.*.mds.zstd"))[3]
    _flip_bytes(victim)
    download = Stream._download_file

    def slow_victim(stream, from_basename, to_basename=None):
        if from_basename == victim.name:
            time.sleep(3)
        return download(stream, from_basename, to_basename)

    monkeypatch.setattr(Stream, "_download_file", slow_victim)  # forked workers inherit it
    cfg = loader_config([], streams=(StreamConfig(local=str(tmp_path / "cache"), remote=str(tmp_path / "remote")),),
                        num_workers=2, shuffle=True, seed=seed, download_timeout_s=15)
    batcher = StepBatcher(build_loader(cfg), chunks_per_step=lambda seen: 1)
    # A worker left waiting ends in the DataLoader timeout (30 s), a RuntimeError not naming the shard.
    with pytest.raises(ShardReadError, match=rf"shard {victim.stem} / {victim.name} of stream"):
        for _ in range(192 // MICROBATCH_SEQS):
            next(batcher)


def test_index_without_xxh64_loads_unchecked_with_a_warning(tmp_path, caplog):
    write_shards(str(tmp_path / "ds"), make_packed_samples(8, max_seq_len=MAX_SEQ_LEN, seed=20), hashes=["sha1"])
    loader = build_loader(loader_config([str(tmp_path / "ds")], num_workers=0, shuffle=False))
    assert loader.dataset.streams[0].validate_hash is None
    assert f"local={str(tmp_path / 'ds')!r}: its index has no xxh64 hashes" in caplog.text, caplog.text
    assert [i for chunk in loader for i in chunk["sample_idx"].tolist()] == list(range(8))


def test_stalled_download_becomes_an_error_naming_the_stream(tmp_path, monkeypatch):
    """An S3 endpoint that accepts connections and never answers: the step raises instead of hanging."""
    samples = make_packed_samples(16, max_seq_len=MAX_SEQ_LEN, seed=15)
    write_shards(str(tmp_path / "src"), samples)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_bytes((tmp_path / "src" / "index.json").read_bytes())  # shards stay remote

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_ignore() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_and_ignore, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    for key, value in {"S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "k",
                       "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    cfg = loader_config([], streams=(StreamConfig(local=str(cache), remote="s3://stalled-bucket/ds"),),
                        num_workers=1, download_timeout_s=1)  # one worker: a shorter teardown
    # check_meta=False: the metadata read would stall too; this test is about the shard data path.
    batcher = StepBatcher(build_loader(cfg, check_meta=False), chunks_per_step=lambda seen: 1)
    try:
        with pytest.raises(RuntimeError, match=r"s3://stalled-bucket/ds.*failed or stalled"):
            next(batcher)
    finally:
        del batcher
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        silent.close()


# ---------------------------------------------------------------- real S3 server


def test_streams_from_s3_three_times_with_fresh_caches(tmp_path, s3_server):
    # Several shards downloaded at once by two workers: this caught workers sharing the parent's
    # S3 connection (one shard's bytes stored under another's name).
    samples = make_packed_samples(96, max_seq_len=MAX_SEQ_LEN, seed=16)
    write_shards("s3://test-bucket/ds", samples)
    shards_on_server = sorted(p.name for p in (s3_server.root / "test-bucket" / "ds").iterdir())
    assert len(shards_on_server) > 5 and "index.json" in shards_on_server, shards_on_server
    for attempt in range(3):
        cache = tmp_path / f"cache{attempt}"
        cfg = loader_config([], streams=(StreamConfig(local=str(cache), remote="s3://test-bucket/ds"),),
                            num_workers=2)
        loader = build_loader(cfg)
        # Deterministic half of the check: no client (socket) is left in the parent for workers to share.
        assert loader.dataset.streams[0]._downloader._s3_client is None
        seen = []
        for chunk in loader:
            assert_chunk_matches(chunk, samples, max_seq_len=MAX_SEQ_LEN, microbatch_seqs=MICROBATCH_SEQS)
            seen += chunk["sample_idx"].tolist()
        del loader
        assert sorted(seen) == list(range(96)), f"attempt {attempt}: {len(seen)} samples"
        assert any(p.name.startswith("shard.") for p in cache.iterdir()), f"attempt {attempt}: nothing cached"


@pytest.mark.parametrize("extra, num_workers, refused", [(0, 1, False), (1, 1, True), (1, 0, False)],
                         ids=["longest-tmpdir", "one-byte-longer", "one-byte-longer-no-workers"])
def test_a_tmpdir_too_long_for_the_workers_sockets_is_refused_up_front(tmp_path, extra, num_workers, refused):
    """multiprocessing puts TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX sockets there; past the OS limit
    the loader stalls with the error inside a worker. In a fresh process with that TMPDIR: at the
    longest allowed one, real workers deliver every chunk; one byte longer is refused at once,
    naming TMPDIR and both fixes."""
    samples = make_packed_samples(2 * MICROBATCH_SEQS, max_seq_len=MAX_SEQ_LEN, seed=3)
    write_shards(str(tmp_path / "ds"), samples)
    limit = (103 if sys.platform == "darwin" else 107) - len("/pymp-XXXXXXXX/listener-XXXXXXXX")
    base = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    try:
        long_dir = base / ("d" * (limit + extra - len(str(base)) - 1))
        long_dir.mkdir()
        assert len(str(long_dir)) == limit + extra
        script = ("from tests.data.test_loader import build_loader, loader_config\n"
                  f"cfg = loader_config([{str(tmp_path / 'ds')!r}], num_workers={num_workers})\n"
                  "print(sorted(i for c in build_loader(cfg) for i in c['sample_idx'].tolist()))\n")
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "TMPDIR": str(long_dir)})
        if refused:
            assert proc.returncode != 0, proc.stdout
            assert (f"ValueError: TMPDIR {long_dir} is {limit + 1} bytes long" in proc.stderr
                    and f"at most {limit} bytes (or data.num_workers=0)" in proc.stderr), proc.stderr[-2000:]
        else:
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.strip() == str(list(range(2 * MICROBATCH_SEQS))), proc.stdout[-500:]
    finally:
        shutil.rmtree(base, ignore_errors=True)
