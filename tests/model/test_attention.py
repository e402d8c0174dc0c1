"""Every available attention backend against the dense SDPA reference: forward, backward,
window boundary, document isolation."""
from __future__ import annotations

import pytest
import torch

from modernbert_train.model.attention import (dense_allowed_mask, document_bounds, flex_cpu_training_missing, get_backend,
                                              token_document_ids, unavailable_reason)
from modernbert_train.model.modernbert import positions_from_cu_seqlens

DOC_LAYOUTS = {
    "one_doc_300": [300],
    "three_docs": [100, 150, 50],
    "many_short_and_a_long": [2, 7, 130, 1, 64, 65, 200],
    "ragged_block_tail": [129, 257],
}


def reference_attention(q, k, v, cu_seqlens, window):
    """Plain per-document softmax attention written independently of the backends."""
    out = torch.zeros_like(q)
    scale = q.shape[-1] ** -0.5
    for d in range(len(cu_seqlens) - 1):
        s, e = int(cu_seqlens[d]), int(cu_seqlens[d + 1])
        if e == s:
            continue
        qd, kd, vd = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        scores = qd @ kd.transpose(-1, -2) * scale  # (N, L, L)
        if window is not None:
            idx = torch.arange(e - s, device=q.device)
            scores = scores.masked_fill((idx[:, None] - idx[None, :]).abs() > window // 2, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vd).transpose(0, 1)
    return out


def make_qkv(lengths, heads=2, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu


def run_backend(name, q, k, v, cu, window):
    fn = get_backend(name)
    return fn(q, k, v, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()), window=window, cache={})


# The loader's chunks end their document list with empty slots (cu_seqlens repeats the total).
SDPA_LAYOUTS = {**DOC_LAYOUTS, "empty_documents": [100, 0, 150, 0, 0]}


@pytest.mark.parametrize("window", [None, 128, 32])
@pytest.mark.parametrize("layout", sorted(SDPA_LAYOUTS))
def test_sdpa_matches_independent_reference(layout, window):
    q, k, v, cu = make_qkv(SDPA_LAYOUTS[layout])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    got = run_backend("sdpa", q, k, v, cu, window)
    want = reference_attention(qr, kr, vr, cu, window)
    err = (got - want).abs().max().item()
    assert err < 1e-10, f"sdpa vs reference max abs err {err} ({layout}, window={window})"
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    for name, a, b in (("q", q, qr), ("k", k, kr), ("v", v, vr)):
        err = (a.grad - b.grad).abs().max().item()
        assert err < 1e-10, f"sdpa d{name} max abs err {err} ({layout}, window={window})"


def test_sdpa_refuses_documents_that_do_not_cover_the_tokens():
    q, k, v, _ = make_qkv([300])
    with pytest.raises(ValueError, match="cu_seqlens ends at 200 but there are 300 tokens"):
        run_backend("sdpa", q, k, v, torch.tensor([0, 100, 200], dtype=torch.int32), None)


GPU_ONLY = [pytest.param(name, marks=pytest.mark.gpu) for name in ("flash", "torch_varlen", "cudnn")]


@pytest.mark.parametrize("backend", ["flex", *GPU_ONLY])
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("layout", sorted(DOC_LAYOUTS))
def test_backend_matches_reference_forward_backward(backend, layout, window):
    reason = unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend} not available here: {reason}")
    # Half-precision kernels (flash, varlen) only run in bf16 on the GPU; flex runs fp32 anywhere.
    dtype = torch.float32 if backend == "flex" else torch.bfloat16
    device = "cuda" if backend != "flex" or torch.cuda.is_available() else "cpu"
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    cannot_train = None if device == "cuda" else flex_cpu_training_missing()
    q, k, v, cu = make_qkv(DOC_LAYOUTS[layout])
    q, k, v = (x.to(device, dtype).requires_grad_(not cannot_train) for x in (q, k, v))
    cu = cu.to(device)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    got = run_backend(backend, q, k, v, cu, window)
    want = reference_attention(qr, kr, vr, cu, window)
    err = (got.double() - want).abs().max().item()
    assert err < tol, f"{backend} forward max abs err {err} ({layout}, window={window})"
    if cannot_train:
        pytest.skip(f"forward matched; no backward to compare: {cannot_train}")
    grad = torch.randn_like(want)
    got.backward(grad.to(got.dtype))
    want.backward(grad)
    for name, a, b in (("q", q, qr), ("k", k, kr), ("v", v, vr)):
        err = (a.grad.double() - b.grad).abs().max().item()
        assert err < tol * 5, f"{backend} d{name} max abs err {err} ({layout}, window={window})"


def test_window_boundary_is_inclusive_half_width():
    """window=128: token i sees j iff |i - j| <= 64, within its own document."""
    allowed = dense_allowed_mask(torch.tensor([0, 200, 300], dtype=torch.int32), 300, window=128)
    assert allowed[100, 36] and allowed[100, 164], "|i-j| = 64 must be visible"
    assert not allowed[100, 35] and not allowed[100, 165], "|i-j| = 65 must be hidden"
    assert not allowed[199, 200] and not allowed[200, 199], "no attention across the document boundary"
    assert allowed[250, 299] and allowed[299, 250]


@pytest.mark.parametrize("backend", ["sdpa", "flex", *GPU_ONLY])
def test_changing_one_document_leaves_the_others_unchanged(backend):
    reason = unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend} not available here: {reason}")
    device = "cuda" if backend in ("flash", "torch_varlen", "cudnn") else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and backend != "flex" else torch.float32
    lengths = [90, 140, 70]
    q, k, v, cu = (x.to(device) for x in make_qkv(lengths))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    base = run_backend(backend, q, k, v, cu, None)
    k2, v2 = k.clone(), v.clone()
    k2[90:230] += 3.0
    v2[90:230] -= 2.0
    changed = run_backend(backend, q, k2, v2, cu, None)
    assert torch.equal(base[:90], changed[:90]) and torch.equal(base[230:], changed[230:])
    assert not torch.equal(base[90:230], changed[90:230]), "the edited document must change"


def test_unknown_or_missing_backend_fails_with_the_fix():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        get_backend("nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="attention backend 'flash' is not available: .*(flash-attn|CUDA)"):
            get_backend("flash")


def test_flex_block_mask_has_no_dense_intermediate_and_matches_rule():
    """The block-level mask: blocks marked empty contain no allowed pair; full blocks only allowed ones."""
    from modernbert_train.model.attention import flex_block_mask
    lengths = [300, 5, 400, 63, 256]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    pad = (-total) % 128
    cu_p = torch.cat([cu, cu.new_tensor([total + pad])])
    for window in (None, 128):
        bm = flex_block_mask(cu_p, total + pad, window)
        dense = dense_allowed_mask(cu_p, total + pad, window)
        nb = (total + pad) // 128
        blocks = dense.view(nb, 128, nb, 128).permute(0, 2, 1, 3)
        any_ok, all_ok = blocks.any(-1).any(-1), blocks.all(-1).all(-1)
        listed = torch.zeros(nb, nb, dtype=torch.bool)
        full = torch.zeros(nb, nb, dtype=torch.bool)
        for i in range(nb):
            listed[i, bm.kv_indices[0, 0, i, : bm.kv_num_blocks[0, 0, i]].long()] = True
            full[i, bm.full_kv_indices[0, 0, i, : bm.full_kv_num_blocks[0, 0, i]].long()] = True
        dropped = any_ok & ~(listed | full)
        assert not dropped.any(), f"{int(dropped.sum())} blocks with allowed pairs were dropped (window={window})"
        assert not (full & ~all_ok).any(), f"block marked full contains a masked pair (window={window})"
        assert not (full & listed).any(), "a block is both full and partial"
        # The block structure is sparse, not everything-partial: most blocks are skipped.
        assert (listed | full).sum() < nb * nb / 2, f"{int((listed | full).sum())} of {nb * nb} blocks visited"


def test_flex_trains_on_the_cpu_through_torch_2_9_only():
    """The probe the trainer's assembly asks before it accepts flex on the CPU: torch 2.7 runs
    FlexAttention's eager backward there, torch 2.10 and later refuse it (pytorch/pytorch#169646).
    If a later torch brings a CPU backward back, this fails, and the version bound below moves."""
    if unavailable_reason("flex"):
        pytest.skip(f"flex not available here: {unavailable_reason('flex')}")
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    reason = flex_cpu_training_missing()
    assert (reason is None) == (version < (2, 10)), (torch.__version__, reason)


def test_auto_resolves_to_a_backend_that_runs_here():
    from modernbert_train.model.attention import fastest_available
    assert fastest_available("cpu") == "sdpa"
    on_cuda = fastest_available("cuda")
    assert on_cuda in ("torch_varlen", "flash", "flex") and unavailable_reason(on_cuda) is None, on_cuda
    if torch.cuda.is_available() and unavailable_reason("torch_varlen") is None:
        assert on_cuda == "torch_varlen", "the fastest measured backend wins when it can run"


def _document_structure(cu_seqlens: torch.Tensor, total: int):
    start, end = document_bounds(cu_seqlens, total)
    return token_document_ids(cu_seqlens, total), start, end, positions_from_cu_seqlens(cu_seqlens, total)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_document_structure_compiled_matches_the_definition(device):
    """Each token's document, its [start, end) and its position, eager and Inductor-compiled (dynamic
    number of document slots, as the trainer marks them) against a loop over the documents. Guards
    the compiled searchsorted (pytorch/pytorch#182343: on CUDA a slice's offset was dropped, every
    token got the next document)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    lengths = [3, 0, 4, 5, 1, 64, 0, 0]  # empty documents in the middle and as trailing slots
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = sum(lengths)
    want = ([], [], [], [])
    for d, n in enumerate(lengths):
        s = sum(lengths[:d])
        for i in range(n):
            for column, value in zip(want, (d, s, s + n, i)):
                column.append(value)
    # Also as the second chunk of a stacked batch (data/loader.py split_batch): a storage offset.
    offset = torch.stack([cu, cu])[1]
    for source, offsets in (("plain", cu), ("offset view", offset)):
        torch._dynamo.reset()
        compiled = torch.compile(_document_structure, dynamic=False)
        torch._dynamo.mark_dynamic(offsets, 0)
        for name, fn in (("eager", _document_structure), ("compiled", compiled)):
            got = fn(offsets, total)
            for field, g, w in zip(("document", "start", "end", "position"), got, want):
                assert g.tolist() == w, f"{name} {field} on {device} ({source} cu_seqlens)"
    torch._dynamo.reset()
