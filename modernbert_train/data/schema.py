"""The MDS contract between the shard writer and the training reader: column names and encodings,
and the `modernbert_meta.json` file written next to each split's `index.json`."""
from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

SCHEMA_VERSION = 1
META_FILENAME = "modernbert_meta.json"
INDEX_FILENAME = "index.json"  # Streaming's own index file name (streaming.base.util.get_index_basename)

INPUT_IDS_COLUMN = "input_ids"
DOC_LENS_COLUMN = "doc_lens"
DOC_IDS_COLUMN = "doc_ids"
DOC_LENS_DTYPE = "int32"
DOC_IDS_DTYPE = "int64"
SPLITS = ("train", "val")

_UINT16_VOCAB_LIMIT = 1 << 16  # ids 0..65535 fit uint16


def token_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned dtype holding every id of a vocabulary of `vocab_size`."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= _UINT16_VOCAB_LIMIT else "uint32"


def mds_columns(token_dtype: str) -> dict[str, str]:
    """MDSWriter `columns=` for a dataset whose token ids are stored as `token_dtype`."""
    if token_dtype not in ("uint16", "uint32"):
        raise ValueError(f"token dtype must be uint16 or uint32, got {token_dtype!r}")
    return {
        INPUT_IDS_COLUMN: f"ndarray:{token_dtype}",
        DOC_LENS_COLUMN: f"ndarray:{DOC_LENS_DTYPE}",
        DOC_IDS_COLUMN: f"ndarray:{DOC_IDS_DTYPE}",
    }


@dataclass(frozen=True)
class DatasetMeta:
    """What a reader must know about a sharded split before training on it."""

    max_seq_len: int
    vocab_size: int  # padded to a multiple of 64: the model's embedding rows
    tokenizer_vocab_size: int
    special_ids: dict[str, int]  # cls, sep, mask, pad, unk
    tokenizer_sha256: str
    dtype: str  # of input_ids
    split: str
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, *, location: str = "<string>") -> DatasetMeta:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{location}: not valid JSON ({exc})") from exc
        expected = {f for f in cls.__dataclass_fields__}
        missing = sorted(expected - set(raw))
        unknown = sorted(set(raw) - expected)
        if missing or unknown:
            raise ValueError(f"{location}: dataset metadata has missing keys {missing} / unknown "
                             f"keys {unknown}")
        if raw["schema_version"] != SCHEMA_VERSION:
            raise ValueError(f"{location}: schema_version {raw['schema_version']} is not supported "
                             f"(this code reads version {SCHEMA_VERSION}); re-shard the data")
        raw["special_ids"] = {str(k): int(v) for k, v in raw["special_ids"].items()}
        return cls(**raw)


def is_remote(root: str) -> bool:
    return urllib.parse.urlparse(str(root)).scheme not in ("", "file")


_S3_CLIENTS: dict[tuple[str | None, ...], object] = {}


def s3_client():
    """A boto3 S3 client honoring the endpoint variables Streaming (S3_ENDPOINT_URL) and boto3
    (AWS_ENDPOINT_URL_S3) read, so both see the same server. Cached per endpoint and credentials
    (creating a client loads botocore's service model: most of a second)."""
    import boto3

    endpoint = os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    key = (endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY"),
           os.environ.get("AWS_DEFAULT_REGION"), os.environ.get("AWS_PROFILE"))
    if key not in _S3_CLIENTS:
        _S3_CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint)
    return _S3_CLIENTS[key]


def split_s3_url(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix") without a trailing slash."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3":
        raise ValueError(f"only s3:// remotes are supported, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


def write_meta(root: str, meta: DatasetMeta) -> str:
    """Write `meta` as META_FILENAME into the split folder `root` (local or s3://); returns where."""
    location = _join(root, META_FILENAME)
    if is_remote(root):
        bucket, prefix = split_s3_url(root)
        s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{META_FILENAME}",
                               Body=meta.to_json().encode("utf-8"))
        return location
    Path(root).mkdir(parents=True, exist_ok=True)
    partial = Path(root) / f".{META_FILENAME}.{os.getpid()}.tmp"
    partial.write_text(meta.to_json(), encoding="utf-8")
    os.replace(partial, location)
    return location


def read_meta(root: str) -> DatasetMeta:
    """The metadata of the split folder `root`: a local directory or an s3://bucket/prefix."""
    location = _join(str(root), META_FILENAME)
    if not is_remote(str(root)):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"no {META_FILENAME} at {location}: is {root} a split folder "
                                    f"(e.g. OUT/train) written by modernbert-shard?")
        return DatasetMeta.from_json(path.read_text(encoding="utf-8"), location=location)
    from botocore.exceptions import ClientError

    bucket, prefix = split_s3_url(str(root))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, META_FILENAME)
        try:
            s3_client().download_file(bucket, f"{prefix}/{META_FILENAME}", local)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise FileNotFoundError(f"no {META_FILENAME} at {location}: is {root} a split "
                                        f"folder written by modernbert-shard?") from exc
            raise
        text = Path(local).read_text(encoding="utf-8")
    return DatasetMeta.from_json(text, location=location)
