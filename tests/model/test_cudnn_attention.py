"""model/cudnn_attention.py: the custom op around torch's ragged cuDNN attention, and the `cudnn`
backend that routes global layers to it.

On the CPU, exact stand-ins replace torch's two cuDNN ops (each possible log-sum-exp layout in
turn), so the wrapper's own work is checked there: arguments, the log-sum-exp handed from the
forward to the backward in the layout cuDNN gave it, the fake implementation against the real one
(opcheck, one compiled graph), the routing of windowed layers and short chunks. The cuDNN kernels
themselves are checked by the gpu-marked tests here and in test_attention.py.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from modernbert_train.model import attention, cudnn_attention
from modernbert_train.model.attention import fastest_available, get_backend, unavailable_reason
from modernbert_train.model.config import preset
from tests.model.test_attention import make_qkv, reference_attention
from tests.model.test_window_attention import compiled_loss_and_grads, loader_like_cuda_batch

LAYOUTS = ("tokens_heads_1", "heads_tokens")
# Documents as the loader lays them out: a long one, empty slots between and at the end.
LENGTHS = [300, 0, 150, 7, 0, 0]


def reference_with_lse(q, k, v, cu_seqlens, scale):
    """(out (T, N, Dh), log-sum-exp (T, N)) per document, written out directly."""
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[0], q.shape[1], dtype=q.dtype)
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if e > s:
            scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale
            lse[s:e] = torch.logsumexp(scores, -1).t()
            out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e])
    return out, lse


class StandIn:
    """torch's _cudnn_attention_forward / _backward, exact on the CPU, with the log-sum-exp in one
    of the layouts a torch build may use; the backward checks it gets that layout back."""

    def __init__(self, layout: str):
        self.layout, self.forward_calls, self.backward_calls = layout, 0, 0

    def native(self, lse):
        return lse.unsqueeze(-1) if self.layout == "tokens_heads_1" else lse.t().contiguous()

    def forward(self, q, k, v, cu_seqlens, max_seqlen, scale):
        self.forward_calls += 1
        out, lse = reference_with_lse(q.float(), k.float(), v.float(), cu_seqlens, scale)
        return out.to(q.dtype), self.native(lse), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, None, None, None

    def backward(self, grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
        self.backward_calls += 1
        q, k, v, do = (x.float() for x in (q, k, v, grad_out))
        want = self.native(reference_with_lse(q, k, v, cu_seqlens, scale)[1])
        assert lse.shape == want.shape and torch.allclose(lse, want, atol=1e-5), (lse.shape, want.shape)
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            if e > s:  # softmax attention's gradients, written out (autograd is off inside an op)
                p = (torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) * scale).softmax(-1)
                dp = torch.einsum("qhd,khd->hqk", do[s:e], v[s:e])
                ds = p * (dp - (p * dp).sum(-1, keepdim=True))
                grads[0][s:e] = torch.einsum("hqk,khd->qhd", ds, k[s:e]) * scale
                grads[1][s:e] = torch.einsum("hqk,qhd->khd", ds, q[s:e]) * scale
                grads[2][s:e] = torch.einsum("hqk,qhd->khd", p, do[s:e])
        return tuple(g.to(grad_out.dtype) for g in grads)


@pytest.fixture(params=LAYOUTS)
def stand_in(request, monkeypatch):
    fake = StandIn(request.param)
    monkeypatch.setattr(cudnn_attention, "_cudnn_forward", fake.forward)
    monkeypatch.setattr(cudnn_attention, "_cudnn_backward", fake.backward)
    return fake


def test_log_sum_exp_layouts_round_trip_and_a_third_is_refused():
    tokens, heads = 5, 3
    for native in (torch.randn(tokens, heads, 1), torch.randn(heads, tokens)):
        handed, layout = cudnn_attention.lse_to_tokens_heads(native, tokens, heads)
        assert handed.shape == (tokens, heads) and handed.is_contiguous(), (handed.shape, layout)
        assert torch.equal(cudnn_attention.lse_from_tokens_heads(handed, layout), native), layout
    with pytest.raises(RuntimeError, match=r"log-sum-exp of shape \(3, 5, 1\)"):
        cudnn_attention.lse_to_tokens_heads(torch.randn(heads, tokens, 1), tokens, heads)


def test_backend_through_the_op_matches_the_reference(stand_in):
    """bf16 as on the GPU, empty documents as the loader makes them: the output and dq, dk, dv of
    the backend against the fp64 reference, through the op's forward and backward."""
    q, k, v, cu = make_qkv(LENGTHS, heads=2, head_dim=16, seed=1)
    qb, kb, vb = (x.to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (qb.double(), kb.double(), vb.double()))
    got = attention.cudnn_attention_backend(qb, kb, vb, cu_seqlens=cu, max_seqlen=300, window=None, cache={})
    want = reference_attention(qr, kr, vr, cu, None)
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max().item() < 2e-2
    grad = torch.randn_like(want)
    got.backward(grad.to(torch.bfloat16))
    want.backward(grad)
    for name, a, b in (("q", qb, qr), ("k", kb, kr), ("v", vb, vr)):
        rel = ((a.grad.double() - b.grad).norm() / b.grad.norm()).item()
        assert rel < 2e-2, f"d{name}: relative error {rel} ({stand_in.layout})"
    assert (stand_in.forward_calls, stand_in.backward_calls) == (1, 1)


def test_op_passes_opcheck_and_compiles_into_one_graph(stand_in):
    """The fake implementation states what the real one returns (torch.library.opcheck: shapes,
    strides, the autograd registration), and a compiled call is one graph with the same gradients."""
    q, k, v, cu = make_qkv(LENGTHS, heads=2, head_dim=16, seed=2)
    q, k, v = (x.float().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(cudnn_attention.cudnn_attention, (q, k, v, cu, 300, 0.25))

    def loss_of(fn):
        for x in (q, k, v):
            x.grad = None
        out, _ = fn(q, k, v, cu, 300, 0.25)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        return [x.grad.clone() for x in (q, k, v)]

    eager = loss_of(cudnn_attention.cudnn_attention)
    torch._dynamo.reset()
    compiled = loss_of(torch.compile(cudnn_attention.cudnn_attention, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()


def test_windowed_layers_and_short_chunks_go_to_varlen(stand_in, monkeypatch):
    """cuDNN takes no window, and torch keeps chunks whose documents are all <= 128 tokens off its
    ragged path: both go to torch's varlen_attn (the torch_varlen backend), the rest to the op."""
    routed = []
    monkeypatch.setattr(attention, "torch_varlen_backend", lambda q, k, v, **kw: routed.append(
        (kw["window"], kw["max_seqlen"])) or q)
    q, k, v, cu = make_qkv([100, 28])
    for window, max_seqlen in ((128, 1024), (None, 128), (None, 129)):
        attention.cudnn_attention_backend(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen, window=window, cache={})
    assert routed == [(128, 1024), (None, 128)], routed
    assert stand_in.forward_calls == 1


def test_unavailable_here_says_why():
    reason = unavailable_reason("cudnn")
    if torch.cuda.is_available() and reason is None:
        pytest.skip("cuDNN's ragged path is available on this GPU (the gpu tests cover it)")
    if not torch.cuda.is_available():
        assert reason.startswith(("cudnn needs a CUDA GPU", f"torch {torch.__version__} has no ragged")), reason
    with pytest.raises(ValueError, match=re.escape(f"attention backend 'cudnn' is not available: {reason}")):
        get_backend("cudnn")


def _needs_cudnn():
    reason = unavailable_reason("cudnn")
    if reason:
        pytest.skip(f"cudnn not available here: {reason}")


@pytest.mark.gpu
def test_cuda_op_passes_opcheck_with_empty_documents():
    """The real cuDNN kernels: the fake states their output shapes and strides (the log-sum-exp's
    layout included), with the loader's empty document slots in cu_seqlens."""
    _needs_cudnn()
    q, k, v, cu = make_qkv(LENGTHS, heads=12, head_dim=64, seed=3)
    q, k, v = (x.cuda().to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    torch.library.opcheck(cudnn_attention.cudnn_attention, (q, k, v, cu.cuda(), 300, 0.125))
    assert cudnn_attention._native_lse_layout["layout"] in LAYOUTS


@pytest.mark.gpu
def test_cuda_empty_documents_match_the_reference():
    _needs_cudnn()
    q, k, v, cu = make_qkv(LENGTHS, heads=12, head_dim=64, seed=4)
    qb, kb, vb = (x.cuda().to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (qb, kb, vb))
    cu = cu.cuda()
    got = attention.cudnn_attention_backend(qb, kb, vb, cu_seqlens=cu, max_seqlen=300, window=None, cache={})
    want = reference_attention(qr, kr, vr, cu, None)
    assert (got.double() - want).abs().max().item() < 2e-2
    grad = torch.randn_like(want)
    got.backward(grad.bfloat16())
    want.backward(grad)
    for name, a, b in (("q", qb, qr), ("k", kb, kr), ("v", vb, vr)):
        rel = ((a.grad.double() - b.grad).norm() / b.grad.norm()).item()
        assert rel < 2e-2, f"d{name}: relative error {rel}"


@pytest.mark.gpu
def test_cuda_op_never_synchronizes():
    """Forward and backward under torch.cuda.set_sync_debug_mode("error"), after one call (cuDNN
    builds and caches its graph for the shapes): the ragged path must not read the document
    offsets back to the host (a wait per global layer, and no sync-free training)."""
    _needs_cudnn()
    q, k, v, cu = make_qkv(LENGTHS, heads=12, head_dim=64, seed=5)
    q, k, v = (x.cuda().to(torch.bfloat16).requires_grad_() for x in (q, k, v))
    cu = cu.cuda()
    grad = torch.randn_like(q)

    def step():
        out = attention.cudnn_attention_backend(q, k, v, cu_seqlens=cu, max_seqlen=300, window=None, cache={})
        out.backward(grad)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_cuda_compiled_model_with_cudnn_matches_torch_varlen():
    """The compiled base-width model (3 layers: global, local, local) under bf16 autocast on a
    loader-like chunk (a pad tail, trailing empty document slots, storage offsets): the cudnn
    backend's loss and global-layer gradients against torch_varlen's."""
    _needs_cudnn()
    batch = loader_like_cuda_batch()
    results = {}
    for backend in ("torch_varlen", "cudnn"):
        cfg = preset("base")
        cfg.num_hidden_layers, cfg.attention_backend = 3, backend
        results[backend] = compiled_loss_and_grads(cfg, batch, ("layers.0.",))
    torch._dynamo.reset()
    (loss_ref, grads_ref), (loss_cudnn, grads_cudnn) = results["torch_varlen"], results["cudnn"]
    assert np.isfinite(loss_cudnn) and abs(loss_cudnn - loss_ref) < 1e-2 * abs(loss_ref), (loss_cudnn, loss_ref)
    for name, grad in grads_ref.items():
        assert ((grads_cudnn[name] - grad).norm() / grad.norm()).item() < 5e-2, name
    assert fastest_available("cuda") != "cudnn", "cudnn is opt-in until a GPU run has timed it"
