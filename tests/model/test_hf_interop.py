"""Export -> transformers' ModernBertForMaskedLM gives our logits; import -> export is exact; import reads
folders written by transformers 4 and 5 and rejects what this architecture cannot express."""
from __future__ import annotations

import json

import pytest
import torch

from modernbert_train.model import ModernBertForMaskedLM, preset
from modernbert_train.model.hf_interop import export_hf, import_hf

transformers = pytest.importorskip("transformers", reason="transformers is part of the [dev] extra")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.sparse_prediction = False
    model = ModernBertForMaskedLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and bias, so a dropped parameter would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    out = export_hf(model, tmp_path_factory.mktemp("hf"))
    return model, out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_logits_equal_ours_padded(exported, attn):
    model, folder = exported
    hf = transformers.AutoModelForMaskedLM.from_pretrained(folder, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 4096, (3, 90), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 60:] = 0
    mask[2, 17:] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    err = (ours - theirs)[mask.bool()].abs().max().item()
    assert err <= 1e-4, f"max abs logit diff {err} ({attn})"


def test_transformers_logits_equal_ours_packed(exported):
    model, folder = exported
    hf = transformers.AutoModelForMaskedLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    lengths = [70, 12, 41]
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(4, 4096, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, 70, 82, 123], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs), cu_seqlens=cu, max_seqlen=70).logits
        theirs = torch.cat([hf(input_ids=d[None]).logits[0] for d in docs])
    err = (packed - theirs).abs().max().item()
    assert err <= 1e-4, f"packed vs transformers per-document max abs diff {err}"


def test_import_export_round_trip_is_exact(exported, tmp_path):
    model, folder = exported
    again = import_hf(folder)
    export_hf(again, tmp_path)
    from safetensors.torch import load_file
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((folder / "config.json").read_text()) == json.loads((tmp_path / "config.json").read_text())


def test_import_rejects_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type is 'bert'"):
        import_hf(tmp_path)


# --- import of folders written by transformers (4 or 5) or by hand ---

_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
_LEGACY_FIELDS = ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta")
# Layers 0 and 2 global, thetas unlike both our defaults and transformers'.
_V5_LAYOUT = {"layer_types": ["full_attention", "sliding_attention"] * 2,
              "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 40_000.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 5_000.0}}}
_V4_LAYOUT = {"global_attn_every_n_layers": 2, "global_rope_theta": 40_000.0, "local_rope_theta": 5_000.0}
_SPECIALS = {"[CLS]": 0, "[SEP]": 1, "[PAD]": 3, "[MASK]": 7, "<mask>": 9}


def _tokenizer():
    from tokenizers import Tokenizer, models
    vocab = {f"t{i}": i for i in range(100) if i not in _SPECIALS.values()} | _SPECIALS
    return Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))


def _layout(cfg) -> tuple:
    return cfg.global_attn_every_n_layers, cfg.global_rope_theta, cfg.local_rope_theta


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """A folder written by the installed transformers' own save_pretrained, with its tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        local_attention=16, max_position_embeddings=256, pad_token_id=3, cls_token_id=0, sep_token_id=1,
        bos_token_id=0, eos_token_id=1, **(_V5_LAYOUT if _TRANSFORMERS_5 else _V4_LAYOUT))
    hf = transformers.ModernBertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("hf_saved")
    hf.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), mask_token="[MASK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_import_of_a_transformers_folder_gives_its_logits(hf_saved, attn):
    raw = json.loads((hf_saved / "config.json").read_text())
    layout_keys = sorted(k for k in raw if k in (*_LEGACY_FIELDS, *_V5_LAYOUT))
    expected_keys = sorted(_V5_LAYOUT) if _TRANSFORMERS_5 else sorted(_LEGACY_FIELDS)
    assert layout_keys == expected_keys, f"transformers {transformers.__version__} wrote {layout_keys}"
    ours = import_hf(hf_saved).eval()
    assert _layout(ours.config) == (2, 40_000.0, 5_000.0), _layout(ours.config)
    assert ours.config.mask_token_id == _SPECIALS["[MASK]"], ours.config.mask_token_id
    hf = transformers.AutoModelForMaskedLM.from_pretrained(hf_saved, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 512, (2, 80), generator=g)  # 80 tokens: well past the 16-token window
    mask = torch.ones_like(ids)
    mask[1, 50:] = 0
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    err = (mine - theirs)[mask.bool()].abs().max().item()
    assert err <= 1e-4, f"max abs logit diff {err} ({attn}, transformers {transformers.__version__})"


def _export_ours(folder, **changes):
    """Our tiny model with global layers 0 and 2 and thetas 40000 / 5000, exported; its config.json dict."""
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.global_attn_every_n_layers, cfg.global_rope_theta, cfg.local_rope_theta = 2, 40_000.0, 5_000.0
    for name, value in changes.items():
        setattr(cfg, name, value)
    model = ModernBertForMaskedLM(cfg)
    export_hf(model, folder)
    return model, json.loads((folder / "config.json").read_text())


def _write_config(folder, raw):
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("legacy", ["absent", "agreeing", "stale"])
def test_import_reads_the_transformers_5_layout(tmp_path, caplog, legacy):
    # transformers 5 reads only layer_types / rope_parameters when present, so they win over stale v4 fields.
    model, raw = _export_ours(tmp_path)
    if legacy == "absent":
        raw = {k: v for k, v in raw.items() if k not in _LEGACY_FIELDS}
    elif legacy == "stale":
        raw |= {"global_attn_every_n_layers": 3, "global_rope_theta": 160_000.0, "local_rope_theta": 10_000.0}
    _write_config(tmp_path, raw | _V5_LAYOUT)
    with caplog.at_level("WARNING", logger="modernbert_train.model.hf_interop"):
        imported = import_hf(tmp_path)
    assert _layout(imported.config) == (2, 40_000.0, 5_000.0), _layout(imported.config)
    assert ("disagree" in caplog.text) == (legacy == "stale"), caplog.text
    a, b = model.state_dict(), imported.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layer_types, every_n", [
    (["full_attention"] * 4, 1),
    (["full_attention"] + ["sliding_attention"] * 3, 4),
    (["full_attention", "sliding_attention", "sliding_attention", "full_attention"], 3),
])
def test_import_derives_global_attn_every_n_layers_from_layer_types(tmp_path, layer_types, every_n):
    _, raw = _export_ours(tmp_path)
    _write_config(tmp_path, raw | {"layer_types": layer_types})
    cfg = import_hf(tmp_path).config
    got = ["full_attention" if cfg.is_global_layer(i) else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    assert (cfg.global_attn_every_n_layers, got) == (every_n, layer_types)


def test_import_reads_a_null_local_rope_theta_as_the_global_one(tmp_path):
    # transformers 4's ModernBertAttention: local_rope_theta None -> the local layers use global_rope_theta.
    _, raw = _export_ours(tmp_path)
    _write_config(tmp_path, raw | {"local_rope_theta": None})
    assert _layout(import_hf(tmp_path).config) == (2, 40_000.0, 40_000.0)


@pytest.mark.parametrize("change, field", [
    ({"layer_types": ["sliding_attention", "full_attention"] * 2}, "layer_types"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention", "sliding_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention", "chunked_attention"] * 2}, "layer_types"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 40_000.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 5_000.0}}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"pad_token_id": 4096}, "pad_token_id"),
    ({"pad_token_id": None}, "pad_token_id"),
    ({"sep_token_id": -1}, "sep_token_id"),
])
def test_import_rejects_what_this_architecture_cannot_express(tmp_path, change, field):
    _, raw = _export_ours(tmp_path)
    _write_config(tmp_path, raw | change)
    with pytest.raises(ValueError, match=field) as err:
        import_hf(tmp_path)
    assert str(tmp_path) in str(err.value), str(err.value)


def _save_tokenizer(folder, tokenizer_config):
    _tokenizer().save(str(folder / "tokenizer.json"))
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.mark.parametrize("tokenizer_config, mask_id", [
    ({"mask_token": "[MASK]"}, 7),
    ({"mask_token": {"content": "<mask>", "lstrip": True, "__type": "AddedToken"}}, 9),
    ({"tokenizer_class": "PreTrainedTokenizerFast"}, 7),  # no mask_token: "[MASK]"
    (None, 7),  # no tokenizer_config.json
])
def test_import_takes_the_mask_id_from_the_folders_tokenizer(tmp_path, tokenizer_config, mask_id):
    # transformers' ModernBertConfig has no mask_token_id: a folder it wrote names the mask only in its tokenizer.
    _, raw = _export_ours(tmp_path)
    _write_config(tmp_path, {k: v for k, v in raw.items() if k != "mask_token_id"})
    _save_tokenizer(tmp_path, tokenizer_config)
    assert import_hf(tmp_path).config.mask_token_id == mask_id
    assert import_hf(tmp_path, mask_token_id=5).config.mask_token_id == 5


def test_import_rejects_a_mask_token_its_tokenizer_lacks(tmp_path):
    _, raw = _export_ours(tmp_path)
    _write_config(tmp_path, {k: v for k, v in raw.items() if k != "mask_token_id"})
    _save_tokenizer(tmp_path, {"mask_token": "<MASK>"})
    with pytest.raises(ValueError, match="'<MASK>'.*mask_token_id="):
        import_hf(tmp_path)


@pytest.mark.parametrize("vocab_size, mask_id", [(4096, None), (50368, 50284)])
def test_import_without_a_tokenizer_keeps_the_default_mask_id_only_inside_the_vocabulary(tmp_path, vocab_size,
                                                                                         mask_id):
    _, raw = _export_ours(tmp_path, vocab_size=vocab_size)
    _write_config(tmp_path, {k: v for k, v in raw.items() if k != "mask_token_id"})
    if mask_id is None:
        with pytest.raises(ValueError, match="mask_token_id=") as err:
            import_hf(tmp_path)
        assert str(tmp_path) in str(err.value), str(err.value)
    else:
        assert import_hf(tmp_path).config.mask_token_id == mask_id
    assert import_hf(tmp_path, mask_token_id=5).config.mask_token_id == 5
