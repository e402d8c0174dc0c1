"""Export to / import from the Hugging Face transformers ModernBERT format (safetensors only).

Our parameter names are transformers' own, so the weights map one to one; only the tied decoder
weight is left out of the file, as transformers does. `modernbert-export` also turns a Composer
checkpoint of this project into such a folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from modernbert_train.model.config import EXECUTION_OPTIONS, ModernBertConfig
from modernbert_train.model.modernbert import ModernBertForMaskedLM

WEIGHTS_FILE = "model.safetensors"
TIED_KEY = "decoder.weight"
# transformers' config fields that mean the same thing as ours.
_SHARED_FIELDS = [f.name for f in fields(ModernBertConfig) if f.name != "preset" and f.name not in EXECUTION_OPTIONS]


def hf_config_dict(config: ModernBertConfig) -> dict:
    shared = {name: getattr(config, name) for name in _SHARED_FIELDS}
    return {
        "architectures": ["ModernBertForMaskedLM"],
        "model_type": "modernbert",
        **shared,
        "bos_token_id": config.cls_token_id,
        "eos_token_id": config.sep_token_id,
        "hidden_activation": "gelu",
        "classifier_activation": "gelu",
        "norm_bias": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "decoder_bias": True,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def export_hf(model: ModernBertForMaskedLM, out_dir: str | Path,
              tokenizer_path: Optional[str | Path] = None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer) loadable by
    `transformers.AutoModelForMaskedLM.from_pretrained(out_dir)`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2) + "\n")
    if tokenizer_path is not None:
        _export_tokenizer(Path(tokenizer_path), out, model.config)
    return out


def _export_tokenizer(src: Path, out: Path, config: ModernBertConfig) -> None:
    src_file = src / "tokenizer.json" if src.is_dir() else src
    if not src_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {src}")
    shutil.copyfile(src_file, out / "tokenizer.json")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(src_file))
    names = {"cls_token": config.cls_token_id, "sep_token": config.sep_token_id,
             "mask_token": config.mask_token_id, "pad_token": config.pad_token_id}
    specials = {name: tok.id_to_token(i) for name, i in names.items()}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings,
        **specials}, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def import_hf(folder: str | Path, **overrides) -> ModernBertForMaskedLM:
    """Load a transformers ModernBERT folder (ours or a released checkpoint, safetensors)."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") != "modernbert":
        raise ValueError(f"{folder}/config.json: model_type is {raw.get('model_type')!r}, not 'modernbert'")
    for name, expected in (("norm_bias", False), ("attention_bias", False), ("mlp_bias", False),
                           ("decoder_bias", True), ("hidden_activation", "gelu")):
        if raw.get(name, expected) != expected:
            raise ValueError(f"{folder}/config.json: {name}={raw[name]!r} is not supported "
                             f"(this architecture has {name}={expected!r})")
    known = {k: raw[k] for k in _SHARED_FIELDS if k in raw}
    config = ModernBertConfig(preset="imported", **{**known, **overrides})
    model = ModernBertForMaskedLM(config)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (only safetensors checkpoints are loaded)")
    state = load_file(str(weights))
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != TIED_KEY]
    if missing or unexpected:
        raise ValueError(f"{weights}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="modernbert-export",
        description="Export a modernbert-train Composer checkpoint to a Hugging Face folder. "
                    "Composer checkpoints are pickles: only export checkpoints you trust.")
    parser.add_argument("checkpoint", help="a .pt Composer checkpoint written by modernbert-train")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or folder to include")
    args = parser.parse_args(argv)
    from modernbert_train.train.checkpoint_export import load_model_from_checkpoint
    model = load_model_from_checkpoint(args.checkpoint)
    export_hf(model, args.out_dir, args.tokenizer)
    print(f"exported {args.checkpoint} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
