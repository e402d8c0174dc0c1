"""Export to / import from the Hugging Face transformers ModernBERT format (safetensors only).

Our parameter names are transformers' own, so the weights map one to one; only the tied decoder
weight is left out of the file, as transformers does. Import reads config.json as transformers 4 or 5
writes it. `modernbert-export` also turns a Composer checkpoint of this project into such a folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

from modernbert_train.model.config import EXECUTION_OPTIONS, ModernBertConfig
from modernbert_train.model.modernbert import ModernBertForMaskedLM

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
TIED_KEY = "decoder.weight"
# transformers' config fields that mean the same thing as ours.
_SHARED_FIELDS = [f.name for f in fields(ModernBertConfig) if f.name != "preset" and f.name not in EXECUTION_OPTIONS]
# transformers 5's layer types -> our field holding that type's RoPE theta.
_THETA_OF_LAYER_TYPE = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}


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
    """Load a transformers ModernBERT folder (ours or a released checkpoint, safetensors), written by
    transformers 4 or 5. `overrides` replace config fields, e.g. mask_token_id= for a folder without a tokenizer."""
    folder = Path(folder)
    where = f"{folder}/config.json"
    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") != "modernbert":
        raise ValueError(f"{where}: model_type is {raw.get('model_type')!r}, not 'modernbert'")
    for name, expected in (("norm_bias", False), ("attention_bias", False), ("mlp_bias", False),
                           ("decoder_bias", True), ("hidden_activation", "gelu"), ("tie_word_embeddings", True)):
        if raw.get(name, expected) != expected:
            raise ValueError(f"{where}: {name}={raw[name]!r} is not supported "
                             f"(this architecture has {name}={expected!r})")
    known = {k: raw[k] for k in _SHARED_FIELDS if k in raw} | _attention_layout(raw, where)
    config = ModernBertConfig(preset="imported", **{**known, **overrides})
    if "mask_token_id" not in known and "mask_token_id" not in overrides:
        config = replace(config, mask_token_id=_mask_token_id(folder, config))
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
        token_id = getattr(config, name)
        if not isinstance(token_id, int) or not 0 <= token_id < config.vocab_size:
            raise ValueError(f"{where}: {name}={token_id!r} is not an id in the vocabulary "
                             f"(vocab_size={config.vocab_size}); pass {name}=... to import_hf")
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


def _attention_layout(raw: dict, where: str) -> dict:
    """global_attn_every_n_layers and the two RoPE thetas, from either config.json layout.

    transformers 4 writes those three fields (local_rope_theta null: the local layers use the global
    theta). transformers 5 writes `layer_types` and `rope_parameters` per layer type and reads only
    those when present, so they win over v4 fields left in the same file.
    """
    legacy = {k: raw[k] for k in ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta") if k in raw}
    if "local_rope_theta" in legacy and legacy["local_rope_theta"] is None:
        legacy["local_rope_theta"] = legacy.get("global_rope_theta", ModernBertConfig.global_rope_theta)
    if raw.get("rope_scaling") is not None:  # both versions apply it to every layer
        _require_default_rope(raw["rope_scaling"], "rope_scaling", where)
    v5 = {}
    if raw.get("layer_types") is not None:
        num_layers = raw.get("num_hidden_layers", ModernBertConfig.num_hidden_layers)
        v5["global_attn_every_n_layers"] = _every_n_layers(raw["layer_types"], num_layers, where)
    rope = raw.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict) or not set(rope) <= set(_THETA_OF_LAYER_TYPE):
            raise ValueError(f"{where}: rope_parameters={rope!r} is not one entry per layer type "
                             f"({' / '.join(_THETA_OF_LAYER_TYPE)})")
        for layer_type, theta in _THETA_OF_LAYER_TYPE.items():
            params = rope.get(layer_type) or {}  # absent: transformers 5 falls back to the v4 field
            _require_default_rope(params, f"rope_parameters.{layer_type}", where)
            if params.get("rope_theta") is not None:
                v5[theta] = params["rope_theta"]
    stale = {k: (legacy[k], v5[k]) for k in legacy.keys() & v5.keys() if legacy[k] != v5[k]}
    if stale:
        log.warning("%s: layer_types / rope_parameters disagree with the transformers 4 fields "
                       "{field: (v4, v5)} %s; using v5's, as transformers 5 does", where, stale)
    return legacy | v5


def _require_default_rope(params: dict, name: str, where: str) -> None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{where}: {name}.rope_type={rope_type!r} is not supported "
                         "(this architecture has plain RoPE, rope_type='default')")


def _every_n_layers(layer_types: list, num_layers: int, where: str) -> int:
    """The n for which `layer_types` is 'layer i is global iff i % n == 0' (ModernBertConfig.is_global_layer)."""
    globals_ = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    n = globals_[1] if len(globals_) > 1 else max(len(layer_types), 1)
    expected = ["full_attention" if i % n == 0 else "sliding_attention" for i in range(num_layers)]
    if list(layer_types) != expected:
        raise ValueError(f"{where}: layer_types={layer_types} is not expressible here: this architecture has "
                         f"{num_layers} layers and makes layer i full_attention iff i % "
                         "global_attn_every_n_layers == 0 (all others sliding_attention)")
    return n


def _mask_token_id(folder: Path, config: ModernBertConfig) -> int:
    """transformers' ModernBertConfig has no mask_token_id: the folder's tokenizer names the mask."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        return config.mask_token_id  # the default; import_hf checks it is in the vocabulary
    tokenizer_config = folder / "tokenizer_config.json"
    token = json.loads(tokenizer_config.read_text()).get("mask_token") if tokenizer_config.is_file() else None
    if isinstance(token, dict):  # a serialized AddedToken
        token = token["content"]
    token = token or "[MASK]"  # transformers' ModernBERT tokenizers name it so
    from tokenizers import Tokenizer
    mask_id = Tokenizer.from_file(str(tokenizer_file)).token_to_id(token)
    if mask_id is None:
        raise ValueError(f"{folder}: the mask token {token!r} is not in tokenizer.json; "
                         "pass mask_token_id=... to import_hf")
    return mask_id


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
