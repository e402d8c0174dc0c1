"""The architecture: sizes, packed == each document alone, padded == packed, sparse head, init."""
from __future__ import annotations

import pytest
import torch

from modernbert_train.model import ModernBertForMaskedLM, preset
from modernbert_train.model.attention import unavailable_reason
from modernbert_train.model.config import ModernBertConfig
from modernbert_train.model.modernbert import positions_from_cu_seqlens


def tiny(**overrides) -> ModernBertConfig:
    cfg = preset("tiny")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(seed=0, **overrides) -> ModernBertForMaskedLM:
    torch.manual_seed(seed)
    return ModernBertForMaskedLM(tiny(**overrides)).double().eval()


@pytest.mark.parametrize("name, millions", [("base", 149.0), ("large", 395.0)])
def test_parameter_count_matches_published_size(name, millions):
    with torch.device("meta"):
        model = ModernBertForMaskedLM(preset(name))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - millions) < 1.5, f"{name}: {count:.2f}M parameters, published ~{millions}M"


def test_only_bias_is_the_decoders_and_decoder_is_tied():
    model = build()
    biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert biases == ["decoder.bias"], biases
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    assert isinstance(model.model.layers[0].attn_norm, torch.nn.Identity)
    assert not isinstance(model.model.layers[1].attn_norm, torch.nn.Identity)
    glob = [layer.attn.is_global for layer in model.model.layers]
    assert glob == [True, False, False, True], glob


def test_positions_restart_per_document():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    assert positions_from_cu_seqlens(cu, 7).tolist() == [0, 1, 2, 0, 1, 2, 3]


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_forward_equals_each_document_alone(backend):
    if unavailable_reason(backend):
        pytest.skip(unavailable_reason(backend))
    model = build(attention_backend=backend)
    lengths = [37, 120, 5, 64]
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, 4096, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(docs), cu_seqlens=cu, max_seqlen=max(lengths)).logits
        alone = [model(d, cu_seqlens=torch.tensor([0, len(d)], dtype=torch.int32), max_seqlen=len(d)).logits
                 for d in docs]
    err = (packed - torch.cat(alone)).abs().max().item()
    assert err < 1e-10, f"packed vs alone max abs diff {err}"


def test_padded_input_equals_packed_input():
    model = build()
    lengths = [50, 20, 33]
    g = torch.Generator().manual_seed(2)
    padded = torch.randint(4, 4096, (3, 50), generator=g)
    mask = torch.zeros(3, 50, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packed_ids = torch.cat([padded[i, :n] for i, n in enumerate(lengths)])
    cu = torch.tensor([0, 50, 70, 103], dtype=torch.int32)
    with torch.no_grad():
        a = model(padded, attention_mask=mask).logits  # (B, S, V)
        b = model(packed_ids, cu_seqlens=cu, max_seqlen=50).logits  # (T, V)
    assert a.shape == (3, 50, 4096)
    assert (a[mask.bool()] - b).abs().max().item() < 1e-10
    assert a[~mask.bool()].abs().max().item() == 0.0, "padding positions must stay zero"


def test_sparse_head_equals_dense_head_on_masked_positions():
    sparse, dense = build(sparse_prediction=True), build(sparse_prediction=False)
    ids = torch.randint(4, 4096, (90,), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(ids, -100)
    labels[::4] = ids[::4]
    cu = torch.tensor([0, 40, 90], dtype=torch.int32)
    out_s = sparse(ids, cu_seqlens=cu, max_seqlen=50, labels=labels)
    out_d = dense(ids, cu_seqlens=cu, max_seqlen=50, labels=labels)
    assert out_s.logits.shape == (23, 4096)
    assert abs(out_s.loss.item() - out_d.loss.item()) < 1e-10
    assert (out_s.logits - out_d.logits[labels != -100]).abs().max().item() < 1e-10
    assert int(out_s.num_predictions) == 23


def masked_example(seed=3, tokens=90, every=4):
    ids = torch.randint(4, 4096, (tokens,), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, -100)
    labels[::every] = ids[::every]
    return ids, labels, torch.tensor([0, 40, tokens], dtype=torch.int32)


def test_fixed_prediction_slots_give_the_same_loss_and_predictions():
    model = build()
    ids, labels, cu = masked_example()
    exact = model(ids, cu_seqlens=cu, max_seqlen=50, labels=labels)
    slotted = model(ids, cu_seqlens=cu, max_seqlen=50, labels=labels, prediction_slots=30)
    assert slotted.logits.shape == (30, 4096) and exact.logits.shape == (23, 4096)
    assert int(slotted.num_predictions) == int(exact.num_predictions) == 23
    assert (slotted.masked_positions[:23] == exact.masked_positions).all(), "labelled positions first, in order"
    assert (slotted.labels[23:] == -100).all(), "filler slots carry no label"
    assert abs(slotted.loss.item() - exact.loss.item()) < 1e-12
    with pytest.raises(ValueError, match="prediction_slots=91 exceeds the 90 tokens"):
        model(ids, cu_seqlens=cu, max_seqlen=50, labels=labels, prediction_slots=91)


@pytest.mark.parametrize("slots", [None, 40])
def test_fused_head_loss_matches_plain_loss_and_gradients(slots):
    fused, plain = build(fused_head_loss=True).train(), build(fused_head_loss=False).train()
    ids, labels, cu = masked_example()
    out_f = fused(ids, cu_seqlens=cu, max_seqlen=50, labels=labels, prediction_slots=slots)
    out_p = plain(ids, cu_seqlens=cu, max_seqlen=50, labels=labels, prediction_slots=slots)
    assert out_f.logits is None, "training with the fused loss materialises no logits"
    assert abs(out_f.loss.item() - out_p.loss.item()) < 1e-12
    out_f.loss.backward()
    out_p.loss.backward()
    for (name, p_f), p_p in zip(fused.named_parameters(), plain.parameters()):
        err = (p_f.grad - p_p.grad).abs().max().item()
        assert err < 1e-12, f"{name}: gradient differs by {err}"



@pytest.mark.parametrize("head", ["fused", "plain", "eval", "dense"])
def test_a_chunk_without_masked_tokens_has_loss_zero_not_nan(head):
    """Every label ignored (a chunk of very short documents, or mask_rate 0): loss 0 and zero
    gradients on every path, as the fused loss gives; a NaN would stop a run at its NaN guard."""
    model = build(fused_head_loss=head == "fused", sparse_prediction=head != "dense")
    model.train(head != "eval")
    ids, labels, cu = masked_example()
    labels.fill_(-100)
    with torch.set_grad_enabled(head != "eval"):
        out = model(ids, cu_seqlens=cu, max_seqlen=50, labels=labels,
                    prediction_slots=None if head == "dense" else 20)
    assert out.loss.item() == 0.0 and int(out.num_predictions) == 0, (out.loss, out.num_predictions)
    if head != "eval":
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all((g == 0).all() for g in grads), "no label, no gradient"

def residual_run(autocast: bool, **overrides) -> tuple[float, set, dict]:
    """One training forward + backward (fp32 weights): the loss, the dtypes the layers received and
    the gradients."""
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(tiny(**overrides)).train()
    layer_inputs = set()
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: layer_inputs.add(args[0].dtype))
    ids, labels, cu = masked_example(tokens=400, every=3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, cu_seqlens=cu, max_seqlen=360, labels=labels, prediction_slots=160)
    out.loss.backward()
    return out.loss.item(), layer_inputs, {n: p.grad for n, p in model.named_parameters()}


def test_autocast_residual_carries_the_stream_in_the_autocast_dtype():
    loss_ref, stream_ref, grads_ref = residual_run(True)
    loss, stream, grads = residual_run(True, autocast_residual=True)
    assert stream_ref == {torch.float32} and stream == {torch.bfloat16}, (stream_ref, stream)
    assert loss != loss_ref, "a bf16 stream must change the numerics"
    assert abs(loss - loss_ref) < 1e-3 * loss_ref, (loss, loss_ref)
    for name, grad in grads.items():
        cos = torch.nn.functional.cosine_similarity(grad.flatten(), grads_ref[name].flatten(), dim=0).item()
        assert cos > 0.999, f"{name}: gradient cosine {cos:.5f} against the fp32 stream"


def test_autocast_residual_changes_nothing_without_autocast():
    loss_ref, stream_ref, grads_ref = residual_run(False)
    loss, stream, grads = residual_run(False, autocast_residual=True)
    assert stream_ref == stream == {torch.float32}, (stream_ref, stream)
    assert loss == loss_ref, (loss, loss_ref)
    assert all(torch.equal(grads[name], grads_ref[name]) for name in grads)


def test_init_is_truncated_and_output_projections_scaled_by_depth():
    torch.manual_seed(0)
    cfg = preset("base")
    cfg.num_hidden_layers = 2
    model = ModernBertForMaskedLM(cfg)
    wqkv = model.model.layers[1].attn.Wqkv.weight
    wo = model.model.layers[1].attn.Wo.weight
    assert wqkv.abs().max() <= 2 * 0.02 + 1e-6
    assert abs(wqkv.std().item() - 0.0176) < 0.001  # std of N(0, 0.02) truncated at 2 sigma
    ratio = wqkv.std().item() / wo.std().item()
    assert abs(ratio - 2.0) < 0.05, f"out projection std should be std / sqrt(2 * 2 layers), ratio {ratio}"


def test_backward_reaches_every_parameter():
    model = build()
    ids = torch.randint(4, 4096, (64,))
    labels = ids.clone()
    out = model(ids, cu_seqlens=torch.tensor([0, 30, 64], dtype=torch.int32), max_seqlen=34, labels=labels)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not no_grad, no_grad


def test_bad_configs_fail_at_construction():
    with pytest.raises(ValueError, match="local_attention=127"):
        ModernBertForMaskedLM(tiny(local_attention=127))
    with pytest.raises(ValueError, match="vocab_size=4000 is not a multiple of 64"):
        ModernBertForMaskedLM(tiny(vocab_size=4000))
    with pytest.raises(ValueError, match="num_hidden_layers=0 must be >= 1"):
        ModernBertForMaskedLM(tiny(num_hidden_layers=0))
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_rope_tables_equal_cos_sin_of_position_times_frequency():
    from modernbert_train.model.modernbert import RotaryEmbedding
    rope = RotaryEmbedding(head_dim=64, theta=160_000.0, max_positions=8192)
    positions = torch.tensor([0, 1, 2, 63, 64, 1023, 8191])
    inv_freq = 1.0 / (160_000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = rope(positions)
    assert cos.shape == sin.shape == (7, 64)
    assert torch.equal(cos, torch.cat((angles, angles), -1).cos()), "cos table differs from cos(pos * freq)"
    assert torch.equal(sin, torch.cat((angles, angles), -1).sin()), "sin table differs from sin(pos * freq)"


def test_document_longer_than_the_rope_tables_is_a_clear_error():
    model = build()  # tiny: max_position_embeddings 512
    ids = torch.randint(4, 4096, (600,))
    with pytest.raises(ValueError, match="documents of up to 513 tokens.*max_position_embeddings=512"):
        model(ids, cu_seqlens=torch.tensor([0, 87, 600], dtype=torch.int32))
    with pytest.raises(ValueError, match="up to 600 tokens"):
        model(ids[None, :])
    model(ids[:512][None, :])  # exactly the table length is fine
