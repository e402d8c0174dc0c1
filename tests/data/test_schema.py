"""The MDS contract: column encodings, dtype choice, and the metadata file (local and S3)."""
from __future__ import annotations

import json

import pytest

from modernbert_train.data.schema import (META_FILENAME, SCHEMA_VERSION, DatasetMeta, mds_columns,
                                          read_meta, token_dtype_for, write_meta)


def _meta(split: str = "train") -> DatasetMeta:
    return DatasetMeta(max_seq_len=1024, vocab_size=50368, tokenizer_vocab_size=50280,
                       special_ids={"cls": 0, "sep": 1, "mask": 2, "pad": 3, "unk": 4},
                       tokenizer_sha256="ab" * 32, dtype="uint16", split=split)


@pytest.mark.parametrize("vocab_size, expected", [(1, "uint16"), (50368, "uint16"),
                                                  (65536, "uint16"), (65537, "uint32"),
                                                  (262144, "uint32")])
def test_token_dtype_for(vocab_size, expected):
    assert token_dtype_for(vocab_size) == expected, (vocab_size, token_dtype_for(vocab_size))


def test_mds_columns_match_design():
    assert mds_columns("uint16") == {"input_ids": "ndarray:uint16", "doc_lens": "ndarray:int32",
                                     "doc_ids": "ndarray:int64"}
    assert mds_columns("uint32")["input_ids"] == "ndarray:uint32"
    with pytest.raises(ValueError, match="uint16 or uint32"):
        mds_columns("int64")


def test_meta_json_round_trip_has_the_design_keys():
    meta = _meta()
    raw = json.loads(meta.to_json())
    assert set(raw) == {"schema_version", "max_seq_len", "vocab_size", "tokenizer_vocab_size",
                        "special_ids", "tokenizer_sha256", "dtype", "split"}, sorted(raw)
    assert raw["schema_version"] == SCHEMA_VERSION
    assert DatasetMeta.from_json(meta.to_json()) == meta


def test_meta_rejects_unknown_keys_and_versions():
    raw = json.loads(_meta().to_json())
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        DatasetMeta.from_json(json.dumps({**raw, "extra": 1}), location="x/meta")
    with pytest.raises(ValueError, match="schema_version 99"):
        DatasetMeta.from_json(json.dumps({**raw, "schema_version": 99}))


def test_write_and_read_meta_local(tmp_path):
    split_dir = tmp_path / "ds" / "val"
    location = write_meta(str(split_dir), _meta("val"))
    assert location == str(split_dir / META_FILENAME)
    assert read_meta(str(split_dir)) == _meta("val")


def test_read_meta_missing_names_the_location(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing" / META_FILENAME)):
        read_meta(str(tmp_path / "nothing"))


def test_write_and_read_meta_s3(s3_server):
    write_meta("s3://test-bucket/ds/train", _meta())
    stored = s3_server.root / "test-bucket" / "ds" / "train" / META_FILENAME
    assert stored.is_file(), f"rclone did not store {stored}"
    assert read_meta("s3://test-bucket/ds/train") == _meta()
    with pytest.raises(FileNotFoundError, match=f"s3://test-bucket/ds/val/{META_FILENAME}"):
        read_meta("s3://test-bucket/ds/val")
