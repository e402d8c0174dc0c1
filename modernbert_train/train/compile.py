"""How the training step compiles the model: the repeated blocks one by one, or the model whole.

`regional` compiles each encoder layer, the embeddings and the MLM head as their own graphs. The
22 (or 28) layers share their compiled code (torch >= 2.5 passes a module's parameters to the graph
as inputs instead of baking them in), so the compile does a few small graphs instead of one big one
(much faster start-up) and loses only the fusions across layer boundaries, where nothing fuses
anyway (each layer begins with a residual add feeding a matmul). `full` compiles the whole model as
one graph. The model itself never calls torch.compile (docs/DESIGN.md).
Compilation is lazy: the first training step pays for it.

`memory_budget` trades speed for activation memory: below 1.0 the compiler's partitioner saves
less for the backward pass and recomputes the rest (cheap pointwise work first), aiming at that
fraction of the activation memory it would otherwise keep.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch._functorch.config
import torch.nn as nn

from modernbert_train.model.modernbert import ModernBertForMaskedLM

CompileMode = Literal["none", "regional", "full"]
COMPILE_MODES = ("none", "regional", "full")


def compile_model(model: ModernBertForMaskedLM, mode: CompileMode, memory_budget: float = 1.0) -> nn.Module:
    """Compile `model` in place (nn.Module.compile: parameter names and state dicts unchanged) and
    return it. `memory_budget` in (0, 1] is process-wide (the partitioner reads it when the first
    step compiles): a training process compiles one model."""
    if not 0.0 < memory_budget <= 1.0:
        raise ValueError(f"memory_budget={memory_budget}: use a fraction in (0, 1] (1.0 = save what is fastest)")
    if mode != "none":
        torch._functorch.config.activation_memory_budget = memory_budget
    if mode == "regional":
        for layer in model.model.layers:
            layer.compile()
        model.model.embeddings.compile()
        model.head.compile()
    elif mode == "full":
        model.compile()
    elif mode != "none":
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
    return model


def mark_varlen_dims(cu_seqlens: torch.Tensor) -> None:
    """The number of documents changes from chunk to chunk: tell the compiler up front that this
    dimension is dynamic, so the first chunk's count is not baked in and nothing recompiles later."""
    torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
