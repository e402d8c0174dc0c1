"""The MLM decoder projection and its cross-entropy, fused over row chunks.

The plain way materialises the (M, V) logits of the M predicted positions, an fp32 copy for the
loss, and the same again for their gradient: at 96 x 1024 tokens with 30% masking and V = 50368
that is ~6 GiB per copy. Here the logits of one chunk of rows at a time are computed, turned at
once into their gradient (softmax - one-hot) / count, and multiplied back into the gradients of the
input, the weight and the bias; only those gradients are kept for backward, so no (M, V) tensor
ever exists and backward is three multiplications by the incoming scalar. Same FLOPs as the plain
way (the backward matmuls run during forward). Plain PyTorch, so it runs, and is tested, on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Rows per chunk: 4096 x 50368 fp32 logits = 0.8 GiB of scratch at a time.
DEFAULT_CHUNK_ROWS = 4096


def _one_pass_loss(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, V) logits, (c, 1) targets -> each row's loss (c,) and d(loss)/d(logits) = (softmax - one_hot)
    x row_scale (c, V). The one-hot as a comparison, not an in-place scatter, so the compiler makes
    this one pass from the logits to the low-precision gradient (no fp32 copy in memory)."""
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    prob = torch.exp(logits - lse[:, None])
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    grad = torch.where(vocab[None, :] == target, prob - 1.0, prob) * row_scale
    return lse - logits.gather(1, target).squeeze(1), grad


def _eager_loss(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, op by op: without a compiler each elementwise op above is a pass over (c, V), so
    here log_softmax (one op), exp and the scale in place, the one-hot subtracted at the targets
    only: a third of the time on the CPU (benchmarks/README.md, "The CPU step, continued")."""
    log_prob = torch.log_softmax(logits, dim=-1)
    row_loss = -log_prob.gather(1, target).squeeze(1)
    grad = log_prob.exp_()
    grad.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=grad.dtype, device=grad.device))
    return row_loss, grad.mul_(row_scale)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                target: torch.Tensor, ignore_index: int, chunk_rows: int) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        valid = target != ignore_index
        count = valid.sum().clamp(min=1).to(acc)  # a tensor: no host sync
        loss_sum = torch.zeros((), dtype=acc, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=acc)
        grad_b = None if bias is None else torch.zeros_like(bias, dtype=acc)
        device = x.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        for start in range(0, x.shape[0], chunk_rows):
            xs, ts, vs = x[start:start + chunk_rows], target[start:start + chunk_rows], valid[start:start + chunk_rows]
            logits = F.linear(xs, weight, bias).to(acc)  # (c, V)
            safe_t = torch.where(vs, ts, torch.zeros_like(ts))[:, None]  # (c, 1)
            row_scale = (vs.to(acc) / count)[:, None]  # (c, 1): 1 / count on valid rows, 0 on ignored
            logit_loss = _one_pass_loss if torch.compiler.is_compiling() else _eager_loss
            row_loss, grad = logit_loss(logits, safe_t, row_scale)
            loss_sum = loss_sum + (row_loss * vs).sum()
            # Under autocast the backward matmuls run in the autocast dtype, like the forward one;
            # the weight and bias gradients accumulate in fp32.
            grad = grad.to(mm_dtype)
            grad_x[start:start + chunk_rows] = (grad @ weight.to(mm_dtype)).to(x.dtype)
            grad_w += (grad.t() @ xs.to(mm_dtype)).to(acc)
            if grad_b is not None:
                grad_b += grad.to(acc).sum(0)
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        return ((grad_x * grad_loss).to(grad_x.dtype), (grad_w * grad_loss).to(ctx.weight_dtype),
                None if grad_b is None else (grad_b * grad_loss).to(ctx.weight_dtype), None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         target: torch.Tensor, *, ignore_index: int = -100,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """mean over rows with target != ignore_index of cross_entropy(x @ weight.T + bias, target).

    x (M, H), weight (V, H), bias (V,) or None, target (M,) -> scalar fp32 (fp64 for fp64 x). Differentiable once
    (its backward is not itself differentiable).
    """
    return _LinearCrossEntropy.apply(x, weight, bias, target, ignore_index, chunk_rows)
