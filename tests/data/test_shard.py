"""Tests for data/shard.py (and data/demo.py): the CLI end to end on every input format, read back
with Streaming and compared exactly to the tokenizer's own encoding of the inputs; existing output,
bad input, multi-job merge, S3."""
from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from modernbert_train.data.corpus import embedded_documents
from modernbert_train.data.packing import split_document
from modernbert_train.data.schema import META_FILENAME, read_meta
from modernbert_train.data.shard import (ShardConfig, _parse_shard_args, doc_hash, is_val_document,
                                         main, shard)
from modernbert_train.data.tokenizer import TextTokenizer, train_bpe

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_SEQ_LEN = 64  # small, so that many paragraphs are split into several pieces
VAL_FRACTION = 0.2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    return train_bpe(embedded_documents(), 1024, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Paragraphs of the embedded corpus (no blank or trailing-space-only lines, so the plain text
    reader's paragraph unit gives back exactly these strings)."""
    out = []
    for doc in embedded_documents():
        for para in re.split(r"\n\s*\n", doc):
            lines = [line.rstrip() for line in para.strip("\n").split("\n")]
            if any(not line.strip() for line in lines):
                continue
            out.append("\n".join(lines))
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif path.suffix == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def expected_pieces(tok: TextTokenizer, texts: list[str]) -> dict[str, Counter]:
    """The oracle: split -> multiset of (doc_id, piece tokens) from the tokenizer directly."""
    out = {"train": Counter(), "val": Counter()}
    for text, ids in zip(texts, tok.encode_batch(texts)):
        doc_id, split_hash, _ = doc_hash(text)
        split = "val" if is_val_document(split_hash, VAL_FRACTION) else "train"
        for piece in split_document(ids, MAX_SEQ_LEN, tok.special.cls, tok.special.sep):
            out[split][(doc_id, piece.astype(np.int64).tobytes())] += 1
    return out


def read_pieces(local: Path, remote: str | None = None) -> Counter:
    """Read a split with StreamingDataset and cut each packed sequence into its pieces."""
    from streaming import StreamingDataset

    from modernbert_train.data.shm_registration import streaming_registration_lock

    # Under the node's registration lock, as the trainer's datasets: a dataset registered in the
    # middle of another test's two-rank registration made that run fail (FileExistsError on
    # /dev/shm/<prefix>_locals, seen in `make test` on 2026-12-04).
    with streaming_registration_lock():
        ds = StreamingDataset(local=str(local), remote=remote, shuffle=False, batch_size=1)
    pieces = Counter()
    for i in range(ds.num_samples):
        sample = ds[i]
        ids, lens, doc_ids = sample["input_ids"], sample["doc_lens"], sample["doc_ids"]
        assert ids.dtype == np.uint16 and lens.dtype == np.int32 and doc_ids.dtype == np.int64
        assert len(ids) <= MAX_SEQ_LEN and int(lens.sum()) == len(ids), (len(ids), lens)
        start = 0
        for n, doc_id in zip(lens, doc_ids):
            pieces[(int(doc_id), ids[start:start + n].astype(np.int64).tobytes())] += 1
            start += n
    return pieces


def assert_round_trip(out: Path, tok: TextTokenizer, texts: list[str]) -> None:
    expected = expected_pieces(tok, texts)
    got = {split: read_pieces(out / split) for split in ("train", "val")}
    for split in ("train", "val"):
        missing, extra = expected[split] - got[split], got[split] - expected[split]
        assert not missing and not extra, (f"{split}: {sum(missing.values())} pieces missing, "
                                           f"{sum(extra.values())} unexpected")
    train_docs = {doc_id for doc_id, _ in got["train"]}
    val_docs = {doc_id for doc_id, _ in got["val"]}
    assert val_docs and train_docs and not train_docs & val_docs, (len(train_docs), len(val_docs))


def shard_args(inputs: list[Path], tok: TextTokenizer, out: Path, *extra: str) -> list[str]:
    return [*map(str, inputs), "--tokenizer", str(tok.path), "--out", str(out),
            "--max-seq-len", str(MAX_SEQ_LEN), "--val-fraction", str(VAL_FRACTION),
            "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------
# Round trips


def test_main_jsonl_round_trip_is_exact(tmp_path, tokenizer, paragraphs, capsys):
    texts = paragraphs[:400]
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    summary_path = tmp_path / "summary.json"
    rc = main(shard_args([src], tokenizer, tmp_path / "ds", "--summary-json", str(summary_path)))
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert_round_trip(tmp_path / "ds", tokenizer, texts)

    summary = json.loads(summary_path.read_text())
    assert summary["documents"] == len(texts), summary
    assert summary["content_tokens"] == sum(len(ids) for ids in tokenizer.encode_batch(texts))
    assert summary["bytes_in"] == sum(len(t.encode()) for t in texts)
    assert summary["packing_efficiency"] > 0.95, summary["packing_efficiency"]
    assert "packing efficiency" in printed and "skipped: none" in printed, printed

    for split in ("train", "val"):
        meta = read_meta(str(tmp_path / "ds" / split))
        assert (meta.split, meta.max_seq_len, meta.dtype) == (split, MAX_SEQ_LEN, "uint16"), meta
        assert meta.vocab_size == tokenizer.padded_vocab_size == 1024, meta
        assert meta.tokenizer_sha256 == tokenizer.sha256
        assert meta.special_ids == {"cls": 0, "sep": 1, "mask": 2, "pad": 3, "unk": 4}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_cli_subprocess_reads_every_format(tmp_path, tokenizer, paragraphs):
    datasets = pytest.importorskip("datasets", reason="the HF-on-disk reader needs `datasets`")
    chunks = [paragraphs[i:i + 60] for i in range(0, 300, 60)]
    (tmp_path / "in").mkdir()
    inputs = [
        tmp_path / "in" / "a.txt",
        write_jsonl(tmp_path / "in" / "b.jsonl.gz", chunks[1]),
        write_jsonl(tmp_path / "in" / "c.jsonl.zst", chunks[2]),
        tmp_path / "in" / "d.parquet",
        tmp_path / "in" / "e_hf",
    ]
    inputs[0].write_text("\n\n".join(chunks[0]) + "\n")
    pq.write_table(pa.table({"text": chunks[3], "n": range(60)}), inputs[3])
    datasets.Dataset.from_dict({"text": chunks[4]}).save_to_disk(str(inputs[4]))
    proc = subprocess.run(
        [sys.executable, "-m", "modernbert_train.data.shard",
         *shard_args(inputs, tokenizer, tmp_path / "ds", "--workers", "2")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "documents: 300  " in proc.stdout and "workers: 2" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    assert_round_trip(tmp_path / "ds", tokenizer, [t for chunk in chunks for t in chunk])


def test_jobs_and_workers_give_the_same_documents_as_one_run(tmp_path, tokenizer, paragraphs):
    texts = paragraphs[:600]
    files = [write_jsonl(tmp_path / f"part{i}.jsonl", texts[i::5]) for i in range(5)]
    assert main(shard_args(files, tokenizer, tmp_path / "single")) == 0
    for job in range(3):
        extra = ["--num-jobs", "3", "--job-index", str(job)] + (["--workers", "2"] if job == 0 else [])
        assert main(shard_args(files, tokenizer, tmp_path / "multi", *extra)) == 0
    parts = sorted(p.name for p in (tmp_path / "multi" / "train" / "job-00000").iterdir())
    assert parts == ["index.json", "modernbert_job.json", META_FILENAME, "part-00000", "part-00001"], parts
    job = json.loads((tmp_path / "multi" / "train" / "job-00000" / "modernbert_job.json").read_text())
    assert job == {"num_jobs": 3, "job_index": 0}, job
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "data_prep" / "shard.py"), "merge",
                           str(tmp_path / "multi"), "--expect-jobs", "3"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 0 and "train: 3 jobs" in proc.stdout, (proc.stdout, proc.stderr)
    for split in ("train", "val"):
        single, multi = read_pieces(tmp_path / "single" / split), read_pieces(tmp_path / "multi" / split)
        assert single == multi, (split, sum(single.values()), sum(multi.values()))
    assert_round_trip(tmp_path / "multi", tokenizer, texts)
    # Merging again is allowed (the merged index is derived); a missing job is named.
    assert main(["merge", str(tmp_path / "multi")]) == 0
    assert main(["merge", str(tmp_path / "multi"), "--expect-jobs", "4"]) == 2


# ---------------------------------------------------------------------------------------------
# Existing output, bad input, user errors


def test_if_exists_error_then_overwrite_never_duplicates(tmp_path, tokenizer, paragraphs, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:100])
    out = tmp_path / "ds"
    assert main(shard_args([src], tokenizer, out)) == 0
    first = read_pieces(out / "train")
    capsys.readouterr()
    assert main(shard_args([src], tokenizer, out)) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--if-exists overwrite" in err and "Traceback" not in err, err
    assert main(shard_args([src], tokenizer, out, "--if-exists", "overwrite")) == 0
    assert read_pieces(out / "train") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "ds"]


def test_bad_input_is_counted_with_file_and_line(tmp_path, tokenizer, paragraphs, capsys):
    src = tmp_path / "docs.jsonl"
    good = paragraphs[:20]
    lines = [json.dumps({"text": t}) for t in good]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"body": "no text field"}))
    src.write_text("\n".join(lines) + "\n")
    summary = shard(ShardConfig(inputs=[str(src)], tokenizer=str(tokenizer.path),
                                out=str(tmp_path / "ds"), max_seq_len=MAX_SEQ_LEN,
                                val_fraction=VAL_FRACTION, progress=False))
    assert summary.documents == 20 and summary.skips.total == 2, summary.summary_lines()
    text = "\n".join(summary.summary_lines())
    assert f"{src}:4: invalid_json" in text and f"{src}:8: missing_field" in text, text
    assert_round_trip(tmp_path / "ds", tokenizer, good)

    rc = main(shard_args([src], tokenizer, tmp_path / "strict", "--strict"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}:4: invalid_json" in err and "Traceback" not in err, err
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_unencodable_or_too_deep_records_are_skipped_with_file_and_line(tmp_path, tokenizer,
                                                                       paragraphs, capsys):
    """Valid JSON the tokenizer cannot take (a lone surrogate) or the parser cannot nest (deep
    arrays) is a counted skip, or the strict-mode stop, never a traceback."""
    src = tmp_path / "docs.jsonl"
    good = paragraphs[:20]
    lines = [json.dumps({"text": t}) for t in good]
    lines.insert(2, '{"text": "bad \\ud800 x"}')
    lines.insert(5, "[" * 100_000 + "]" * 100_000)
    src.write_text("\n".join(lines) + "\n")
    assert main(shard_args([src], tokenizer, tmp_path / "ds")) == 0
    out = capsys.readouterr().out
    assert f"{src}:3: invalid_unicode" in out and f"{src}:6: invalid_json" in out, out
    assert_round_trip(tmp_path / "ds", tokenizer, good)

    rc = main(shard_args([src], tokenizer, tmp_path / "strict", "--strict"))
    err = capsys.readouterr().err
    assert rc == 2 and f"{src}:3: invalid_unicode" in err and "Traceback" not in err, err
    assert not (tmp_path / "strict").exists()


def bad_jsonl(path: Path) -> Path:
    path.write_text('{"text": "fine"}\n{not json\n')
    return path


def test_failed_overwrite_keeps_the_old_output_and_merged_index(tmp_path, tokenizer, paragraphs,
                                                                 caplog, capsys):
    """--if-exists overwrite replaces output only once the new output is complete: a run that
    fails keeps the old dataset (and a job keeps the merged index of the earlier jobs), and says
    nothing about removing it."""
    src = write_jsonl(tmp_path / "docs.jsonl", paragraphs[:100])
    bad = bad_jsonl(tmp_path / "bad.jsonl")
    assert main(shard_args([src], tokenizer, tmp_path / "ds")) == 0
    before = read_pieces(tmp_path / "ds" / "train")
    caplog.clear()
    assert main(shard_args([bad], tokenizer, tmp_path / "ds", "--strict", "--if-exists", "overwrite")) == 2
    assert "bad.jsonl:2: invalid_json" in capsys.readouterr().err
    assert read_pieces(tmp_path / "ds" / "train") == before
    assert not [r.message for r in caplog.records if "existing output" in r.message], caplog.text

    jobs = tmp_path / "jobs"
    for job in range(2):
        assert main(shard_args([src], tokenizer, jobs, "--num-jobs", "2", "--job-index", str(job))) == 0
    assert main(["merge", str(jobs), "--expect-jobs", "2"]) == 0
    merged = read_pieces(jobs / "train")
    caplog.clear()
    assert main(shard_args([bad], tokenizer, jobs, "--num-jobs", "2", "--job-index", "0",
                           "--strict", "--if-exists", "overwrite")) == 2
    assert (jobs / "train" / "index.json").is_file(), "a failed job removed the merged index"
    assert read_pieces(jobs / "train") == merged
    assert not [r.message for r in caplog.records if "existing output" in r.message], caplog.text
    # A job that succeeds does invalidate the merged index (it no longer matches the jobs).
    assert main(shard_args([src], tokenizer, jobs, "--num-jobs", "2", "--job-index", "0",
                           "--if-exists", "overwrite")) == 0
    assert not (jobs / "train" / "index.json").exists()
    assert any("index.json" in r.message for r in caplog.records), caplog.text


def test_merge_refuses_job_folders_of_another_run(tmp_path, tokenizer, paragraphs, caplog, capsys):
    """Job folders left by an earlier run with more --num-jobs would duplicate documents: the
    job that sees them warns, and merge refuses them by name."""
    files = [write_jsonl(tmp_path / f"part{i}.jsonl", paragraphs[i * 30:(i + 1) * 30]) for i in range(3)]
    out = tmp_path / "jobs"
    for job in range(3):
        assert main(shard_args(files, tokenizer, out, "--num-jobs", "3", "--job-index", str(job))) == 0
    caplog.clear()
    for job in range(2):
        assert main(shard_args(files, tokenizer, out, "--num-jobs", "2", "--job-index", str(job),
                               "--if-exists", "overwrite")) == 0
    warned = [r.message for r in caplog.records if "job-00002" in r.message]
    assert warned, caplog.text
    capsys.readouterr()
    assert main(["merge", str(out), "--expect-jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert "job-00002" in err and "Traceback" not in err, err
    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "job-00002" in err and "num_jobs" in err, err
    assert not (out / "train" / "index.json").exists()


def test_readme_shard_command_parses(tmp_path):
    """The README's `modernbert-shard --input ...` line is a valid command line (parsed only), and
    inputs come either positionally or with --input, never both or neither."""
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^modernbert-shard --input .*?[^\\]$", readme, re.M | re.S)
    assert match, "README has no `modernbert-shard --input` command"
    argv = shlex.split(match.group(0).replace("\\\n", " "))[1:]
    args = _parse_shard_args(argv)
    assert args["inputs"] == ["corpus/**/*.jsonl.zst"] and args["text_field"] == "text", args
    base = ["--tokenizer", "t", "--out", "o"]
    assert _parse_shard_args(["a", "b", *base])["inputs"] == ["a", "b"]
    assert _parse_shard_args([*base, "--input", "a", "b"])["inputs"] == ["a", "b"]
    for argv in (base, ["a", *base, "--input", "b"]):
        with pytest.raises(SystemExit) as info:
            _parse_shard_args(argv)
        assert info.value.code == 2, argv


@pytest.mark.parametrize("case", ["missing_input", "bad_tokenizer", "bad_job_index",
                                  "bad_pack_buffer"])
def test_user_errors_exit_2_with_a_message(tmp_path, tokenizer, case, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", ["hello world"])
    args = {"missing_input": [str(tmp_path / "nope.jsonl"), "--tokenizer", str(tokenizer.path)],
            "bad_tokenizer": [str(src), "--tokenizer", str(tmp_path / "no_tokenizer")],
            "bad_job_index": [str(src), "--tokenizer", str(tokenizer.path), "--num-jobs", "2",
                              "--job-index", "2"],
            "bad_pack_buffer": [str(src), "--tokenizer", str(tokenizer.path),
                                "--pack-buffer-docs", "0"]}[case]
    assert main([*args, "--out", str(tmp_path / "ds"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    needle = {"missing_input": "nope.jsonl", "bad_tokenizer": "no_tokenizer",
              "bad_job_index": "--job-index", "bad_pack_buffer": "--pack-buffer-docs"}[case]
    assert err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "ds").exists()


def test_out_of_vocab_ids_are_refused(tmp_path, tokenizer, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", ["hello world"])
    monkeypatch.setattr(TextTokenizer, "encode_batch",
                        lambda self, texts: [np.array([5, 5000], np.int32) for _ in texts])
    assert main(shard_args([src], tokenizer, tmp_path / "ds")) == 2
    err = capsys.readouterr().err
    assert "token id 5000 >= vocabulary size 1024" in err, err
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------
# S3


def test_s3_round_trip(s3_server, tmp_path, tokenizer, paragraphs, capsys):
    texts = paragraphs[:200]
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    remote = "s3://test-bucket/ds"
    assert main(shard_args([src], tokenizer, remote)) == 0
    stored = s3_server.root / "test-bucket" / "ds"
    assert (stored / "train" / "index.json").is_file() and (stored / "val" / META_FILENAME).is_file()
    assert read_meta(f"{remote}/val").split == "val"
    expected = expected_pieces(tokenizer, texts)
    for split in ("train", "val"):
        got = read_pieces(tmp_path / "cache" / split, f"{remote}/{split}")
        assert got == expected[split], (split, sum(got.values()), sum(expected[split].values()))
    capsys.readouterr()
    assert main(shard_args([src], tokenizer, remote)) == 2
    assert remote in capsys.readouterr().err
    assert main(shard_args([src], tokenizer, remote, "--if-exists", "overwrite")) == 0
    assert read_pieces(tmp_path / "cache2" / "train", f"{remote}/train") == expected["train"]


def s3_objects(s3_server, prefix: str) -> list[str]:
    root = s3_server.root / "test-bucket"
    return sorted(str(p.relative_to(root)) for p in (root / prefix).rglob("*") if p.is_file())


def test_s3_overwrite_replaces_only_after_success(s3_server, tmp_path, tokenizer, paragraphs, capsys):
    """On S3 as locally, a failed --if-exists overwrite run keeps the old dataset whole; a
    successful one leaves only the new dataset's objects."""
    old, new = paragraphs[:100], paragraphs[100:160]
    remote = "s3://test-bucket/ds"
    assert main(shard_args([write_jsonl(tmp_path / "old.jsonl", old)], tokenizer, remote)) == 0
    objects = s3_objects(s3_server, "ds")
    bad = bad_jsonl(tmp_path / "bad.jsonl")
    assert main(shard_args([bad], tokenizer, remote, "--strict", "--if-exists", "overwrite")) == 2
    assert "bad.jsonl:2: invalid_json" in capsys.readouterr().err
    assert s3_objects(s3_server, "ds") == objects
    got = read_pieces(tmp_path / "cache" / "train", f"{remote}/train")
    assert got == expected_pieces(tokenizer, old)["train"], (sum(got.values()),)

    assert main(shard_args([write_jsonl(tmp_path / "new.jsonl", new)], tokenizer, remote,
                           "--if-exists", "overwrite")) == 0
    expected = expected_pieces(tokenizer, new)
    for split in ("train", "val"):
        got = read_pieces(tmp_path / "cache2" / split, f"{remote}/{split}")
        assert got == expected[split], (split, sum(got.values()), sum(expected[split].values()))
        index = json.loads((s3_server.root / "test-bucket" / "ds" / split / "index.json").read_text())
        shards = {s["zip_data"]["basename"] for s in index["shards"]}
        parts = {name.split("/")[0] for name in shards}
        allowed = shards | {f"{p}/index.json" for p in parts} | {"index.json", META_FILENAME}
        stored = {o[len(f"ds/{split}/"):] for o in s3_objects(s3_server, f"ds/{split}")}
        assert shards <= stored <= allowed, (split, sorted(stored - allowed), sorted(shards - stored))


def test_s3_jobs_merge(s3_server, tmp_path, tokenizer, paragraphs):
    texts = paragraphs[:200]
    files = [write_jsonl(tmp_path / f"part{i}.jsonl", texts[i::3]) for i in range(3)]
    remote = "s3://test-bucket/jobs"
    for job in range(2):
        assert main(shard_args(files, tokenizer, remote, "--num-jobs", "2", "--job-index", str(job))) == 0
    assert not (s3_server.root / "test-bucket" / "jobs" / "train" / "index.json").exists()
    assert main(["merge", remote, "--expect-jobs", "2"]) == 0
    expected = expected_pieces(tokenizer, texts)
    for split in ("train", "val"):
        got = read_pieces(tmp_path / "cache" / split, f"{remote}/{split}")
        assert got == expected[split], (split, sum(got.values()), sum(expected[split].values()))


# ---------------------------------------------------------------------------------------------
# Demo assets (data/demo.py)


def test_demo_assets_are_built_once_and_safe_concurrently(tmp_path):
    from modernbert_train.data.demo import ensure_demo_assets

    results, errors = [], []

    def build() -> None:
        try:
            results.append(ensure_demo_assets(tmp_path / "demo", max_seq_len=64, vocab_size=512))
        except Exception as exc:  # surfaced below with the thread's error
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1], (errors, results)
    assets = results[0]
    index = assets.data_dir / "train" / "index.json"
    mtime_ns = index.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_demo_assets(tmp_path / "demo", max_seq_len=64, vocab_size=512) == assets
    assert time.perf_counter() - start < 2.0
    assert index.stat().st_mtime_ns == mtime_ns, "a complete demo dataset was rebuilt"
    val = read_meta(str(assets.data_dir / "val"))
    assert val.max_seq_len == 64 and val.vocab_size == 512, val
    assert json.loads((assets.data_dir / "val" / "index.json").read_text())["shards"], "empty val"
