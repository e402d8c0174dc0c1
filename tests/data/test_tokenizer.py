"""Tests for data/tokenizer.py: BPE training, loading, special ids read from the tokenizer."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from modernbert_train.data.corpus import embedded_documents, write_embedded_corpus
from modernbert_train.data.tokenizer import (SpecialIds, TextTokenizer, main, round_up_to_multiple,
                                             train_bpe)

ROUND_TRIP_TEXTS = [
    "Hello world.",
    "def f(x):\n    return x ** 2  # tabs\tand  spaces",
    "ünïcödé, 中文, emoji 🙂",
    "a literal [MASK] and [SEP] in the text",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> TextTokenizer:
    return train_bpe(embedded_documents(), 1000, tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 64), (64, 64), (65, 128), (1000, 1024), (50257, 50304)])
def test_round_up_to_multiple(n, expected):
    assert round_up_to_multiple(n) == expected
    assert round_up_to_multiple(n, 8) == -(-n // 8) * 8


def test_trained_vocab_is_a_multiple_of_64_with_specials_first(trained):
    assert trained.tokenizer_vocab_size == 1024, trained.tokenizer_vocab_size
    assert trained.padded_vocab_size == 1024
    assert trained.special == SpecialIds(cls=0, sep=1, mask=2, pad=3, unk=4)
    assert trained.special_ids == (0, 1, 2, 3, 4)
    assert (trained.path.parent / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_encode_decode_round_trip_without_specials(trained, text):
    [ids] = trained.encode_batch([text])
    assert ids.dtype == np.int32
    assert not set(ids.tolist()) & set(trained.special_ids), ids
    assert trained.decode(ids) == text


def test_encode_batch_matches_single_encodes(trained):
    batch = trained.encode_batch(ROUND_TRIP_TEXTS)
    singles = [trained.encode_batch([t])[0] for t in ROUND_TRIP_TEXTS]
    assert [b.tolist() for b in batch] == [s.tolist() for s in singles]


def test_saved_file_adds_cls_sep_for_hf_users(trained):
    plain = Tokenizer.from_file(str(trained.path))
    ids = plain.encode("Hello world.").ids
    assert (ids[0], ids[-1]) == (0, 1), ids
    assert ids[1:-1] == trained.encode_batch(["Hello world."])[0].tolist()


def test_training_is_deterministic(trained, tmp_path):
    again = train_bpe(embedded_documents(), 1000, tmp_path / "again")
    assert again.sha256 == trained.sha256
    assert again.path.read_bytes() == trained.path.read_bytes()


def test_sha256_is_that_of_the_saved_json_and_survives_reload(trained, tmp_path):
    saved = trained.save(tmp_path / "copy" / "tokenizer.json")
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == trained.sha256
    assert TextTokenizer.load(saved).sha256 == trained.sha256
    assert TextTokenizer.load(saved.parent).sha256 == trained.sha256


def odd_tokenizer(vocab: dict[str, int]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_special_ids_are_read_not_assumed(tmp_path):
    vocab = {"<pad>": 0, "hello": 1, "world": 2, "</s>": 3, "x": 4, "<unk>": 5, "y": 6, "<s>": 7,
             "z": 8, "<mask>": 9}
    tok = odd_tokenizer(vocab)
    tok.add_special_tokens([AddedToken("<extra_special>", special=True)])  # gets id 10
    tok.add_tokens(["plainadded"])  # id 11: added but not special, so maskable
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = TextTokenizer.load(tmp_path)
    assert loaded.special == SpecialIds(cls=7, sep=3, mask=9, pad=0, unk=5)
    assert loaded.special_ids == (0, 3, 5, 7, 9, 10)
    assert loaded.tokenizer_vocab_size == 12
    assert loaded.padded_vocab_size == 64
    assert loaded.encode_batch(["hello world plainadded"])[0].tolist() == [1, 2, 11]


def test_missing_special_token_names_path_role_and_tried_names(tmp_path):
    path = tmp_path / "no_mask.json"
    odd_tokenizer({"[CLS]": 0, "[SEP]": 1, "[PAD]": 2, "[UNK]": 3, "a": 4}).save(str(path))
    with pytest.raises(ValueError, match=r"no_mask\.json has no mask token: tried \[MASK\], <mask>"):
        TextTokenizer.load(path)


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at .*expected a tokenizer.json"):
        TextTokenizer.load(tmp_path)


@pytest.mark.parametrize("lowercase_config, expected_tokens", [
    (None, ["hello", "world", "##s", "[UNK]"]),
    (False, ["[UNK]", "world", "##s", "[UNK]"]),
])
def test_wordpiece_vocab_folder(tmp_path, lowercase_config, expected_tokens):
    vocab = ["[PAD]", "foo", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if lowercase_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase_config}))
    tok = TextTokenizer.load(tmp_path)
    assert tok.special == SpecialIds(cls=3, sep=4, mask=5, pad=0, unk=2)
    assert tok.tokenizer_vocab_size == 9
    [ids] = tok.encode_batch(["Hello worlds zzz"])
    assert [vocab[i] for i in ids] == expected_tokens
    [literal] = tok.encode_batch(["[MASK]"])
    assert 5 not in literal.tolist(), literal  # text never becomes a special token


def test_cli_trains_from_a_jsonl_input(tmp_path, capsys):
    corpus = write_embedded_corpus(tmp_path / "corpus.jsonl")
    assert main(["train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    tok = TextTokenizer.load(tmp_path / "tok")
    assert tok.tokenizer_vocab_size == 320, tok.tokenizer_vocab_size
    assert f"vocab 320 (padded 320), {len(embedded_documents())} documents, 0 skipped" in out, out


def test_cli_strict_bad_input_is_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    argv = ["train", "--input", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    assert main([*argv, "--strict"]) == 2
    assert f"error: {bad}:2: non_string_field" in capsys.readouterr().err
    assert main(argv) == 0
    assert f"{bad}:2: non_string_field" in capsys.readouterr().err
