"""Input readers for the sharding and tokenizer CLIs: plain text, JSONL, Parquet and HF datasets on
disk, from files, globs or directories, gzip / zstd aware, with bad input counted by file, line and
reason (or raised, in strict mode)."""
from __future__ import annotations

import glob
import gzip
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import zstandard

log = logging.getLogger(__name__)

FORMATS = ("text", "jsonl", "parquet", "hf")
TextUnit = Literal["line", "paragraph", "file"]
# Paragraphs are the default unit for plain text: prose files wrap lines at a fixed width, and a
# line-per-document split would cut sentences apart. Corpora with one document per line should be
# JSONL, or read with text_unit="line"; a long document is split by the packer anyway.
DEFAULT_TEXT_UNIT: TextUnit = "paragraph"

_SUFFIX_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl",
                   ".ndjson": "jsonl", ".parquet": "parquet"}
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
# save_to_disk writes dataset_info.json + state.json for a Dataset, dataset_dict.json for a
# DatasetDict: either folder is one HF input, never walked as a directory of files.
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_READ_CHUNK_BYTES = 1 << 20
_RECORD_BATCH_ROWS = 4096


class BadInputError(ValueError):
    """Bad input in strict mode (or an unusable file): the message names the file and line."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    line: int  # 1-based first line for text / JSONL; 0-based row index for Parquet / HF datasets


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # one of FORMATS

    @property
    def compression(self) -> str | None:
        """"gzip", "zstd" or None, from the file suffix (text and JSONL only)."""
        return _COMPRESSION_SUFFIXES.get(Path(self.path).suffix.lower())


@dataclass(frozen=True)
class SkipExample:
    source: str
    line: int
    reason: str
    detail: str = ""


@dataclass
class SkipReport:
    """Skipped input: a count per reason and the first `max_examples` cases. Picklable."""

    counts: Counter = field(default_factory=Counter)
    examples: list[SkipExample] = field(default_factory=list)
    max_examples: int = 20

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, source: str, line: int, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(SkipExample(source, line, reason, detail))

    def merge(self, other: SkipReport) -> None:
        self.counts.update(other.counts)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])

    def summary_lines(self) -> list[str]:
        if not self.counts:
            return ["skipped: none"]
        lines = [f"skipped: {self.total} ("
                 + ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items())) + ")"]
        for ex in self.examples:
            detail = f": {ex.detail}" if ex.detail else ""
            lines.append(f"  {ex.source}:{ex.line}: {ex.reason}{detail}")
        return lines


# ---------------------------------------------------------------------------------------------
# Finding inputs


def _detect_format(path: Path) -> str | None:
    if path.is_dir():
        return "hf" if any((path / m).is_file() for m in _HF_MARKERS) else None
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None


def _walk_dir(root: Path, fmt: str) -> list[InputFile]:
    """Inputs under a plain directory. With `fmt="auto"`, files of unknown type (READMEs, _SUCCESS
    markers) are skipped with a log line; a forced format applies to every file. HF dataset
    folders are taken whole, never descended into."""
    found: list[InputFile] = []
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        detected = _detect_format(child)
        if child.is_dir() and detected != "hf":
            found.extend(_walk_dir(child, fmt))
        elif detected is None and fmt == "auto":
            log.info("skipping %s: unknown input type", child)
        else:
            found.append(InputFile(str(child), detected if fmt == "auto" else fmt))
    return found


def expand_inputs(paths: Sequence[str], fmt: str = "auto") -> list[InputFile]:
    """Files, globs and directories (searched recursively) -> inputs in a deterministic order.

    `fmt="auto"` detects the format from the suffix (compression suffix ignored) or, for a folder,
    from HF `save_to_disk` markers; any other value of FORMATS forces it for every file.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; expected 'auto' or one of {FORMATS}")
    inputs: list[InputFile] = []
    for spec in paths:
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches:
            raise ValueError(f"input {spec!r} matches no file")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise ValueError(f"input {match!r} does not exist")
            detected = _detect_format(path)
            if path.is_dir() and detected != "hf":
                found = _walk_dir(path, fmt)
                if not found:
                    raise ValueError(f"input directory {match!r} contains no readable input "
                                     f"(suffixes {sorted(_SUFFIX_FORMATS)}, or HF datasets)")
                inputs.extend(found)
            elif fmt != "auto":
                inputs.append(InputFile(str(path), fmt))
            elif detected is None:
                raise ValueError(f"cannot tell the format of input {match!r}: use a suffix in "
                                 f"{sorted(_SUFFIX_FORMATS)} (optionally .gz / .zst) or pass "
                                 "a format")
            else:
                inputs.append(InputFile(str(path), detected))
    # A file named twice (glob + dir, relative + absolute, via a symlink) is read once, under the
    # first name given.
    seen: set[Path] = set()
    unique = []
    for f in inputs:
        resolved = Path(f.path).resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(f)
    return unique


# ---------------------------------------------------------------------------------------------
# Reading


class _Skip(NamedTuple):
    line: int
    reason: str
    detail: str = ""


class _CorruptStream(Exception):
    def __init__(self, line: int, detail: str):
        super().__init__(detail)
        self.line = line
        self.detail = detail


def _zstd_chunks(fh) -> Iterator[bytes]:
    """Decompressed zstd chunks; raises EOFError on a truncated stream, which the library's own
    stream reader reports as a clean end of file."""
    decompressor = zstandard.ZstdDecompressor()
    obj = decompressor.decompressobj()
    in_frame = False
    while raw := fh.read(_READ_CHUNK_BYTES):
        while raw:
            in_frame = True
            out = obj.decompress(raw)
            if out:
                yield out
            raw = b""
            if obj.eof:  # frame finished; concatenated frames continue in unused_data
                in_frame = False
                raw = obj.unused_data
                obj = decompressor.decompressobj()
    if in_frame:
        raise EOFError("zstd stream ended before the end of its frame")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part + b"\n"
    if rest:
        yield rest


def _raw_lines(f: InputFile) -> Iterator[bytes]:
    if f.compression == "gzip":
        with gzip.open(f.path, "rb") as fh:
            yield from fh
    elif f.compression == "zstd":
        with open(f.path, "rb") as fh:
            yield from _split_lines(_zstd_chunks(fh))
    else:
        with open(f.path, "rb") as fh:
            yield from fh


def _lines(f: InputFile) -> Iterator[tuple[int, str | None]]:
    """(1-based line number, text without its newline, or None when not valid UTF-8). A leading
    byte order mark (Windows editors write one) is dropped: it belongs to no record."""
    line_no = 0
    try:
        for line_no, raw in enumerate(_raw_lines(f), start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield line_no, None
                continue
            yield line_no, text[1:] if line_no == 1 and text.startswith("\ufeff") else text
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
        raise _CorruptStream(line_no + 1, f"{type(exc).__name__}: {exc}") from exc


def _read_text(f: InputFile, unit: TextUnit) -> Iterator[Document | _Skip]:
    # Blank lines separate documents in every unit; they are not counted as empty documents.
    if unit == "line":
        for line_no, text in _lines(f):
            if text is None:
                yield _Skip(line_no, "invalid_utf8")
            elif text.strip():
                yield Document(text, f.path, line_no)
        return
    if unit not in ("paragraph", "file"):
        raise ValueError(f"unknown text_unit {unit!r}; expected 'line', 'paragraph' or 'file'")
    start, parts, bad_line = 0, [], 0
    for line_no, text in _lines(f):
        if unit == "paragraph" and text is not None and not text.strip():
            if bad_line:
                yield _Skip(bad_line, "invalid_utf8")
            elif parts:
                yield Document("\n".join(parts), f.path, start)
            start, parts, bad_line = 0, [], 0
            continue
        start = start or line_no
        if text is None:
            bad_line = bad_line or line_no
        else:
            parts.append(text)
    if bad_line:
        yield _Skip(bad_line, "invalid_utf8")
    elif parts:
        yield Document("\n".join(parts), f.path, start or 1)
    elif unit == "file":
        yield Document("", f.path, 1)  # an empty file is an empty document


def _read_jsonl(f: InputFile, text_field: str) -> Iterator[Document | _Skip]:
    for line_no, line in _lines(f):
        if line is None:
            yield _Skip(line_no, "invalid_utf8")
            continue
        if not line.strip():
            continue  # blank separator lines are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _Skip(line_no, "invalid_json", str(exc))
            continue
        except RecursionError:  # valid JSON nested deeper than the parser's recursion limit
            yield _Skip(line_no, "invalid_json", "nested too deeply")
            continue
        if not isinstance(record, dict):
            yield _Skip(line_no, "not_a_json_object", type(record).__name__)
        elif text_field not in record or record[text_field] is None:
            yield _Skip(line_no, "missing_field", f"no {text_field!r}")
        elif not isinstance(record[text_field], str):
            yield _Skip(line_no, "non_string_field",
                        f"{text_field!r} is {type(record[text_field]).__name__}")
        else:
            yield Document(record[text_field], f.path, line_no)


def _column_rows(column, source: str, first_row: int) -> Iterator[Document | _Skip]:
    """Rows of one Arrow string column batch. Arrow does not validate UTF-8 when reading a file, so
    a row that does not decode is a skip of its own (found row by row: to_pylist fails whole)."""
    try:
        values = column.to_pylist()
    except UnicodeDecodeError:
        values = []
        for offset in range(len(column)):
            try:
                values.append(column[offset].as_py())
            except UnicodeDecodeError:
                values.append(_Skip(first_row + offset, "invalid_utf8"))
    for offset, value in enumerate(values):
        if isinstance(value, _Skip):
            yield value
        elif value is None:
            yield _Skip(first_row + offset, "missing_field", "null")
        else:
            yield Document(value, source, first_row + offset)


def _read_parquet(f: InputFile, text_field: str) -> Iterator[Document | _Skip]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as exc:
        raise BadInputError(f"{f.path}: not a readable Parquet file ({exc})") from exc
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise BadInputError(f"{f.path}: no column {text_field!r}; columns are {schema.names}")
    column_type = schema.field(text_field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise BadInputError(f"{f.path}: column {text_field!r} is {column_type}, not a string")
    row = 0
    for batch in parquet.iter_batches(batch_size=_RECORD_BATCH_ROWS, columns=[text_field]):
        yield from _column_rows(batch.column(0), f.path, row)
        row += batch.num_rows


def _read_hf(f: InputFile, text_field: str) -> Iterator[Document | _Skip]:
    try:
        import datasets
    except ImportError as exc:
        raise BadInputError(f"{f.path}: reading HF datasets needs `pip install datasets`") from exc
    dataset = datasets.load_from_disk(f.path)
    if isinstance(dataset, datasets.DatasetDict):
        raise BadInputError(f"{f.path}: is a DatasetDict; pass one split's folder "
                            f"(splits: {sorted(dataset)})")
    if text_field not in dataset.column_names:
        raise BadInputError(f"{f.path}: no column {text_field!r}; "
                            f"columns are {dataset.column_names}")
    feature = dataset.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise BadInputError(f"{f.path}: column {text_field!r} is {feature}, not a string")
    row = 0
    columns = dataset.select_columns([text_field]).with_format("arrow")
    for batch in columns.iter(batch_size=_RECORD_BATCH_ROWS):
        yield from _column_rows(batch.column(0), f.path, row)
        row += batch.num_rows


def _unencodable(text: str) -> str:
    """Why `text` cannot be written as UTF-8 (a lone surrogate: JSON's "\\ud800" escape decodes to
    one), or "" when it can. The tokenizer and the document hash both need UTF-8."""
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    return ""


def read_documents(f: InputFile, *, text_field: str = "text",
                   text_unit: TextUnit = DEFAULT_TEXT_UNIT, strict: bool = False,
                   skips: SkipReport) -> Iterator[Document]:
    """Documents of one input. Bad records (invalid UTF-8, invalid JSON, missing or non-string
    field, text with a lone surrogate, empty text, a truncated or corrupt compressed stream) are
    counted in `skips` with file, line and reason, or raise BadInputError when `strict`. A file that cannot be read at all
    (missing column, not Parquet) raises BadInputError in either mode."""
    if f.format == "text":
        items = _read_text(f, text_unit)
    elif f.format == "jsonl":
        items = _read_jsonl(f, text_field)
    elif f.format == "parquet":
        items = _read_parquet(f, text_field)
    elif f.format == "hf":
        items = _read_hf(f, text_field)
    else:
        raise ValueError(f"{f.path}: unknown input format {f.format!r}; expected one of {FORMATS}")

    def skip(line: int, reason: str, detail: str = "") -> None:
        if strict:
            suffix = f" ({detail})" if detail else ""
            raise BadInputError(f"{f.path}:{line}: {reason}{suffix}")
        skips.add(f.path, line, reason, detail)

    try:
        for item in items:
            if isinstance(item, _Skip):
                skip(*item)
            elif not item.text.strip():
                skip(item.line, "empty_document")
            elif reason := _unencodable(item.text):
                skip(item.line, "invalid_unicode", reason)
            else:
                yield item
    except _CorruptStream as exc:
        skip(exc.line, "corrupt_stream", exc.detail)
    except FileNotFoundError as exc:
        # datasets.load_from_disk raises it with only a message (strerror None)
        raise BadInputError(f"{f.path}: {exc.strerror or exc}") from exc


def iter_documents(inputs: Sequence[InputFile], *, text_field: str = "text",
                   text_unit: TextUnit = DEFAULT_TEXT_UNIT, strict: bool = False,
                   skips: SkipReport) -> Iterator[Document]:
    """Documents of several inputs, in order."""
    for f in inputs:
        yield from read_documents(f, text_field=text_field, text_unit=text_unit, strict=strict,
                                  skips=skips)
