"""Triton kernels for the pointwise parts of a layer: GeGLU and RoPE, forward and backward.

Why: the kernels torch.compile generates for these two backward passes are instruction-bound (110
and 58 PTX instructions per element, scalar loads; benchmarks/inductor_kernels.py); these issue
3.5x and 8.8x fewer, with 16-byte loads and stores.
Config `fused_kernels` (default on: +5-6% tokens/s and -6 GiB peak at
96 x 1024 on an H200, benchmarks/README.md). Each op is a torch.library custom op, so torch.compile
calls it without a graph break. CUDA tensors go to Triton; CPU tensors to the PyTorch definitions
(model/modernbert.py: rotary_qkv, geglu_activation), or, with TRITON_INTERPRET=1 set before import
and `interpret_cpu_tensors = True` (the CPU tests set both), to Triton's interpreter.
Math in fp32, one rounding to the input dtype.
- geglu: h (T, 2I) -> GELU(h[:, :I]) * h[:, I:] (T, I); backward writes dh in one pass.
- rotary_qkv: the Wqkv output (T, 3, N, Dh) -> q, k rotated and v, each (T, N, Dh) contiguous;
  backward writes d(qkv) from dq, dk, dv in one pass (no separate concat).
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


@torch.library.custom_op("modernbert::geglu", mutates_args=())
def geglu(h: torch.Tensor) -> torch.Tensor:
    """h (T, 2I) -> GELU(h[:, :I]) * h[:, I:] (T, I), exact (erf) GELU."""
    if not use_triton(h):
        return modernbert.geglu_activation(h)
    h = h.contiguous()
    n_rows, n_cols = h.shape[0], h.shape[1] // 2
    out = h.new_empty(n_rows, n_cols)
    _geglu_fwd[_geglu_grid(n_rows, n_cols)](h, out, n_rows, n_cols)
    return out


@geglu.register_fake
def _(h: torch.Tensor) -> torch.Tensor:
    return h.new_empty(h.shape[0], h.shape[1] // 2)


@torch.library.custom_op("modernbert::geglu_backward", mutates_args=())
def geglu_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if not use_triton(h):  # (autograd is off inside an op: the derivative written out)
        a, b = h.float().chunk(2, dim=-1)
        g = grad.float()
        cdf = 0.5 * (1.0 + torch.erf(a * _SQRT_HALF.value))
        pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI.value
        return torch.cat((g * b * (cdf + a * pdf), g * a * cdf), dim=-1).to(h.dtype)
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


geglu.register_autograd(_geglu_grad, setup_context=_geglu_setup)


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


def _rotary_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    q, k, v = modernbert.rotary_qkv(qkv, cos, sin)
    return q, k, v.clone(memory_format=torch.contiguous_format)  # an op's output may not alias its input


def _launch_rotary(src, cos, sin, q, k, v, backward: bool) -> None:
    n_rows, n_heads, head_dim = q.shape[0] * q.shape[1], q.shape[1], q.shape[2]
    _rotary_qkv[lambda meta: (triton.cdiv(n_rows, meta["BLOCK_R"]),)](
        src, cos, sin, q, k, v, n_rows, n_heads, HEAD_DIM=head_dim,
        HALF_BLOCK=triton.next_power_of_2(head_dim // 2), BACKWARD=backward)


@torch.library.custom_op("modernbert::rotary_qkv", mutates_args=())
def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (T, 3, N, Dh), cos/sin (T, Dh) fp32 -> q, k (RoPE applied), v: (T, N, Dh) each."""
    if not use_triton(qkv):
        return _rotary_reference(qkv, cos, sin)
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    q, k, v = (qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3]) for _ in range(3))
    _launch_rotary(qkv, cos, sin, q, k, v, backward=False)
    return q, k, v


@rotary_qkv.register_fake
def _(qkv, cos, sin):
    return tuple(qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3]) for _ in range(3))


@torch.library.custom_op("modernbert::rotary_qkv_backward", mutates_args=())
def rotary_qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    if not use_triton(dq):  # the rotation's transpose, as in the kernel
        def unrotate(g):
            (g1, g2), (c1, c2), (s1, s2) = (t.float().chunk(2, dim=-1) for t in (g, cos[:, None], sin[:, None]))
            return torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), dim=-1).to(g.dtype)
        return torch.stack((unrotate(dq), unrotate(dk), dv), dim=1)
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


rotary_qkv.register_autograd(_rotary_grad, setup_context=_rotary_setup)
