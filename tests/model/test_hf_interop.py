"""Export -> transformers' ModernBertForMaskedLM gives our logits; import -> export is exact."""
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
