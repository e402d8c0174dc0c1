"""Tests for data/sources.py: formats, compression, input expansion and bad-input accounting."""
from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from modernbert_train.data import sources
from modernbert_train.data.sources import (BadInputError, InputFile, SkipReport, expand_inputs,
                                           read_documents)

TEXTS = ["first document", "second one\nwith two lines", "third: ünïcödé ✓"]


def jsonl_bytes(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write(path: Path, data: bytes) -> Path:
    """Write `data`, compressed according to the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    elif path.suffix in (".zst", ".zstd"):
        data = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    path.write_bytes(data)
    return path


def read_all(f: InputFile, **kwargs) -> tuple[list[sources.Document], SkipReport]:
    skips = SkipReport()
    docs = list(read_documents(f, skips=skips, **kwargs))
    return docs, skips


def save_hf_dataset(path: Path, texts: list) -> Path:
    datasets = pytest.importorskip("datasets", reason="HF datasets reader needs `datasets` (dev extra)")
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz", "data.ndjson.zst", "data.json.zstd"])
def test_jsonl_plain_and_compressed_read_the_same(tmp_path, name):
    path = write(tmp_path / name, jsonl_bytes([{"text": t, "id": i} for i, t in enumerate(TEXTS)]))
    [f] = expand_inputs([str(path)])
    assert f.format == "jsonl", f
    docs, skips = read_all(f)
    assert [d.text for d in docs] == TEXTS
    assert [d.line for d in docs] == [1, 2, 3]
    assert {d.source for d in docs} == {str(path)}
    assert skips.total == 0, skips.summary_lines()


def test_jsonl_custom_field_and_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"body": "a"}\n\n   \n{"body": "b"}\n')
    docs, skips = read_all(InputFile(str(path), "jsonl"), text_field="body")
    assert [(d.text, d.line) for d in docs] == [("a", 1), ("b", 4)]
    assert skips.total == 0, skips.summary_lines()


PLAIN = b"para one\nstill one\n\n\npara two\n  \nline six\r\nline seven\n"


@pytest.mark.parametrize("unit, expected", [
    ("line", [("para one", 1), ("still one", 2), ("para two", 5), ("line six", 7), ("line seven", 8)]),
    ("paragraph", [("para one\nstill one", 1), ("para two", 5), ("line six\nline seven", 7)]),
    ("file", [("para one\nstill one\n\n\npara two\n  \nline six\nline seven", 1)]),
])
@pytest.mark.parametrize("suffix", [".txt", ".txt.gz", ".text.zst"])
def test_text_units(tmp_path, unit, expected, suffix):
    path = write(tmp_path / f"plain{suffix}", PLAIN)
    [f] = expand_inputs([str(path)])
    assert f.format == "text", f
    docs, skips = read_all(f, text_unit=unit)
    assert [(d.text, d.line) for d in docs] == expected
    assert skips.total == 0, skips.summary_lines()


def test_parquet_rows_across_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_RECORD_BATCH_ROWS", 2)  # several batches for 5 rows
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["a", "b", None, "d", " "], "n": [1, 2, 3, 4, 5]}), path,
                   row_group_size=3)
    docs, skips = read_all(InputFile(str(path), "parquet"), text_field="content")
    assert [(d.text, d.line) for d in docs] == [("a", 0), ("b", 1), ("d", 3)]
    assert dict(skips.counts) == {"missing_field": 1, "empty_document": 1}
    assert [(e.line, e.reason) for e in skips.examples] == [(2, "missing_field"), (4, "empty_document")]


def test_parquet_string_that_is_not_utf8_is_a_skip_with_its_row(tmp_path, monkeypatch):
    """Arrow reads a string column's bytes unchecked: a row that does not decode is skipped with
    its row number, the rest of its batch kept."""
    monkeypatch.setattr(sources, "_RECORD_BATCH_ROWS", 2)
    raw = pa.array([b"a", b"b", b"bad \xff", b"d"], pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # no validation
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": column}), path)
    docs, skips = read_all(InputFile(str(path), "parquet"))
    assert [(d.text, d.line) for d in docs] == [("a", 0), ("b", 1), ("d", 3)], docs
    assert [(e.line, e.reason) for e in skips.examples] == [(2, "invalid_utf8")], skips.examples


def test_parquet_missing_or_non_string_column_raises_in_any_mode(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1, 2], "body": ["x", "y"]}), path)
    with pytest.raises(BadInputError, match=r"d\.parquet: no column 'missing'; columns are \['text', 'body'\]"):
        read_all(InputFile(str(path), "parquet"), text_field="missing")
    with pytest.raises(BadInputError, match=r"column 'text' is int64, not a string"):
        read_all(InputFile(str(path), "parquet"))


def test_not_a_parquet_file_names_the_file(tmp_path):
    path = write(tmp_path / "broken.parquet", b"this is not parquet")
    with pytest.raises(BadInputError, match="broken.parquet: not a readable Parquet file"):
        read_all(InputFile(str(path), "parquet"))


def test_hf_dataset_on_disk(tmp_path):
    path = save_hf_dataset(tmp_path / "ds", ["x", "", "z"])
    [f] = expand_inputs([str(path)])
    assert f == InputFile(str(path), "hf")
    docs, skips = read_all(f)
    assert [(d.text, d.line) for d in docs] == [("x", 0), ("z", 2)]
    assert [(e.line, e.reason) for e in skips.examples] == [(1, "empty_document")]
    with pytest.raises(BadInputError, match=r"no column 'body'; columns are \['text', 'n'\]"):
        read_all(f, text_field="body")
    with pytest.raises(BadInputError, match=r"column 'n' is .*int64.*not a string"):
        read_all(f, text_field="n")


def test_hf_dataset_dict_folder_is_refused_naming_its_splits(tmp_path):
    """A DatasetDict folder is one HF input (not a folder of splits plus a JSON file to read as
    JSONL), and reading it asks for one split, forced format or not."""
    datasets = pytest.importorskip("datasets", reason="HF datasets reader needs `datasets` (dev extra)")
    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]}),
                          "test": datasets.Dataset.from_dict({"text": ["c"]})}).save_to_disk(str(path))
    for fmt in ("auto", "hf"):
        found = expand_inputs([str(path)], fmt=fmt)
        assert found == [InputFile(str(path), "hf")], (fmt, found)
        with pytest.raises(BadInputError, match=r"dd: is a DatasetDict; pass one split's folder "
                                                r"\(splits: \['test', 'train'\]\)"):
            read_all(found[0])


def test_hf_format_on_a_file_says_why(tmp_path):
    path = write(tmp_path / "d.jsonl", jsonl_bytes([GOOD]))
    with pytest.raises(BadInputError) as info:
        read_all(InputFile(str(path), "hf"))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "None" not in message and "Dataset" in message, message


# ---------------------------------------------------------------------------------------------
# Finding inputs


def test_expand_directory_recursively_sorted_with_formats(tmp_path):
    root = tmp_path / "corpus"
    write(root / "b.jsonl.gz", b"")
    write(root / "a.txt", b"")
    write(root / "README.md", b"# not data")
    write(root / ".hidden.jsonl", b"")
    write(root / "sub" / "c.parquet", b"")
    write(root / "sub" / "deeper" / "d.ndjson.zst", b"")
    save_hf_dataset(root / "sub" / "hf", ["x"])
    found = [(str(Path(f.path).relative_to(root)), f.format) for f in expand_inputs([str(root)])]
    assert found == [("a.txt", "text"), ("b.jsonl.gz", "jsonl"), ("sub/c.parquet", "parquet"),
                     ("sub/deeper/d.ndjson.zst", "jsonl"), ("sub/hf", "hf")]


def test_expand_dedupes_one_file_under_several_spellings(tmp_path, monkeypatch):
    """Relative, absolute and symlinked names of one file are one input (read once), named as
    first given."""
    write(tmp_path / "in" / "a.txt", b"x")
    write(tmp_path / "in" / "b.txt", b"y")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    found = expand_inputs(["in/a.txt", str(tmp_path / "in" / "a.txt"), "link/a.txt", "in/*.txt",
                           "link"])
    assert [f.path for f in found] == ["in/a.txt", "in/b.txt"], found


def test_expand_globs_dedupes_and_keeps_argument_order(tmp_path):
    for name in ["x2.jsonl", "x1.jsonl", "y.txt"]:
        write(tmp_path / name, b"")
    found = expand_inputs([str(tmp_path / "y.txt"), str(tmp_path / "x*.jsonl"), str(tmp_path / "*.jsonl")])
    assert [Path(f.path).name for f in found] == ["y.txt", "x1.jsonl", "x2.jsonl"]


def test_forced_format_overrides_suffix(tmp_path):
    path = write(tmp_path / "dump.data.gz", b'{"text": "hi"}\n')
    [f] = expand_inputs([str(path)], fmt="jsonl")
    assert (f.format, f.compression) == ("jsonl", "gzip")
    assert [d.text for d in read_all(f)[0]] == ["hi"]


@pytest.mark.parametrize("spec, message", [
    ("nothing-here.jsonl", "does not exist"),
    ("no-match-*.jsonl", "matches no file"),
    ("notes.md", "cannot tell the format"),
    ("empty_dir", "contains no readable input"),
])
def test_expand_errors_name_the_path(tmp_path, spec, message):
    write(tmp_path / "notes.md", b"x")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=message) as info:
        expand_inputs([str(tmp_path / spec)])
    assert str(tmp_path / spec) in str(info.value)
    with pytest.raises(ValueError, match="unknown input format 'csv'"):
        expand_inputs([str(tmp_path / "notes.md")], fmt="csv")


# ---------------------------------------------------------------------------------------------
# Bad input

GOOD = {"text": "good"}
BAD_CASES = {
    # name: (file name, content, reason, line)
    "invalid_utf8_jsonl": ("d.jsonl", jsonl_bytes([GOOD]) + b'{"text": "caf\xe9"}\n' + jsonl_bytes([GOOD]),
                           "invalid_utf8", 2),
    "invalid_utf8_text": ("d.txt", b"good\n\nok\nbad \xff\xfe\n\ngood\n", "invalid_utf8", 4),
    "invalid_json": ("d.jsonl", jsonl_bytes([GOOD]) + b'{"text": "unterminated\n' + jsonl_bytes([GOOD]),
                     "invalid_json", 2),
    "not_an_object": ("d.jsonl", jsonl_bytes([GOOD, ["text"], GOOD]), "not_a_json_object", 2),
    "missing_field": ("d.jsonl", jsonl_bytes([GOOD, {"body": "x"}, GOOD]), "missing_field", 2),
    "null_field": ("d.jsonl", jsonl_bytes([GOOD, {"text": None}, GOOD]), "missing_field", 2),
    "non_string_field": ("d.jsonl", jsonl_bytes([GOOD, {"text": 5}, GOOD]), "non_string_field", 2),
    "empty_document": ("d.jsonl.gz", jsonl_bytes([GOOD, {"text": " \n\t"}, GOOD]), "empty_document", 2),
    "empty_file_unit": ("d.txt", b"\n  \n", "empty_document", 1),
    # Valid JSON whose string cannot be encoded (a lone surrogate): the tokenizer raises on it.
    "lone_surrogate": ("d.jsonl", jsonl_bytes([GOOD]) + b'{"text": "bad \\ud800 x"}\n' + jsonl_bytes([GOOD]),
                       "invalid_unicode", 2),
    # Nesting past the interpreter's recursion limit: json raises RecursionError, not a decode error.
    "deep_json": ("d.jsonl", jsonl_bytes([GOOD]) + b"[" * 100_000 + b"]" * 100_000 + b"\n" + jsonl_bytes([GOOD]),
                  "invalid_json", 2),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_is_counted_with_file_and_line(tmp_path, case):
    name, content, reason, line = BAD_CASES[case]
    path = write(tmp_path / name, content)
    [f] = expand_inputs([str(path)])
    unit = "file" if case == "empty_file_unit" else "paragraph"
    docs, skips = read_all(f, text_unit=unit)
    assert dict(skips.counts) == {reason: 1}, skips.summary_lines()
    assert (skips.examples[0].source, skips.examples[0].line) == (str(path), line), skips.examples
    assert all(d.text.strip() for d in docs)
    if unit != "file":
        assert len(docs) == 2, docs  # the good records around the bad one survive


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_in_strict_mode(tmp_path, case):
    name, content, reason, line = BAD_CASES[case]
    path = write(tmp_path / name, content)
    [f] = expand_inputs([str(path)])
    unit = "file" if case == "empty_file_unit" else "paragraph"
    with pytest.raises(BadInputError, match=f"{path}:{line}: {reason}"):
        read_all(f, text_unit=unit, strict=True)


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.jsonl.gz", "bom.txt"])
def test_leading_utf8_bom_is_dropped(tmp_path, name):
    """Editors on Windows start UTF-8 files with a byte order mark: it is not part of the first
    record (a JSONL record would fail to parse; a text document would carry an invisible char)."""
    body = jsonl_bytes([{"text": t} for t in TEXTS[:2]]) if ".jsonl" in name else b"one\n\ntwo\n"
    path = write(tmp_path / name, b"\xef\xbb\xbf" + body)
    [f] = expand_inputs([str(path)])
    docs, skips = read_all(f, strict=True)
    expected = TEXTS[:2] if ".jsonl" in name else ["one", "two"]
    assert [d.text for d in docs] == expected, [d.text for d in docs]
    assert skips.total == 0, skips.summary_lines()


def many_records(n: int) -> bytes:
    return jsonl_bytes([{"text": f"record number {i} " + "x" * (i % 50)} for i in range(n)])


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_truncated_stream_reports_line_reached(tmp_path, suffix):
    whole = write(tmp_path / f"whole.jsonl{suffix}", many_records(20_000))
    cut = tmp_path / f"cut.jsonl{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    docs, skips = read_all(InputFile(str(cut), "jsonl"))
    assert dict(skips.counts) == {"corrupt_stream": 1}, skips.summary_lines()
    reached = skips.examples[0].line
    assert 1 < reached < 20_000, reached
    assert [d.line for d in docs] == list(range(1, reached)), (len(docs), reached)
    with pytest.raises(BadInputError, match=rf"cut\.jsonl\{suffix}:{reached}: corrupt_stream"):
        read_all(InputFile(str(cut), "jsonl"), strict=True)


@pytest.mark.parametrize("suffix, error", [(".gz", "BadGzipFile"), (".zst", "ZstdError")])
def test_not_compressed_at_all_is_a_corrupt_stream_at_line_1(tmp_path, suffix, error):
    path = tmp_path / f"plain.jsonl{suffix}"
    path.write_bytes(jsonl_bytes([GOOD]))
    docs, skips = read_all(InputFile(str(path), "jsonl"))
    assert docs == []
    assert [(e.line, e.reason) for e in skips.examples] == [(1, "corrupt_stream")]
    assert error in skips.examples[0].detail, skips.examples[0]


def test_corrupt_zstd_checksum_is_detected(tmp_path):
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(many_records(100)))
    data[-2] ^= 0xFF  # the frame's content checksum
    path = tmp_path / "flipped.jsonl.zst"
    path.write_bytes(bytes(data))
    _, skips = read_all(InputFile(str(path), "jsonl"))
    assert dict(skips.counts) == {"corrupt_stream": 1}, skips.summary_lines()
    assert "checksum" in skips.examples[0].detail, skips.examples[0]


def test_concatenated_zstd_frames_are_one_stream(tmp_path):
    compress = zstandard.ZstdCompressor().compress
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(compress(jsonl_bytes([{"text": "a"}])) + compress(jsonl_bytes([{"text": "b"}])))
    docs, skips = read_all(InputFile(str(path), "jsonl"))
    assert [(d.text, d.line) for d in docs] == [("a", 1), ("b", 2)]
    assert skips.total == 0, skips.summary_lines()


# ---------------------------------------------------------------------------------------------
# SkipReport


def test_skip_report_merge_caps_examples_and_pickles():
    a, b = SkipReport(max_examples=3), SkipReport(max_examples=3)
    for line in (1, 2):
        a.add("a.jsonl", line, "invalid_json", "Expecting value")
    for line in (5, 6):
        b.add("b.jsonl", line, "empty_document")
    a.merge(pickle.loads(pickle.dumps(b)))
    assert dict(a.counts) == {"invalid_json": 2, "empty_document": 2}
    assert [(e.source, e.line) for e in a.examples] == [("a.jsonl", 1), ("a.jsonl", 2), ("b.jsonl", 5)]
    assert a.summary_lines() == [
        "skipped: 4 (empty_document=2, invalid_json=2)",
        "  a.jsonl:1: invalid_json: Expecting value",
        "  a.jsonl:2: invalid_json: Expecting value",
        "  b.jsonl:5: empty_document",
    ]
    assert SkipReport().summary_lines() == ["skipped: none"]
