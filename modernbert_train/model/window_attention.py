"""Sliding-window attention over packed documents as Triton kernels (forward and backward).

Why: ModernBERT's local layers let each token see |i - j| <= 64 inside its own document. A
FlashAttention-2 varlen kernel with that window still works in 128 x 128 tiles: every 128 queries
touch up to 3 key tiles (384 keys) for at most 129 allowed ones, and on an H200 its local-layer
forward ran slower than the global one (1.16 vs 1.03 ms per layer at 96 x 1024, ~31 vs ~208
TFLOP/s; benchmarks/README.md). Here query and key tiles are 64 wide (32 or 128 if the GPU's
autotuning prefers), so 64 queries touch exactly the 3 key tiles (192 keys) their window spans,
and tiles outside the queries' documents are skipped.
Config `window_attention_kernel` (off until a GPU run times it): the local layers call this instead
of the attention backend on CUDA tensors; CPU tensors use the backend (or, under TRITON_INTERPRET=1
with fused_kernels.interpret_cpu_tensors, Triton's interpreter, which is how the CPU tests check it).

Layout: q, k, v, out (T, N, Dh) contiguous; per token the [start, end) of its document; lse (N, T)
in base-2 units of the scaled scores (what backward needs). Softmax statistics in fp32, matmuls in
the input dtype with fp32 accumulation. Backward: dk, dv per key tile (looping over the query tiles
that see it) and dq per query tile, each written once (no atomics: deterministic).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from modernbert_train.model import fused_kernels
from modernbert_train.model.attention import document_bounds

_LOG2E = 1.4426950408889634
# Query / key tile (64 first: 3 key tiles cover a 64-query tile's 129-key window; 32 wastes less,
# 128 is FlashAttention-2's), warps and software-pipelining depth, timed once per shape on the GPU
# (model/fused_kernels.py); Triton's interpreter runs the first.
_CONFIGS = [triton.Config(dict(TILE=t), num_warps=w, num_stages=s)
            for t, w, s in ((64, 4, 2), (64, 4, 3), (64, 8, 2), (32, 4, 2), (32, 2, 3), (128, 8, 2))]
_DELTA_TILE = 64
_KEY = ["n_heads", "HEAD_DIM", "HALF"]


@triton.jit
def _allowed(rows, cols, doc_lo, doc_hi, HALF: tl.constexpr):
    """(rows, cols) pairs in the same document (doc bounds of each row) and within the window."""
    return ((cols[None, :] >= doc_lo[:, None]) & (cols[None, :] < doc_hi[:, None])
            & (cols[None, :] >= rows[:, None] - HALF) & (cols[None, :] <= rows[:, None] + HALF))


@triton.jit
def _span(first, doc_lo, doc_hi, ok, n_tokens, TILE: tl.constexpr, HALF: tl.constexpr):
    """Tile-aligned [lo, hi) of the other side that a tile starting at `first` can see."""
    lo = tl.maximum(first - HALF, tl.min(tl.where(ok, doc_lo, n_tokens)))
    hi = tl.minimum(first + TILE + HALF, tl.max(tl.where(ok, doc_hi, 0)))
    return (lo // TILE) * TILE, hi


@triton.jit
def _offsets(tokens, head, n_heads, HEAD_DIM: tl.constexpr):
    """(tile, head dim) element offsets of `tokens` for one head in a (T, N, Dh) tensor."""
    return tokens[:, None].to(tl.int64) * (n_heads * HEAD_DIM) + head * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _bounds(start_ptr, end_ptr, tokens, ok):
    return tl.load(start_ptr + tokens, mask=ok, other=0), tl.load(end_ptr + tokens, mask=ok, other=0)


@triton.jit
def _tile_at(first, n_tokens, n_heads, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    """The tile's tokens from `first`, which of them exist, and their element offsets for this
    program's head."""
    tokens = first + tl.arange(0, TILE)
    return tokens, tokens < n_tokens, _offsets(tokens, tl.program_id(1), n_heads, HEAD_DIM)


@triton.jit
def _load_pair(a_ptr, b_ptr, offsets, ok):
    return (tl.load(a_ptr + offsets, mask=ok[:, None], other=0.0),
            tl.load(b_ptr + offsets, mask=ok[:, None], other=0.0))


@triton.jit
def _row_stats(lse_ptr, delta_ptr, head, n_tokens, rows, ok):
    """Backward's per-query lse (from forward) and delta = rowsum(dO * O), (N, T) layouts."""
    return (tl.load(lse_ptr + head * n_tokens + rows, mask=ok, other=0.0),
            tl.load(delta_ptr + head * n_tokens + rows, mask=ok, other=0.0))


@triton.jit
def _probabilities(q, k, rows, cols, doc_lo, doc_hi, lse, qk_scale, HALF: tl.constexpr):
    """Backward's softmax probabilities of one (query tile, key tile) pair, 0 where not allowed."""
    scores = tl.dot(q, tl.trans(k)) * qk_scale
    return tl.where(_allowed(rows, cols, doc_lo, doc_hi, HALF), tl.exp2(scores - lse[:, None]), 0.0)


@fused_kernels.autotune(_CONFIGS, key=_KEY)
@triton.jit
def _window_fwd(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, start_ptr, end_ptr, n_tokens, n_heads, qk_scale,
                HALF: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    head = tl.program_id(1)
    rows, row_ok, offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, n_heads, HEAD_DIM, TILE)
    q = tl.load(q_ptr + offsets, mask=row_ok[:, None], other=0.0)
    doc_lo, doc_hi = _bounds(start_ptr, end_ptr, rows, row_ok)
    lo, hi = _span(tl.program_id(0) * TILE, doc_lo, doc_hi, row_ok, n_tokens, TILE, HALF)
    peak = tl.full([TILE], float("-inf"), tl.float32)
    total = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], tl.float32)
    for first in range(lo, hi, TILE):
        cols, col_ok, kv_offsets = _tile_at(first, n_tokens, n_heads, HEAD_DIM, TILE)
        k, v = _load_pair(k_ptr, v_ptr, kv_offsets, col_ok)
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # base-2 units
        scores = tl.where(_allowed(rows, cols, doc_lo, doc_hi, HALF), scores, float("-inf"))
        new_peak = tl.maximum(peak, tl.max(scores, axis=1))
        safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)  # a row with nothing allowed yet
        p = tl.exp2(scores - safe[:, None])
        alpha = tl.exp2(peak - safe)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        peak = new_peak
    total = tl.where(row_ok, total, 1.0)
    tl.store(out_ptr + offsets, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + head * n_tokens + rows, peak + tl.log2(total), mask=row_ok)


@triton.jit
def _window_delta(out_ptr, do_ptr, delta_ptr, n_tokens, n_heads, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    """delta = rowsum(dO * O) per (head, token), which both backward kernels need."""
    rows, row_ok, offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, n_heads, HEAD_DIM, TILE)
    out, do = _load_pair(out_ptr, do_ptr, offsets, row_ok)
    delta = tl.sum(out.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + tl.program_id(1) * n_tokens + rows, delta, mask=row_ok)


@fused_kernels.autotune(_CONFIGS, key=_KEY)
@triton.jit
def _window_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, start_ptr, end_ptr,
                     n_tokens, n_heads, qk_scale, scale,
                     HALF: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    head = tl.program_id(1)
    cols, col_ok, kv_offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, n_heads, HEAD_DIM, TILE)
    k, v = _load_pair(k_ptr, v_ptr, kv_offsets, col_ok)
    key_lo, key_hi = _bounds(start_ptr, end_ptr, cols, col_ok)
    lo, hi = _span(tl.program_id(0) * TILE, key_lo, key_hi, col_ok, n_tokens, TILE, HALF)  # symmetric mask
    dk = tl.zeros([TILE, HEAD_DIM], tl.float32)
    dv = tl.zeros([TILE, HEAD_DIM], tl.float32)
    for first in range(lo, hi, TILE):
        rows, row_ok, offsets = _tile_at(first, n_tokens, n_heads, HEAD_DIM, TILE)
        q, do = _load_pair(q_ptr, do_ptr, offsets, row_ok)
        doc_lo, doc_hi = _bounds(start_ptr, end_ptr, rows, row_ok)
        lse, delta = _row_stats(lse_ptr, delta_ptr, head, n_tokens, rows, row_ok)
        p = _probabilities(q, k, rows, cols, doc_lo, doc_hi, lse, qk_scale, HALF)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(dk_ptr + kv_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + kv_offsets, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@fused_kernels.autotune(_CONFIGS, key=_KEY)
@triton.jit
def _window_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, end_ptr,
                   n_tokens, n_heads, qk_scale, scale,
                   HALF: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    head = tl.program_id(1)
    rows, row_ok, offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, n_heads, HEAD_DIM, TILE)
    q, do = _load_pair(q_ptr, do_ptr, offsets, row_ok)
    doc_lo, doc_hi = _bounds(start_ptr, end_ptr, rows, row_ok)
    lse, delta = _row_stats(lse_ptr, delta_ptr, head, n_tokens, rows, row_ok)
    lo, hi = _span(tl.program_id(0) * TILE, doc_lo, doc_hi, row_ok, n_tokens, TILE, HALF)
    dq = tl.zeros([TILE, HEAD_DIM], tl.float32)
    for first in range(lo, hi, TILE):
        cols, col_ok, kv_offsets = _tile_at(first, n_tokens, n_heads, HEAD_DIM, TILE)
        k, v = _load_pair(k_ptr, v_ptr, kv_offsets, col_ok)
        p = _probabilities(q, k, rows, cols, doc_lo, doc_hi, lse, qk_scale, HALF)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(dq_ptr + offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def _grid(n_tokens: int, n_heads: int):
    return lambda meta: (triton.cdiv(n_tokens, meta["TILE"]), n_heads)


@torch.library.custom_op("modernbert::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor,
                     doc_end: torch.Tensor, half_window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (T, N, Dh), Dh a power of two >= 16 (ModernBertConfig.validate checks it);
    doc_start / doc_end (T,) int32 -> out (T, N, Dh), lse (N, T) fp32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=q.device)
    if n_tokens:
        _window_fwd[_grid(n_tokens, n_heads)](q, k, v, out, lse, doc_start, doc_end, n_tokens, n_heads,
                                              scale * _LOG2E, HALF=half_window, HEAD_DIM=head_dim)
    return out, lse


@window_attention.register_fake
def _(q, k, v, doc_start, doc_end, half_window, scale):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("modernbert::window_attention_backward", mutates_args=())
def window_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, doc_start: torch.Tensor, doc_end: torch.Tensor,
                              half_window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    n_tokens, n_heads, head_dim = q.shape
    delta = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if n_tokens:
        _window_delta[(triton.cdiv(n_tokens, _DELTA_TILE), n_heads)](out, grad, delta, n_tokens, n_heads,
                                                                      HEAD_DIM=head_dim, TILE=_DELTA_TILE)
        common = dict(HALF=half_window, HEAD_DIM=head_dim)
        _window_bwd_dkdv[_grid(n_tokens, n_heads)](q, k, v, grad, lse, delta, dk, dv, doc_start, doc_end,
                                                   n_tokens, n_heads, scale * _LOG2E, scale, **common)
        _window_bwd_dq[_grid(n_tokens, n_heads)](q, k, v, grad, lse, delta, dq, doc_start, doc_end,
                                                 n_tokens, n_heads, scale * _LOG2E, scale, **common)
    return dq, dk, dv


@window_attention_backward.register_fake
def _(grad, q, k, v, out, lse, doc_start, doc_end, half_window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, doc_start, doc_end, half_window, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], doc_start, doc_end)
    ctx.half_window, ctx.scale = half_window, scale


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = window_attention_backward(grad, q, k, v, out, lse, doc_start, doc_end, ctx.half_window, ctx.scale)
    return dq, dk, dv, None, None, None, None


window_attention.register_autograd(_backward, setup_context=_setup)


def windowed(backend):
    """An attention backend for the local layers: this kernel for windowed calls on tensors Triton
    runs (CUDA, or the interpreter in tests); the given backend for everything else."""

    def attend(q, k, v, *, cu_seqlens, max_seqlen, window, cache, scale=None):
        if window is None or not fused_kernels.use_triton(q):
            return backend(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window, cache=cache,
                           scale=scale)
        if "document_bounds" not in cache:  # normally built once per forward by prepare_attention
            cache["document_bounds"] = document_bounds(cu_seqlens, q.shape[0])
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out, _ = window_attention(q, k, v, *cache["document_bounds"], window // 2, scale)
        return out

    return attend
