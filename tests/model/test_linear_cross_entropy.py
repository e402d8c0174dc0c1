"""The fused decoder + cross-entropy against the plain two-step computation."""
import pytest
import torch
import torch.nn.functional as F

from modernbert_train.model.linear_cross_entropy import linear_cross_entropy

IGNORE = -100


def problem(rows=37, hidden=16, vocab=128, ignored_every=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (rows,), generator=g)
    target[::ignored_every] = IGNORE
    return x, w, b, target


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def traced(fn):
    """fn under torch.compile with the eager backend: Dynamo traces it (torch.compiler.is_compiling()
    is true while it does, so the forward takes its one-pass form) and the graph runs op by op."""
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 4096])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("form", ["eager", "traced"])
def test_matches_plain_loss_and_gradients(chunk_rows, with_bias, form):
    x, w, b, target = problem()
    bias = b if with_bias else None
    inputs = [x, w] + ([b] if with_bias else [])
    want = F.cross_entropy(F.linear(x, w, bias), target, ignore_index=IGNORE)
    loss_fn = linear_cross_entropy if form == "eager" else traced(linear_cross_entropy)
    got = loss_fn(x, w, bias, target, ignore_index=IGNORE, chunk_rows=chunk_rows)
    assert abs(got.item() - want.item()) < 1e-12, (got.item(), want.item())
    # A non-unit upstream gradient checks that backward scales every gradient by it.
    for g_want, g_got, name in zip(grads_of(2.5 * want, inputs), grads_of(2.5 * got, inputs), ["x", "w", "b"]):
        err = (g_want - g_got).abs().max().item()
        assert err < 1e-12, f"grad {name} differs by {err}"


@pytest.mark.parametrize("form", ["eager", "traced"])
def test_all_rows_ignored_gives_zero_loss_and_gradients(form):
    x, w, b, target = problem()
    target[:] = IGNORE
    loss_fn = linear_cross_entropy if form == "eager" else traced(linear_cross_entropy)
    loss = loss_fn(x, w, b, target, chunk_rows=8)
    gx, gw, gb = grads_of(loss, [x, w, b])
    assert loss.item() == 0.0
    assert gx.abs().max().item() == gw.abs().max().item() == gb.abs().max().item() == 0.0


def test_bf16_autocast_close_to_fp32_and_grad_dtypes_follow_inputs():
    x, w, b, target = problem(rows=64, hidden=32, vocab=256, dtype=torch.float32)
    want = F.cross_entropy(F.linear(x, w, b), target, ignore_index=IGNORE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, w, b, target, chunk_rows=16)
    gx, gw, gb = grads_of(got, [x, w, b])
    assert got.dtype == torch.float32 and (gx.dtype, gw.dtype, gb.dtype) == (torch.float32,) * 3
    assert abs(got.item() - want.item()) / want.item() < 2e-2, (got.item(), want.item())
    wx, ww, wb = grads_of(want, [x, w, b])
    for g_want, g_got, name in ((wx, gx, "x"), (ww, gw, "w"), (wb, gb, "b")):
        rel = ((g_want - g_got).norm() / g_want.norm()).item()
        assert rel < 3e-2, f"grad {name}: relative error {rel}"


@pytest.mark.gpu
def test_cuda_bf16_autocast_matches_fp32_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, w, b, target = problem(rows=3000, hidden=256, vocab=4096, dtype=torch.float32)
    x, w, b = (t.detach().cuda().requires_grad_() for t in (x, w, b))
    target = target.cuda()
    want = F.cross_entropy(F.linear(x, w, b), target, ignore_index=IGNORE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, w, b, target, chunk_rows=1024)
    assert abs(got.item() - want.item()) / want.item() < 2e-2, (got.item(), want.item())
    for g_want, g_got, name in zip(grads_of(want, [x, w, b]), grads_of(got, [x, w, b]), "xwb"):
        rel = ((g_want - g_got).norm() / g_want.norm()).item()
        assert rel < 3e-2, f"grad {name}: relative error {rel}"
