"""Bias-free LayerNorm whose backward needs only its output, not its input.

nn.LayerNorm keeps its input for backward. In ModernBERT that input is the fp32 residual stream
(4 bytes per element under bf16 autocast), while the next matmul keeps a bf16 copy of the norm's
output anyway. Here backward recovers the normalised input from the output, x_hat = y / weight, so
the norm keeps that same bf16 copy (the compiler shares it with the matmul) plus one rstd per row:
6 KB less per token and layer for ModernBERT-base, ~12 GiB at 96 x 1024 (benchmarks/README.md).
The forward is exactly nn.LayerNorm's; under autocast the backward sees x_hat to bf16 precision,
the precision its matmul neighbours already work at. A weight element that is exactly 0 hides
x_hat there: it is taken as 0, so that element's gradient is 0 (apex's memory-efficient LayerNorm
has the same limit).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class _LayerNormFromOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        device = x.device.type
        ctx.input_dtype = x.dtype
        if torch.is_autocast_enabled(device):  # autocast runs layer_norm in fp32; keep a low-precision copy
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            saved_dtype = torch.get_autocast_dtype(device)
        else:
            saved_dtype = x.dtype
        y, _, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, None, eps)
        ctx.save_for_backward(y.to(saved_dtype), weight, rstd)  # rstd (..., 1)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        y, weight, rstd = ctx.saved_tensors
        acc = torch.promote_types(rstd.dtype, torch.float32)
        w = weight.to(acc)
        inv_w = torch.where(w != 0, 1.0 / w, 0.0)  # once per column: no division per element
        y, g = y.to(acc), grad_y.to(acc)
        gw, gy = g * w, g * y
        # d/dx of (x - mean) * rstd * w: project out the mean and the x_hat direction, x_hat = y / w
        # (gw * x_hat = g * y where w != 0; where w == 0, y and the term are 0).
        grad_x = (gw - gw.mean(-1, keepdim=True) - (y * inv_w) * gy.mean(-1, keepdim=True)) * rstd
        grad_w = gy.reshape(-1, w.shape[0]).sum(0) * inv_w
        return grad_x.to(ctx.input_dtype), grad_w.to(weight.dtype), None


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm(hidden, eps, bias=False) (same parameter, same forward) with the backward above."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LayerNormFromOutput.apply(x, self.weight, self.eps)
