"""Sliding-window attention over packed documents as Triton kernels (forward and backward).

Why: ModernBERT's local layers let each token see |i - j| <= 64 inside its own document. A
FlashAttention-2 varlen kernel with that window still works in 128 x 128 tiles: every 128 queries
touch up to 3 key tiles (384 keys) for at most 129 allowed ones, and on an H200 its local-layer
forward ran slower than the global one (1.16 vs 1.03 ms per layer at 96 x 1024, ~31 vs ~208
TFLOP/s; benchmarks/README.md). Here query and key tiles are 64 wide (32 or 128 if the GPU's
autotuning prefers), so 64 queries touch exactly the 3 key tiles (192 keys) their window spans,
and tiles outside the queries' documents are skipped.
Config `window_attention_kernel` (default on: +6.6% tokens/s at 96 x 1024 on an H200,
benchmarks/README.md): the local layers call this instead of the attention backend on CUDA
tensors; CPU tensors use the backend (or, under TRITON_INTERPRET=1 with
fused_kernels.interpret_cpu_tensors, Triton's interpreter, which is how the CPU tests check it).

Config `window_attention_rope` (also off until timed): `window_attention_qkv` takes the Wqkv output
and the RoPE tables instead, rotates q and k as the kernels load them, and its backward writes the
gradient of the Wqkv output: no rotated copies in memory (`rotary_windowed`).

Config `global_attention_kernel` (off until timed): the global layers call the same kernels with
no window (HALF = WHOLE_DOCUMENT: a varlen attention in which each token sees its own document),
instead of the backend's FlashAttention-2 (on an H200 at 96 x 1024: ~0.9 ms forward and ~2.9 ms
backward per global layer, ~200 and ~160 TFLOP/s of allowed pairs; benchmarks/README.md). The
backward here recomputes the scores in both kernels (dk / dv, then dq: 7 matmuls per tile pair where
FlashAttention-2 does 5 with atomic dq adds), so whether it wins is for a GPU run to say.

Layout: q, k, v (T, N, Dh) with one token stride (contiguous, or views into the Wqkv output
(T, 3, N, Dh)), out (T, N, Dh) contiguous; per token the [start, end) of its document; lse (N, T)
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
# The half-window of config global_attention_kernel's global layers: each token sees its whole
# document (the spans below stay inside the documents, and 2^24 keeps their int32 arithmetic far
# from overflow). _WHOLE_DOCUMENT is the same number for the kernels.
WHOLE_DOCUMENT = 1 << 24
_WHOLE_DOCUMENT = tl.constexpr(WHOLE_DOCUMENT)
_KEY = ["n_heads", "HEAD_DIM", "HALF", "ROPE"]


@triton.jit
def _allowed(rows, cols, doc_lo, doc_hi, HALF: tl.constexpr):
    """(rows, cols) pairs in the same document (doc bounds of each row) and within the window (any
    pair of the document if HALF is WHOLE_DOCUMENT: no window compares compiled in)."""
    allowed = (cols[None, :] >= doc_lo[:, None]) & (cols[None, :] < doc_hi[:, None])
    if HALF < _WHOLE_DOCUMENT:
        allowed = allowed & (cols[None, :] >= rows[:, None] - HALF) & (cols[None, :] <= rows[:, None] + HALF)
    return allowed


@triton.jit
def _span(first, doc_lo, doc_hi, ok, n_tokens, TILE: tl.constexpr, HALF: tl.constexpr):
    """Tile-aligned [lo, hi) of the other side that a tile starting at `first` can see."""
    lo = tl.maximum(first - HALF, tl.min(tl.where(ok, doc_lo, n_tokens)))
    hi = tl.minimum(first + TILE + HALF, tl.max(tl.where(ok, doc_hi, 0)))
    return (lo // TILE) * TILE, hi


@triton.jit
def _offsets(tokens, head, stride, HEAD_DIM: tl.constexpr):
    """(tile, head dim) element offsets of `tokens` for one head, `stride` elements per token: a
    (T, N, Dh) tensor, or q, k or v inside the Wqkv output (T, 3, N, Dh)."""
    return tokens[:, None].to(tl.int64) * stride + head * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _bounds(start_ptr, end_ptr, tokens, ok):
    return tl.load(start_ptr + tokens, mask=ok, other=0), tl.load(end_ptr + tokens, mask=ok, other=0)


@triton.jit
def _tile_at(first, n_tokens, stride, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    """The tile's tokens from `first`, which of them exist, and their element offsets for this
    program's head."""
    tokens = first + tl.arange(0, TILE)
    return tokens, tokens < n_tokens, _offsets(tokens, tl.program_id(1), stride, HEAD_DIM)


@triton.jit
def _load_rotated(ptr, offsets, tokens, ok, cos_ptr, sin_ptr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """A q or k tile, with RoPE (rotate-half, as model/fused_kernels.py's op: y = x cos + sign x' sin,
    x' the element Dh / 2 away, sign -1 on the first half; fp32 math, one rounding) if ROPE."""
    x = tl.load(ptr + offsets, mask=ok[:, None], other=0.0)
    if ROPE:
        dims = tl.arange(0, HEAD_DIM)
        first_half = dims < HEAD_DIM // 2
        partner = tl.load(ptr + offsets + tl.where(first_half, HEAD_DIM // 2, -(HEAD_DIM // 2))[None, :],
                          mask=ok[:, None], other=0.0)
        cos, sin = _rope_tables(cos_ptr, sin_ptr, tokens, ok, HEAD_DIM)
        sign = tl.where(first_half, -1.0, 1.0)[None, :]
        x = (x.to(tl.float32) * cos + sign * partner.to(tl.float32) * sin).to(x.dtype)
    return x


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, tokens, ok, HEAD_DIM: tl.constexpr):
    """cos, sin (tile, Dh) fp32 of the tokens, from the (T, Dh) tables the model gathered."""
    at = tokens[:, None].to(tl.int64) * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    return (tl.load(cos_ptr + at, mask=ok[:, None], other=0.0),
            tl.load(sin_ptr + at, mask=ok[:, None], other=0.0))


@triton.jit
def _swap_halves(x, TILE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """x[:, d] -> x[:, (d + Dh / 2) % Dh], in registers."""
    lo, hi = tl.split(tl.permute(tl.reshape(x, (TILE, 2, HEAD_DIM // 2)), (0, 2, 1)))
    return tl.reshape(tl.permute(tl.join(hi, lo), (0, 2, 1)), (TILE, HEAD_DIM))


@triton.jit
def _unrotated(grad, tokens, ok, cos_ptr, sin_ptr, TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
               ROPE: tl.constexpr):
    """The gradient of a rotated tile taken back through RoPE (the rotation's transpose:
    g cos + sign (g sin)', sign +1 on the first half), if ROPE."""
    if ROPE:
        cos, sin = _rope_tables(cos_ptr, sin_ptr, tokens, ok, HEAD_DIM)
        sign = tl.where(tl.arange(0, HEAD_DIM) < HEAD_DIM // 2, 1.0, -1.0)[None, :]
        grad = grad * cos + sign * _swap_halves(grad * sin, TILE, HEAD_DIM)
    return grad


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
def _window_fwd(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, start_ptr, end_ptr, cos_ptr, sin_ptr, n_tokens, n_heads,
                stride, qk_scale, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, TILE: tl.constexpr):
    head = tl.program_id(1)
    rows, row_ok, offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, stride, HEAD_DIM, TILE)
    q = _load_rotated(q_ptr, offsets, rows, row_ok, cos_ptr, sin_ptr, HEAD_DIM, ROPE)
    doc_lo, doc_hi = _bounds(start_ptr, end_ptr, rows, row_ok)
    lo, hi = _span(tl.program_id(0) * TILE, doc_lo, doc_hi, row_ok, n_tokens, TILE, HALF)
    peak = tl.full([TILE], float("-inf"), tl.float32)
    total = tl.zeros([TILE], tl.float32)
    acc = tl.zeros([TILE, HEAD_DIM], tl.float32)
    for first in range(lo, hi, TILE):
        cols, col_ok, kv_offsets = _tile_at(first, n_tokens, stride, HEAD_DIM, TILE)
        k = _load_rotated(k_ptr, kv_offsets, cols, col_ok, cos_ptr, sin_ptr, HEAD_DIM, ROPE)
        v = tl.load(v_ptr + kv_offsets, mask=col_ok[:, None], other=0.0)
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
    out_offsets = _offsets(rows, head, n_heads * HEAD_DIM, HEAD_DIM)
    tl.store(out_ptr + out_offsets, (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + head * n_tokens + rows, peak + tl.log2(total), mask=row_ok)


@triton.jit
def _window_delta(out_ptr, do_ptr, delta_ptr, n_tokens, n_heads, HEAD_DIM: tl.constexpr, TILE: tl.constexpr):
    """delta = rowsum(dO * O) per (head, token), which both backward kernels need."""
    rows, row_ok, offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, n_heads * HEAD_DIM, HEAD_DIM, TILE)
    out = tl.load(out_ptr + offsets, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + offsets, mask=row_ok[:, None], other=0.0)
    delta = tl.sum(out.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + tl.program_id(1) * n_tokens + rows, delta, mask=row_ok)


@fused_kernels.autotune(_CONFIGS, key=_KEY)
@triton.jit
def _window_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, start_ptr, end_ptr,
                     cos_ptr, sin_ptr, n_tokens, n_heads, stride, qk_scale, scale,
                     HALF: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, TILE: tl.constexpr):
    """dk, dv of one key tile; with ROPE, dk is taken back through the keys' rotation. dk, dv are
    written with q, k, v's token stride (into d(qkv) when they came from the Wqkv output)."""
    head = tl.program_id(1)
    cols, col_ok, kv_offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, stride, HEAD_DIM, TILE)
    k = _load_rotated(k_ptr, kv_offsets, cols, col_ok, cos_ptr, sin_ptr, HEAD_DIM, ROPE)
    v = tl.load(v_ptr + kv_offsets, mask=col_ok[:, None], other=0.0)
    key_lo, key_hi = _bounds(start_ptr, end_ptr, cols, col_ok)
    lo, hi = _span(tl.program_id(0) * TILE, key_lo, key_hi, col_ok, n_tokens, TILE, HALF)  # symmetric mask
    dk = tl.zeros([TILE, HEAD_DIM], tl.float32)
    dv = tl.zeros([TILE, HEAD_DIM], tl.float32)
    for first in range(lo, hi, TILE):
        rows, row_ok, offsets = _tile_at(first, n_tokens, stride, HEAD_DIM, TILE)
        q = _load_rotated(q_ptr, offsets, rows, row_ok, cos_ptr, sin_ptr, HEAD_DIM, ROPE)
        do = tl.load(do_ptr + _offsets(rows, head, n_heads * HEAD_DIM, HEAD_DIM), mask=row_ok[:, None], other=0.0)
        doc_lo, doc_hi = _bounds(start_ptr, end_ptr, rows, row_ok)
        lse, delta = _row_stats(lse_ptr, delta_ptr, head, n_tokens, rows, row_ok)
        p = _probabilities(q, k, rows, cols, doc_lo, doc_hi, lse, qk_scale, HALF)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dk = _unrotated(dk * scale, cols, col_ok, cos_ptr, sin_ptr, TILE, HEAD_DIM, ROPE)
    tl.store(dk_ptr + kv_offsets, dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
    tl.store(dv_ptr + kv_offsets, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])


@fused_kernels.autotune(_CONFIGS, key=_KEY)
@triton.jit
def _window_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, start_ptr, end_ptr, cos_ptr, sin_ptr,
                   n_tokens, n_heads, stride, qk_scale, scale,
                   HALF: tl.constexpr, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr, TILE: tl.constexpr):
    """dq of one query tile (through the queries' rotation with ROPE), written with q's token stride."""
    head = tl.program_id(1)
    rows, row_ok, offsets = _tile_at(tl.program_id(0) * TILE, n_tokens, stride, HEAD_DIM, TILE)
    q = _load_rotated(q_ptr, offsets, rows, row_ok, cos_ptr, sin_ptr, HEAD_DIM, ROPE)
    do = tl.load(do_ptr + _offsets(rows, head, n_heads * HEAD_DIM, HEAD_DIM), mask=row_ok[:, None], other=0.0)
    doc_lo, doc_hi = _bounds(start_ptr, end_ptr, rows, row_ok)
    lse, delta = _row_stats(lse_ptr, delta_ptr, head, n_tokens, rows, row_ok)
    lo, hi = _span(tl.program_id(0) * TILE, doc_lo, doc_hi, row_ok, n_tokens, TILE, HALF)
    dq = tl.zeros([TILE, HEAD_DIM], tl.float32)
    for first in range(lo, hi, TILE):
        cols, col_ok, kv_offsets = _tile_at(first, n_tokens, stride, HEAD_DIM, TILE)
        k = _load_rotated(k_ptr, kv_offsets, cols, col_ok, cos_ptr, sin_ptr, HEAD_DIM, ROPE)
        v = tl.load(v_ptr + kv_offsets, mask=col_ok[:, None], other=0.0)
        p = _probabilities(q, k, rows, cols, doc_lo, doc_hi, lse, qk_scale, HALF)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = _unrotated(dq * scale, rows, row_ok, cos_ptr, sin_ptr, TILE, HEAD_DIM, ROPE)
    tl.store(dq_ptr + offsets, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


def _grid(n_tokens: int, n_heads: int):
    return lambda meta: (triton.cdiv(n_tokens, meta["TILE"]), n_heads)


def _forward(q, k, v, cos, sin, doc_start, doc_end, half_window: int, scale: float, rope: bool):
    """q, k, v (T, N, Dh) with a common token stride (contiguous, or views into the Wqkv output);
    cos / sin (T, Dh) fp32 if `rope` -> out (T, N, Dh) contiguous, lse (N, T) fp32."""
    n_tokens, n_heads, head_dim = q.shape
    out = q.new_empty(n_tokens, n_heads, head_dim)
    lse = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=q.device)
    if n_tokens:
        _window_fwd[_grid(n_tokens, n_heads)](q, k, v, out, lse, doc_start, doc_end, cos, sin, n_tokens, n_heads,
                                              q.stride(0), scale * _LOG2E, HALF=half_window, HEAD_DIM=head_dim,
                                              ROPE=rope)
    return out, lse


def _backward(grad, q, k, v, out, lse, cos, sin, doc_start, doc_end, dq, dk, dv, half_window: int, scale: float,
              rope: bool) -> None:
    """dq, dk, dv written in place (their token stride is q's)."""
    n_tokens, n_heads, head_dim = q.shape
    if not n_tokens:
        return
    delta = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=q.device)
    _window_delta[(triton.cdiv(n_tokens, _DELTA_TILE), n_heads)](out, grad, delta, n_tokens, n_heads,
                                                                  HEAD_DIM=head_dim, TILE=_DELTA_TILE)
    common = dict(HALF=half_window, HEAD_DIM=head_dim, ROPE=rope)
    _window_bwd_dkdv[_grid(n_tokens, n_heads)](q, k, v, grad, lse, delta, dk, dv, doc_start, doc_end, cos, sin,
                                               n_tokens, n_heads, q.stride(0), scale * _LOG2E, scale, **common)
    _window_bwd_dq[_grid(n_tokens, n_heads)](q, k, v, grad, lse, delta, dq, doc_start, doc_end, cos, sin,
                                             n_tokens, n_heads, q.stride(0), scale * _LOG2E, scale, **common)


@torch.library.custom_op("modernbert::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start: torch.Tensor,
                     doc_end: torch.Tensor, half_window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (T, N, Dh), Dh a power of two >= 16 (ModernBertConfig.validate checks it);
    doc_start / doc_end (T,) int32 -> out (T, N, Dh), lse (N, T) fp32."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _forward(q, k, v, q, q, doc_start, doc_end, half_window, scale, rope=False)  # (no tables read)


@window_attention.register_fake
def _(q, k, v, doc_start, doc_end, half_window, scale):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("modernbert::window_attention_backward", mutates_args=())
def window_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, doc_start: torch.Tensor, doc_end: torch.Tensor,
                              half_window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _backward(grad.contiguous(), q, k, v, out, lse, q, q, doc_start, doc_end, dq, dk, dv, half_window, scale,
              rope=False)
    return dq, dk, dv


@window_attention_backward.register_fake
def _(grad, q, k, v, out, lse, doc_start, doc_end, half_window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    """Both ops: their three tensor inputs (q, k, v or qkv, cos, sin), out, lse and the bounds."""
    a, b, c, doc_start, doc_end, half_window, scale = inputs
    ctx.save_for_backward(a, b, c, output[0], output[1], doc_start, doc_end)
    ctx.half_window, ctx.scale = half_window, scale


def _grad(ctx, grad, _grad_lse):
    q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = window_attention_backward(grad, q, k, v, out, lse, doc_start, doc_end, ctx.half_window, ctx.scale)
    return dq, dk, dv, None, None, None, None


window_attention.register_autograd(_grad, setup_context=_setup)


@torch.library.custom_op("modernbert::window_attention_qkv", mutates_args=())
def window_attention_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_start: torch.Tensor,
                         doc_end: torch.Tensor, half_window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE and the windowed attention in one: the Wqkv output qkv (T, 3, N, Dh), cos / sin (T, Dh)
    fp32 (what model/modernbert.py's rotary_qkv takes) -> out (T, N, Dh), lse (N, T) fp32. q and k
    are rotated as the kernels load them: no rotated copies in memory, forward or backward."""
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    return _forward(*qkv.unbind(1), cos, sin, doc_start, doc_end, half_window, scale, rope=True)


@window_attention_qkv.register_fake
def _(qkv, cos, sin, doc_start, doc_end, half_window, scale):
    return qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3]), qkv.new_empty(
        qkv.shape[2], qkv.shape[0], dtype=torch.float32)


@torch.library.custom_op("modernbert::window_attention_qkv_backward", mutates_args=())
def window_attention_qkv_backward(grad: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, doc_start: torch.Tensor,
                                  doc_end: torch.Tensor, half_window: int, scale: float) -> torch.Tensor:
    """-> d(qkv) (T, 3, N, Dh), each third written once by the kernels."""
    qkv = qkv.contiguous()
    dqkv = torch.empty_like(qkv)
    _backward(grad.contiguous(), *qkv.unbind(1), out, lse, cos, sin, doc_start, doc_end, *dqkv.unbind(1),
              half_window, scale, rope=True)
    return dqkv


@window_attention_qkv_backward.register_fake
def _(grad, qkv, cos, sin, out, lse, doc_start, doc_end, half_window, scale):
    return torch.empty_like(qkv)


def _qkv_grad(ctx, grad, _grad_lse):
    qkv, cos, sin, out, lse, doc_start, doc_end = ctx.saved_tensors
    dqkv = window_attention_qkv_backward(grad, qkv, cos, sin, out, lse, doc_start, doc_end, ctx.half_window,
                                         ctx.scale)
    return dqkv, None, None, None, None, None, None


window_attention_qkv.register_autograd(_qkv_grad, setup_context=_setup)


def _cached_bounds(cache: dict, cu_seqlens: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's document [start, end), normally built once per forward by prepare_attention."""
    if "document_bounds" not in cache:
        cache["document_bounds"] = document_bounds(cu_seqlens, n_tokens)
    return cache["document_bounds"]


def _half_window(window: int | None, whole_document: bool) -> int | None:
    """The kernels' HALF for a call with this window, or None where the backend takes the call."""
    if window is not None:
        return window // 2
    return WHOLE_DOCUMENT if whole_document else None


def windowed(backend, whole_document: bool = False):
    """An attention backend for the local layers: this kernel for windowed calls on tensors Triton
    runs (CUDA, or the interpreter in tests); the given backend for everything else. With
    `whole_document` (config global_attention_kernel's global layers) the kernel takes the calls
    without a window too, each token seeing its whole document."""

    def attend(q, k, v, *, cu_seqlens, max_seqlen, window, cache, scale=None):
        half = _half_window(window, whole_document)
        if half is None or not fused_kernels.use_triton(q):
            return backend(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window, cache=cache,
                           scale=scale)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        out, _ = window_attention(q, k, v, *_cached_bounds(cache, cu_seqlens, q.shape[0]), half, scale)
        return out

    return attend


def rotary_windowed(rotary, backend, qkv, rope, *, cu_seqlens, max_seqlen, window, cache, whole_document=False):
    """RoPE and attention for the local layers (config window_attention_rope; model/modernbert.py's
    attention_op), and for the global layers too with `whole_document` (as `windowed`):
    window_attention_qkv on tensors Triton runs, else the RoPE op `rotary` and the given backend."""
    half = _half_window(window, whole_document)
    if half is None or not fused_kernels.use_triton(qkv):
        return backend(*rotary(qkv, *rope), cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window, cache=cache)
    out, _ = window_attention_qkv(qkv, *rope, *_cached_bounds(cache, cu_seqlens, qkv.shape[0]), half,
                                  1.0 / math.sqrt(qkv.shape[-1]))
    return out
