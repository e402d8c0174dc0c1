"""Tokenizers: train a byte-level BPE, load any `tokenizer.json` / HF tokenizer folder, with the
special-token ids read from the tokenizer and the vocabulary padded to a multiple of 64."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 64
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")  # ids 0..4 in a trained tokenizer
# Names tried for each role, first match wins: BERT style, RoBERTa style, then GPT style.
SPECIAL_NAMES: dict[str, tuple[str, ...]] = {
    "cls": ("[CLS]", "<s>", "<cls>", "<|endoftext|>"),
    "sep": ("[SEP]", "</s>", "<sep>", "<|endoftext|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "pad": ("[PAD]", "<pad>", "<|padding|>", "<|pad|>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>", "<|endoftext|>"),
}


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    mask: int
    pad: int
    unk: int

    def all(self) -> tuple[int, ...]:
        return astuple(self)


def round_up_to_multiple(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what training needs from it. `encode_batch` never adds
    [CLS]/[SEP] (the packer places them per document piece), never pads or truncates, and never
    turns literal "[SEP]"-like text in a document into a special token."""

    def __init__(self, tokenizer: Tokenizer, path: str | Path):
        self.path = Path(path)
        # Hash the tokenizer as given, before the encode-time settings below change its JSON.
        self._json = tokenizer.to_str()
        self.sha256 = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        self.special = _read_special_ids(tokenizer, self.path)
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._tokenizer.encode_special_tokens = True
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Embedding rows needed: the highest id + 1 (ids need not be contiguous).
        self.tokenizer_vocab_size = max(vocab.values()) + 1
        added = tokenizer.get_added_tokens_decoder()
        added_special = {i for i, tok in added.items() if tok.special}
        self.special_ids: tuple[int, ...] = tuple(sorted(added_special | set(self.special.all())))

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """A `tokenizer.json`, a folder holding one, or a WordPiece folder with a `vocab.txt`."""
        path = Path(path)
        if path.is_file():
            return cls(Tokenizer.from_file(str(path)), path)
        if (path / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(path / "tokenizer.json")), path)
        if (path / "vocab.txt").is_file():
            return cls(_wordpiece_from_folder(path), path)
        raise ValueError(f"no tokenizer at {path}: expected a tokenizer.json file, or a folder "
                         "with tokenizer.json or vocab.txt")

    @property
    def padded_vocab_size(self) -> int:
        return round_up_to_multiple(self.tokenizer_vocab_size)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text, int32, no special tokens added (Rust batch encoder, threaded)."""
        encodings = self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [np.asarray(enc.ids, dtype=np.int32) for enc in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer JSON (as loaded; its sha256 is `self.sha256`) to `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self._json, encoding="utf-8")
        return path


def _read_special_ids(tokenizer: Tokenizer, path: Path) -> SpecialIds:
    ids: dict[str, int] = {}
    for role, names in SPECIAL_NAMES.items():
        found = [i for i in map(tokenizer.token_to_id, names) if i is not None]
        if not found:
            raise ValueError(f"tokenizer {path} has no {role} token: tried {', '.join(names)}")
        ids[role] = found[0]
    return SpecialIds(**ids)


def _wordpiece_from_folder(folder: Path) -> Tokenizer:
    """A BERT WordPiece tokenizer from `vocab.txt` (`do_lower_case` from tokenizer_config.json)."""
    lowercase = True  # BERT's uncased checkpoints are the ones shipped as a bare vocab.txt
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        lowercase = bool(json.loads(config_path.read_text()).get("do_lower_case", True))
    vocab = models.WordPiece.read_file(str(folder / "vocab.txt"))
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    # Registering the vocab's own special entries keeps their ids and marks them special.
    present = [AddedToken(t, special=True) for t in SPECIAL_TOKENS if t in vocab]
    tokenizer.add_special_tokens(present)
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: Path,
              min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE with [CLS] [SEP] [MASK] [PAD] [UNK] (ids 0..4), its total vocabulary
    `vocab_size` rounded up to a multiple of 64. `out_path` is a folder (tokenizer.json and an HF
    tokenizer_config.json are written in it) or a path ending in `.json`. Deterministic."""
    target = round_up_to_multiple(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=target, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    # For HF users of the saved file; encode_batch itself adds nothing.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    trained_size = tokenizer.get_vocab_size()
    if trained_size < target:
        log.warning("corpus too small for %d tokens: trained %d (padded to %d at the embedding)",
                    target, trained_size, round_up_to_multiple(trained_size))

    out_path = Path(out_path)
    json_path = out_path if out_path.suffix == ".json" else out_path / "tokenizer.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(json_path))
    if json_path != out_path:
        hf_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                     "clean_up_tokenization_spaces": False,
                     **{f"{role}_token": names[0] for role, names in SPECIAL_NAMES.items()}}
        (out_path / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return TextTokenizer.load(json_path)


def main(argv: Sequence[str] | None = None) -> int:
    """`modernbert-tokenizer train --input PATH... --vocab-size N --out DIR`."""
    from modernbert_train.data import sources
    from modernbert_train.data.corpus import embedded_documents

    parser = argparse.ArgumentParser(prog="modernbert-tokenizer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on text/JSONL/Parquet/HF data")
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH", help="files, globs or directories")
    source.add_argument("--embedded", action="store_true",
                        help="train on the embedded corpus (stdlib pydoc topics)")
    train.add_argument("--format", default="auto", choices=("auto", *sources.FORMATS))
    train.add_argument("--text-field", default="text", help="JSONL key / Parquet or HF column")
    train.add_argument("--text-unit", default=sources.DEFAULT_TEXT_UNIT,
                       choices=("line", "paragraph", "file"), help="document unit of plain text")
    train.add_argument("--strict", action="store_true", help="stop at the first bad record")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="rounded up to a multiple of 64, special tokens included")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    skips = sources.SkipReport()
    count = {"documents": 0}

    def counted(texts: Iterable[str]) -> Iterable[str]:
        for text in texts:
            count["documents"] += 1
            yield text

    try:
        if args.embedded:
            texts: Iterable[str] = embedded_documents()
        else:
            inputs = sources.expand_inputs(args.input, args.format)
            texts = (doc.text for doc in sources.iter_documents(
                inputs, text_field=args.text_field, text_unit=args.text_unit, strict=args.strict,
                skips=skips))
        tok = train_bpe(counted(texts), args.vocab_size, args.out, args.min_frequency)
    except ValueError as exc:  # bad paths, strict-mode bad input: a message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in skips.summary_lines():
        print(line, file=sys.stderr)
    print(f"wrote {tok.path}: vocab {tok.tokenizer_vocab_size} "
          f"(padded {tok.padded_vocab_size}), {count['documents']} documents, "
          f"{skips.total} skipped, sha256 {tok.sha256[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
