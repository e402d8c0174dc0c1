"""Tests for data/corpus.py: the embedded pydoc corpus."""
from __future__ import annotations

import json

from modernbert_train.data.corpus import embedded_documents, write_embedded_corpus
from modernbert_train.data.sources import InputFile, SkipReport, read_documents


def test_embedded_documents_are_many_nonempty_and_large_enough():
    docs = embedded_documents()
    size_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert len(docs) > 50, len(docs)
    assert size_bytes > 300_000, size_bytes
    assert all(d and d == d.strip() for d in docs)
    assert docs == embedded_documents(), "order must be deterministic"


def test_written_corpus_reads_back_and_is_idempotent(tmp_path):
    path = write_embedded_corpus(tmp_path / "demo" / "corpus.jsonl")
    skips = SkipReport()
    texts = [d.text for d in read_documents(InputFile(str(path), "jsonl"), skips=skips)]
    assert texts == embedded_documents()
    assert skips.total == 0, skips.summary_lines()

    mtime_ns = path.stat().st_mtime_ns
    assert write_embedded_corpus(path) == path
    assert path.stat().st_mtime_ns == mtime_ns, "an identical corpus must not be rewritten"

    path.write_text(json.dumps({"text": "stale"}) + "\n")
    write_embedded_corpus(path)
    assert path.read_text().count("\n") == len(embedded_documents())
    assert [p.name for p in path.parent.iterdir()] == ["corpus.jsonl"], "no temp files left behind"
