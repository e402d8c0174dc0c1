"""model/layer_norm.py: nn.LayerNorm's forward, its gradients (exact in fp32/fp64, bf16-level under
autocast), no fp32 copy of its input kept for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from modernbert_train.model.config import preset
from modernbert_train.model.layer_norm import LayerNorm
from modernbert_train.model.modernbert import ModernBertForMaskedLM


def pair(hidden: int, dtype=torch.float32, seed=0) -> tuple[nn.LayerNorm, LayerNorm]:
    torch.manual_seed(seed)
    ref = nn.LayerNorm(hidden, eps=1e-5, bias=False, dtype=dtype)
    with torch.no_grad():
        ref.weight.uniform_(-2.0, 2.0)  # negative and small weights too
    ours = LayerNorm(hidden, eps=1e-5).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(64, 48), (3, 20, 48)])
def test_forward_and_gradients_equal_nn_layer_norm(dtype, tol, shape):
    ref, ours = pair(shape[-1], dtype)
    x = (torch.randn(shape, dtype=dtype) * 3 + 1).requires_grad_()
    grad_out = torch.randn(shape, dtype=dtype)
    y_ref, y = ref(x), ours(x)
    assert torch.equal(y, y_ref), "the forward must be nn.LayerNorm's, bit for bit"
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, ref.weight), grad_out)
    gx, gw = torch.autograd.grad(y, (x, ours.weight), grad_out)
    for name, a, b in (("input", gx, gx_ref), ("weight", gw, gw_ref)):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < tol, f"{dtype} {shape}: grad of {name} off by {err:.2e} (relative to its max)"


def _norm_then_linear_grads(norm: nn.Module, x: torch.Tensor, linear: nn.Linear, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = linear(norm(x))
    return torch.autograd.grad(out.float().square().sum(), (x, norm.weight))


def test_under_autocast_gradients_are_as_accurate_as_nn_layer_norms():
    """bf16 autocast: the output (kept in bf16) stands in for the input, so x_hat has bf16
    precision in backward; the resulting gradient error (against fp64) stays at the level
    nn.LayerNorm + the bf16 matmul already have."""
    ref, ours = pair(256)
    torch.manual_seed(1)
    x = (torch.randn(512, 256) * 3 + 1).requires_grad_()
    linear = nn.Linear(256, 128, bias=False)
    # Exact reference: fp64 everywhere, the linear's weight as the bf16 matmul sees it.
    exact = nn.LayerNorm(256, eps=1e-5, bias=False, dtype=torch.float64)
    exact.load_state_dict(ref.state_dict())
    linear64 = nn.Linear(256, 128, bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear64.weight.copy_(linear.weight.bfloat16().double())
    x64 = x.detach().double().requires_grad_()
    gx64, gw64 = _norm_then_linear_grads(exact, x64, linear64, autocast=False)
    errors = {}
    for name, norm in (("nn", ref), ("ours", ours)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert norm(x).dtype == torch.float32, "under autocast a norm returns fp32, as nn.LayerNorm"
        gx, gw = _norm_then_linear_grads(norm, x, linear, autocast=True)
        errors[name] = [((g.double() - g64).norm() / g64.norm()).item() for g, g64 in ((gx, gx64), (gw, gw64))]
    for i, what in enumerate(("input", "weight")):
        assert errors["ours"][i] < 1.5 * errors["nn"][i] + 1e-4, f"grad of {what}: {errors}"


def test_zero_weight_gives_finite_gradients_and_no_update_for_that_weight():
    """The documented limit: where weight == 0 the output says nothing about the input."""
    ref, ours = pair(32)
    with torch.no_grad():
        ours.weight[5] = 0.0
    x = torch.randn(16, 32, requires_grad=True)
    gx, gw = torch.autograd.grad(ours(x).square().sum(), (x, ours.weight))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert gw[5] == 0.0, gw[5]


def _saved(fn) -> list[tuple[tuple[int, ...], torch.dtype]]:
    seen = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return seen


def test_keeps_no_fp32_copy_of_its_input_under_autocast():
    ref, ours = pair(256)
    linear = nn.Linear(256, 256, bias=False)
    x = torch.randn(128, 256, requires_grad=True)

    def step(norm):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(norm(x)).float().sum().backward()

    full_rows_fp32 = ((128, 256), torch.float32)
    assert full_rows_fp32 in _saved(lambda: step(ref)), "nn.LayerNorm keeps its fp32 input"
    saved = _saved(lambda: step(ours))
    assert full_rows_fp32 not in saved, saved
    assert saved.count(((128, 256), torch.bfloat16)) <= 2, saved


def _tiny_model(low_memory_norm: bool) -> ModernBertForMaskedLM:
    cfg = preset("tiny")
    cfg.num_hidden_layers, cfg.attention_backend, cfg.low_memory_norm = 2, "sdpa", low_memory_norm
    torch.manual_seed(0)
    return ModernBertForMaskedLM(cfg).train()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_model_gives_the_same_loss_and_gradients(compiled):
    """Whole tiny model, fp32 on CPU, eager and Inductor-compiled. (How much less it keeps for
    backward: tests/benchmarks/test_bench_step_smoke.py, through bench_step --saved-activations.)"""
    ids = torch.randint(4, 4096, (384,), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.arange(384) % 3 == 0, ids, torch.full_like(ids, -100))
    batch = dict(input_ids=ids, labels=labels, cu_seqlens=torch.tensor([0, 100, 300, 384], dtype=torch.int32),
                 max_seqlen=200)
    results = {}
    for flag in (False, True):
        torch._dynamo.reset()
        model = _tiny_model(flag)
        if compiled:
            model.compile()
        loss = model(**batch).loss
        loss.backward()
        results[flag] = (loss.detach(), [p.grad for p in model.parameters()])
    torch._dynamo.reset()
    (loss_nn, grads_nn), (loss_ours, grads_ours) = results[False], results[True]
    assert torch.equal(loss_ours, loss_nn)
    for g_ours, g_nn in zip(grads_ours, grads_nn):
        torch.testing.assert_close(g_ours, g_nn, rtol=1e-4, atol=1e-6)
