"""cuDNN's fused attention on the packed documents (attention_backend: cudnn), as one custom op.

torch has the ragged cuDNN ops (`aten._cudnn_attention_forward` / `_backward` with the document
offsets; 2.11, 2.13, 2.14 and 2.15 have both, 2.7 the forward only), and torch.nn.attention.varlen sends
global attention to them on sm90 / sm100 with cuDNN >= 9.18 since torch 2.14; in 2.11 varlen_attn
always runs FlashAttention-2. This op
calls them directly (no window: windowed layers go to varlen_attn, as torch 2.14 does), with a
fake implementation and a backward, so the compiled model stays one graph.

The log-sum-exp the forward returns for its backward is handed over as (tokens, heads) fp32
whatever layout this torch's cuDNN path gives it (the op's fake must state one shape; torch 2.14's
own fake for this path says (heads, tokens), the C++ ragged path allocates (tokens, heads, 1)); the
backward gives cuDNN back the layout it produced.
"""
from __future__ import annotations

from typing import Optional

import torch

MIN_CUDNN_VERSION = 91800  # the floor torch 2.14's varlen_attn sets for this path
MIN_MAX_SEQLEN = 129  # torch does not send max_seqlen <= 128 to cuDNN's ragged path (varlen and nested)

# How this torch's cuDNN path lays out the log-sum-exp: "tokens_heads_1" (T, N, 1) or "heads_tokens"
# (N, T); recorded by the first forward of the process, read by the backward.
_native_lse_layout: dict[str, str] = {}


def unavailable_reason() -> Optional[str]:
    """None if the cuDNN path can run here, else why not and what to use instead."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_cudnn_attention_forward") and hasattr(ops, "_cudnn_attention_backward")):
        return (f"torch {torch.__version__} has no ragged cuDNN attention backward (2.11 has); "
                "use attention_backend=torch_varlen, flash or flex")
    if not torch.cuda.is_available():
        return "cudnn needs a CUDA GPU; on the CPU use attention_backend=sdpa"
    version = torch.backends.cudnn.version()
    if version is None or version < MIN_CUDNN_VERSION:
        return (f"cuDNN {version} is older than 9.18, the first version torch trusts with this path; "
                "use attention_backend=torch_varlen")
    major, minor = torch.cuda.get_device_capability()
    if major not in (9, 10):
        return (f"cuDNN's ragged attention is used on Hopper and Blackwell (sm90 / sm100) only, this GPU is "
                f"sm{major}{minor}; use attention_backend=torch_varlen")
    return None


def lse_to_tokens_heads(lse: torch.Tensor, tokens: int, heads: int) -> tuple[torch.Tensor, str]:
    """cuDNN's log-sum-exp as contiguous (tokens, heads), and the layout it came in."""
    if tuple(lse.shape) == (tokens, heads, 1):
        return lse.reshape(tokens, heads).contiguous(), "tokens_heads_1"
    if tuple(lse.shape) == (heads, tokens):
        return lse.t().contiguous(), "heads_tokens"
    raise RuntimeError(f"cuDNN attention returned a log-sum-exp of shape {tuple(lse.shape)}; expected "
                       f"({tokens}, {heads}, 1) or ({heads}, {tokens}) for {tokens} tokens and {heads} heads")


def lse_from_tokens_heads(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of lse_to_tokens_heads: what cuDNN's backward expects."""
    if layout == "tokens_heads_1":
        return lse.unsqueeze(-1)
    if layout == "heads_tokens":
        return lse.t().contiguous()
    raise ValueError(f"unknown log-sum-exp layout {layout!r}")


def _cudnn_forward(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """torch's ragged cuDNN forward: (output, log-sum-exp in cuDNN's layout, ...)."""
    return torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, True, 0.0, False, False, scale=scale)


def _cudnn_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen: int, scale: float):
    """torch's ragged cuDNN backward: (dq, dk, dv); `lse` in the layout the forward gave."""
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: never read
    return torch.ops.aten._cudnn_attention_backward(
        grad_out, q, k, v, out, lse, seed, seed, None, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0,
        False, scale=scale)


@torch.library.custom_op("modernbert::cudnn_attention", mutates_args=())
def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (T, N, Dh), log-sum-exp (T, N) fp32) of non-causal attention within each document."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    result = _cudnn_forward(q, k, v, cu_seqlens, max_seqlen, scale)
    lse, layout = lse_to_tokens_heads(result[1], q.shape[0], q.shape[1])
    _native_lse_layout["layout"] = layout
    return result[0].contiguous(), lse


@cudnn_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("modernbert::cudnn_attention_backward", mutates_args=())
def cudnn_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = _cudnn_backward(grad_out.contiguous(), q, k, v, out,
                                 lse_from_tokens_heads(lse, _native_lse_layout["layout"]), cu_seqlens, max_seqlen,
                                 scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@cudnn_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _grad(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = cudnn_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


cudnn_attention.register_autograd(_grad, setup_context=_setup)
