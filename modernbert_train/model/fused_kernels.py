"""Triton kernels for the pointwise parts of a layer: GeGLU and RoPE, forward and backward.

Why: the kernels torch.compile generates for these two backward passes are instruction-bound (110
and 58 PTX instructions per element, scalar loads; benchmarks/inductor_kernels.py); these issue
3.5x and 8.8x fewer, with 16-byte loads and stores.
Config `fused_kernels` (default on: +5-6% tokens/s and -6 GiB peak at
96 x 1024 on an H200, benchmarks/README.md). Each op is a torch.library custom op, so torch.compile
calls it without a graph break. CUDA tensors go to Triton; CPU tensors to the PyTorch definitions
(model/modernbert.py: rotary_qkv, geglu_activation), without the custom op, whose Python dispatch
costs more than those CPU ops; or, with TRITON_INTERPRET=1 set before import
and `interpret_cpu_tensors = True` (the CPU tests set both), to Triton's interpreter.
Math in fp32, one rounding to the input dtype.
- geglu: h (T, 2I) -> GELU(h[:, :I]) * h[:, I:] (T, I); backward writes dh in one pass.
- rotary_qkv: the Wqkv output (T, 3, N, Dh) -> q, k rotated and v, each (T, N, Dh) contiguous;
  backward writes d(qkv) from dq, dk, dv in one pass (no separate concat).
- layer_norm (bias-free) and add_layer_norm (the residual add before it in the same pass, and the
  stream's gradient added in its backward); LayerNorm and AddNorm, the model's modules that call
  them (config fused_layer_norm, off until a GPU run times it against what torch.compile generates:
  benchmarks/bench_kernels.py alone, benchmarks/bench_step.py option `lnk` in the whole step).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from modernbert_train.model import modernbert

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# Off unless switched on: TRITON_INTERPRET=1 is inherited by subprocesses (training runs started by
# the tests), which must not run every step in the interpreter.
interpret_cpu_tensors = False


def use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or (_INTERPRET and interpret_cpu_tensors)


class _Autotuned:
    """kernel[grid](...) over block-size configs. On the GPU, triton.autotune times them once per
    value of `key` (built at the first launch: its timer needs a GPU driver, import must not); in
    the interpreter, which has no GPU timer, the first config runs."""

    def __init__(self, kernel, configs: list[triton.Config], key: list[str]):
        self.kernel, self.configs, self.key, self._tuned = kernel, configs, key, None

    def __getitem__(self, grid):
        if _INTERPRET:
            meta = dict(self.configs[0].kwargs)
            return lambda *args, **kwargs: self.kernel[grid(meta)](*args, **kwargs, **meta,
                                                                   num_warps=self.configs[0].num_warps)
        if self._tuned is None:
            self._tuned = triton.autotune(self.configs, key=self.key)(self.kernel)
        return self._tuned[grid]

    def timings(self) -> dict[str, float]:
        """ms per config of the latest tuning (GPU only; empty before the first launch), fastest
        first: what benchmarks/bench_kernels.py reports, to see which tiles win on a card."""
        measured = getattr(self._tuned, "configs_timings", None) or {}
        ms = {str(c): float(t[0] if isinstance(t, (list, tuple)) else t) for c, t in measured.items()}
        return dict(sorted(ms.items(), key=lambda item: item[1]))


_AUTOTUNED: list[_Autotuned] = []


def autotune(configs: list[triton.Config], key: list[str]):
    def wrap(kernel) -> _Autotuned:
        _AUTOTUNED.append(_Autotuned(kernel, configs, key))
        return _AUTOTUNED[-1]
    return wrap


def autotune_timings() -> dict[str, dict[str, float]]:
    """Each kernel (here and in model/window_attention.py) tuned so far in this process: ms per
    config, fastest first."""
    return {getattr(t.kernel, "__name__", repr(t.kernel)): t.timings() for t in _AUTOTUNED if t.timings()}


# --- GeGLU -----------------------------------------------------------------------------------------

_GEGLU_CONFIGS = [triton.Config(dict(BLOCK_R=r, BLOCK_C=c), num_warps=w)
                  for r, c, w in ((16, 128, 4), (8, 256, 4), (32, 128, 8), (4, 512, 4), (64, 64, 8))]


@autotune(_GEGLU_CONFIGS, key=["n_cols"])
@triton.jit
def _geglu_fwd(h_ptr, out_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    h = h_ptr + rows[:, None] * (2 * n_cols) + cols[None, :]
    a = tl.load(h, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h + n_cols, mask=mask, other=0.0).to(tl.float32)
    gelu = 0.5 * a * (1.0 + tl.erf(a * _SQRT_HALF))
    out = out_ptr + rows[:, None] * n_cols + cols[None, :]
    tl.store(out, (gelu * b).to(out_ptr.dtype.element_ty), mask=mask)


@autotune(_GEGLU_CONFIGS, key=["n_cols"])
@triton.jit
def _geglu_bwd(h_ptr, grad_ptr, dh_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    in_offs = rows[:, None] * (2 * n_cols) + cols[None, :]
    a = tl.load(h_ptr + in_offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + in_offs + n_cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(a * _SQRT_HALF))
    pdf = tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    out_ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + in_offs, (g * b * (cdf + a * pdf)).to(out_ty), mask=mask)
    tl.store(dh_ptr + in_offs + n_cols, (g * a * cdf).to(out_ty), mask=mask)


def _geglu_grid(n_rows: int, n_cols: int):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]), triton.cdiv(n_cols, meta["BLOCK_C"]))


def geglu(h: torch.Tensor) -> torch.Tensor:
    """h (T, 2I) -> GELU(h[:, :I]) * h[:, I:] (T, I), exact (erf) GELU: the kernels' op, or on the CPU
    the PyTorch definition and its autograd (a custom op's Python dispatch costs ~0.2 ms a call)."""
    return geglu_op(h) if use_triton(h) else modernbert.geglu_activation(h)


@torch.library.custom_op("modernbert::geglu", mutates_args=())
def geglu_op(h: torch.Tensor) -> torch.Tensor:
    h = h.contiguous()
    n_rows, n_cols = h.shape[0], h.shape[1] // 2
    out = h.new_empty(n_rows, n_cols)
    _geglu_fwd[_geglu_grid(n_rows, n_cols)](h, out, n_rows, n_cols)
    return out


@geglu_op.register_fake
def _(h: torch.Tensor) -> torch.Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("modernbert::geglu_backward", mutates_args=())
def geglu_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    h, grad = h.contiguous(), grad.contiguous()
    n_rows, n_cols = grad.shape
    dh = torch.empty_like(h)
    _geglu_bwd[_geglu_grid(n_rows, n_cols)](h, grad, dh, n_rows, n_cols)
    return dh


@geglu_backward.register_fake
def _(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(h)


def _geglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _geglu_grad(ctx, grad):
    return geglu_backward(ctx.saved_tensors[0], grad)


geglu_op.register_autograd(_geglu_grad, setup_context=_geglu_setup)


# --- RoPE on the Wqkv output -----------------------------------------------------------------------

@triton.jit
def _rotate_pair(packed_ptr, split_ptr, packed, split, mask, c1, c2, s1, s2,
                 HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """One of q, k: the (rows, Dh / 2) halves at `packed` in qkv and at `split` in q or k."""
    if BACKWARD:  # the rotation's transpose: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
        g1 = tl.load(split_ptr + split, mask=mask, other=0.0).to(tl.float32)
        g2 = tl.load(split_ptr + split + HALF, mask=mask, other=0.0).to(tl.float32)
        out_ty = packed_ptr.dtype.element_ty
        tl.store(packed_ptr + packed, (g1 * c1 + g2 * s2).to(out_ty), mask=mask)
        tl.store(packed_ptr + packed + HALF, (g2 * c2 - g1 * s1).to(out_ty), mask=mask)
    else:  # rotate-half: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        x1 = tl.load(packed_ptr + packed, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(packed_ptr + packed + HALF, mask=mask, other=0.0).to(tl.float32)
        out_ty = split_ptr.dtype.element_ty
        tl.store(split_ptr + split, (x1 * c1 - x2 * s1).to(out_ty), mask=mask)
        tl.store(split_ptr + split + HALF, (x2 * c2 + x1 * s2).to(out_ty), mask=mask)


@autotune([triton.Config(dict(BLOCK_R=r), num_warps=w) for r, w in ((32, 4), (16, 2), (64, 4), (128, 8))],
           key=["n_heads", "HEAD_DIM", "BACKWARD"])
@triton.jit
def _rotary_qkv(packed_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, n_rows, n_heads,
                HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                BACKWARD: tl.constexpr):
    """Rows are (token, head) pairs. Forward reads qkv (T, 3, N, Dh) at packed_ptr and writes
    q, k, v (T, N, Dh); backward reads their gradients there and writes d(qkv) at packed_ptr."""
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, HALF_BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HALF)
    token = rows // n_heads
    head = rows - token * n_heads
    hidden = n_heads * HEAD_DIM
    packed = (token * 3 * hidden + head * HEAD_DIM)[:, None] + cols[None, :]  # q's first half in qkv
    split = rows[:, None] * HEAD_DIM + cols[None, :]  # first half in q, k, v
    table = token[:, None] * HEAD_DIM + cols[None, :]
    c1 = tl.load(cos_ptr + table, mask=mask, other=0.0)
    c2 = tl.load(cos_ptr + table + HALF, mask=mask, other=0.0)
    s1 = tl.load(sin_ptr + table, mask=mask, other=0.0)
    s2 = tl.load(sin_ptr + table + HALF, mask=mask, other=0.0)
    _rotate_pair(packed_ptr, q_ptr, packed, split, mask, c1, c2, s1, s2, HALF, BACKWARD)
    _rotate_pair(packed_ptr, k_ptr, packed + hidden, split, mask, c1, c2, s1, s2, HALF, BACKWARD)
    packed += 2 * hidden  # v: copied as is
    if BACKWARD:
        tl.store(packed_ptr + packed, tl.load(v_ptr + split, mask=mask), mask=mask)
        tl.store(packed_ptr + packed + HALF, tl.load(v_ptr + split + HALF, mask=mask), mask=mask)
    else:
        tl.store(v_ptr + split, tl.load(packed_ptr + packed, mask=mask), mask=mask)
        tl.store(v_ptr + split + HALF, tl.load(packed_ptr + packed + HALF, mask=mask), mask=mask)


def _launch_rotary(src, cos, sin, q, k, v, backward: bool) -> None:
    n_rows, n_heads, head_dim = q.shape[0] * q.shape[1], q.shape[1], q.shape[2]
    _rotary_qkv[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)](
        src, cos, sin, q, k, v, n_rows, n_heads, HEAD_DIM=head_dim,
        HALF_BLOCK=triton.next_power_of_2(head_dim // 2), BACKWARD=backward)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (T, 3, N, Dh), cos/sin (T, Dh) fp32 -> q, k (RoPE applied), v: (T, N, Dh) each: the
    kernels' op, or on the CPU the PyTorch definition (as geglu)."""
    return rotary_qkv_op(qkv, cos, sin) if use_triton(qkv) else modernbert.rotary_qkv(qkv, cos, sin)


@torch.library.custom_op("modernbert::rotary_qkv", mutates_args=())
def rotary_qkv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q, k, v = (qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3]) for _ in range(3))
    _launch_rotary(qkv, cos, sin, q, k, v, backward=False)
    return q, k, v


@rotary_qkv_op.register_fake
def _(qkv, cos, sin):
    return tuple(qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3]) for _ in range(3))


@torch.library.custom_op("modernbert::rotary_qkv_backward", mutates_args=())
def rotary_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    dq, dk, dv, cos, sin = (t.contiguous() for t in (dq, dk, dv, cos, sin))
    dqkv = dq.new_empty(dq.shape[0], 3, dq.shape[1], dq.shape[2])
    _launch_rotary(dqkv, cos, sin, dq, dk, dv, backward=True)
    return dqkv


@rotary_qkv_backward.register_fake
def _(dq, dk, dv, cos, sin):
    return dq.new_empty(dq.shape[0], 3, dq.shape[1], dq.shape[2])


def _rotary_setup(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)
    ctx.split_shape, ctx.dtype = output[0].shape, output[0].dtype  # for a missing gradient


def _rotary_grad(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    dq, dk, dv = (cos.new_zeros(ctx.split_shape, dtype=ctx.dtype) if g is None else g for g in (dq, dk, dv))
    return rotary_qkv_backward(dq, dk, dv, cos, sin), None, None


rotary_qkv_op.register_autograd(_rotary_grad, setup_context=_rotary_setup)


# --- LayerNorm without bias, alone or after the residual add (config fused_layer_norm) --------------
#
# Inductor's LayerNorm backward moves ~1.8 TB/s on an H200 (bench_kernels, 96 x 1024 x 768 fp32):
# the weight gradient is a second reduction over every token, re-reading x and dy. Here one pass
# per block of rows writes dx and keeps the block's share of dw in registers; a (programs, H)
# buffer of partial sums is reduced after. Statistics in fp32; mean and 1 / std saved for backward.
# ADD: the residual add before the norm in the same pass (s = x + delta stored, then normed), and in
# backward the stream's gradient ds added to the norm's, written for x and, in its dtype, for delta.

_NORM_CONFIGS = [triton.Config(dict(BLOCK_R=r), num_warps=w) for r, w in ((4, 4), (8, 8), (2, 4), (16, 8))]


@autotune(_NORM_CONFIGS, key=["n_cols", "ADD"])
@triton.jit
def _layer_norm_fwd(x_ptr, delta_ptr, s_ptr, w_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, n_cols, eps,
                    ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    offs = rows[:, None] * n_cols + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:  # the norm sees the sum as stored (rounded to s's dtype)
        s = (x + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + offs, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (centred * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@autotune(_NORM_CONFIGS, key=["n_cols", "ADD"])
@triton.jit
def _layer_norm_bwd(dy_ptr, ds_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, ddelta_ptr, dw_part_ptr, n_rows,
                    n_cols, rows_per_program, ADD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program p takes rows [p * rows_per_program, (p + 1) * rows_per_program) in blocks of BLOCK_R
    and writes its partial dw to row p of dw_part (programs, n_cols), fp32. x: the normed input
    (with ADD, the stored sum s)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_R):
        rows = first + start + tl.arange(0, BLOCK_R)
        row_ok = (rows < n_rows) & (start + tl.arange(0, BLOCK_R) < rows_per_program)
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / n_cols
        c2 = tl.sum(wdy, axis=1) / n_cols
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if ADD:
            dx += tl.load(ds_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(ddelta_ptr + offs, dx.to(ddelta_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)


def _rows_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32)


def _norm_forward(x: torch.Tensor, delta, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """(s or None, y, mean, rstd) from the kernel (the modules below send other tensors to PyTorch's norm)."""
    s = None if delta is None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, delta.dtype),
                                               device=x.device)
    x, weight = x.contiguous(), weight.contiguous()
    delta = x if delta is None else delta.contiguous()  # (not read without ADD)
    n_rows, n_cols = x.shape
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean, rstd = _rows_stats(x)
    _layer_norm_fwd[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)](
        x, delta, x if s is None else s, weight, y, mean, rstd, n_rows, n_cols, eps, ADD=s is not None,
        BLOCK_C=triton.next_power_of_2(n_cols))
    return s, y, mean, rstd


# Programs of the backward pass: enough to fill a GPU several times over; each keeps one partial dw.
_LAYER_NORM_BWD_PROGRAMS = 1024


def _norm_backward(dy: torch.Tensor, ds, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, delta_dtype: torch.dtype):
    """(dx in x's dtype, ddelta in delta_dtype or None without ds, dw in weight's dtype)."""
    add = ds is not None
    dy, x, weight = dy.contiguous(), x.contiguous(), weight.contiguous()
    ds = ds.contiguous() if add else dy  # (not read without ADD)
    n_rows, n_cols = x.shape
    programs = max(1, min(_LAYER_NORM_BWD_PROGRAMS, n_rows))
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    dx = torch.empty_like(x)
    ddelta = torch.empty_like(x, dtype=delta_dtype) if add else None
    dw_part = x.new_empty(programs, n_cols, dtype=torch.float32)
    _layer_norm_bwd[lambda meta: (programs,)](dy, ds, x, weight, mean, rstd, dx, dx if ddelta is None else ddelta,
                                              dw_part, n_rows, n_cols, rows_per_program, ADD=add,
                                              BLOCK_C=triton.next_power_of_2(n_cols))
    return dx, ddelta, dw_part.sum(0).to(weight.dtype)


@torch.library.custom_op("modernbert::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (T, H), weight (H,) -> y = (x - mean) / std * weight in x's dtype, mean and 1 / std (T,) fp32."""
    return _norm_forward(x, None, weight, eps, x.dtype)[1:]


@layer_norm.register_fake
def _(x, weight, eps):
    return (torch.empty_like(x), *_rows_stats(x))


@torch.library.custom_op("modernbert::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (x's dtype) and dw (weight's dtype) from dy."""
    dx, _, dw = _norm_backward(dy, None, x, weight, mean, rstd, x.dtype)
    return dx, dw


@layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw = layer_norm_backward(dy, x, weight, mean, rstd)
    return dx, dw, None


layer_norm.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


@torch.library.custom_op("modernbert::add_layer_norm", mutates_args=())
def add_layer_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, delta (T, H) -> s = x + delta (their promoted dtype), y = the norm of s in out_dtype, and
    s's mean and 1 / std (T,) fp32."""
    return _norm_forward(x, delta, weight, eps, out_dtype)


@add_layer_norm.register_fake
def _(x, delta, weight, eps, out_dtype):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, delta.dtype)),
            x.new_empty(x.shape, dtype=out_dtype), *_rows_stats(x))


@torch.library.custom_op("modernbert::add_layer_norm_backward", mutates_args=())
def add_layer_norm_backward(dy: torch.Tensor, ds: torch.Tensor, s: torch.Tensor, weight: torch.Tensor,
                            mean: torch.Tensor, rstd: torch.Tensor, delta_dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From dy (of y) and ds (of s, from the rest of the stream): the gradient of x (s's dtype),
    the same in delta_dtype for delta, and dw."""
    return _norm_backward(dy, ds, s, weight, mean, rstd, delta_dtype)


@add_layer_norm_backward.register_fake
def _(dy, ds, s, weight, mean, rstd, delta_dtype):
    return torch.empty_like(s), torch.empty_like(s, dtype=delta_dtype), torch.empty_like(weight)


def _add_layer_norm_setup(ctx, inputs, output):
    _, delta, weight, _, _ = inputs
    s, _, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.delta_dtype = delta.dtype  # x's gradient comes in s's dtype (autograd casts it if x's differs)
    ctx.mark_non_differentiable(mean, rstd)


def _add_layer_norm_grad(ctx, ds, dy, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    dx, ddelta, dw = add_layer_norm_backward(dy, ds, s, weight, mean, rstd, ctx.delta_dtype)
    return dx, ddelta, dw, None, None


add_layer_norm.register_autograd(_add_layer_norm_grad, setup_context=_add_layer_norm_setup)


class LayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm (the same parameters and state dict) whose tensors Triton runs go through
    layer_norm above; under autocast in fp32, as autocast runs a norm. Others: nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_triton(x) or self.bias is not None:
            return super().forward(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return layer_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps)[0].view(x.shape)


class AddNorm(modernbert.AddNorm):
    """modernbert.AddNorm (the same parameters and state dict) through add_layer_norm on tensors
    Triton runs; under autocast the norm in fp32, written in fp32 or, with `output_feeds_matmul`,
    in the autocast dtype. Others: modernbert.AddNorm."""

    def __init__(self, *args, output_feeds_matmul: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_feeds_matmul = output_feeds_matmul

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not use_triton(x) or self.bias is not None:
            return super().forward(x, delta)
        width, out_dtype = x.shape[-1], torch.promote_types(x.dtype, delta.dtype)
        if torch.is_autocast_enabled(x.device.type):  # a matmul after it rounds to the autocast dtype
            out_dtype = torch.get_autocast_dtype(x.device.type) if self.output_feeds_matmul else torch.float32
        s, y, _, _ = add_layer_norm(x.reshape(-1, width), delta.reshape(-1, width), self.weight, self.eps, out_dtype)
        return s.view(x.shape), y.view(x.shape)
