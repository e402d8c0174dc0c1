"""The optimizer: optimi's StableAdamW with fully decoupled weight decay and no decay on norms/biases."""
from __future__ import annotations

import logging

import torch
from optimi import StableAdamW
from optimi.utils import HAS_TRITON

from modernbert_train.train.config import OptimizerConfig

log = logging.getLogger(__name__)


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or "Norm" in type(module).__name__


def split_decay_params(
    model: torch.nn.Module,
) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """(decayed, not decayed) named parameters: norm weights, biases and any 1-D parameter skip decay."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if _is_norm(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue  # tied weights (decoder = tok_embeddings) appear once
        seen.add(id(param))
        leaf = name.rsplit(".", 1)[-1]
        if id(param) in no_decay_ids or leaf == "bias" or param.ndim <= 1:
            no_decay.append((name, param))
        else:
            decay.append((name, param))
    return decay, no_decay


def build_optimizer(cfg: OptimizerConfig, model: torch.nn.Module, *,
                    device_type: str) -> torch.optim.Optimizer:
    """StableAdamW over `model`'s trainable parameters, in two groups when norms/biases skip decay."""
    if cfg.exclude_norms_and_biases_from_weight_decay:
        decay, no_decay = split_decay_params(model)
        groups = [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": [p for _, p in no_decay], "weight_decay": 0.0})
        log.info("weight decay %.3g on %d tensors, none on %d (norms, biases, 1-D)",
                 cfg.weight_decay, len(decay), len(no_decay))
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": cfg.weight_decay}]
    # optimi decides triton from an empty list when triton=None (all([]) is True), so it picks the
    # Triton kernel for CPU tensors whenever triton imports, and crashes. Decide here instead.
    use_triton = device_type == "cuda" and HAS_TRITON
    return StableAdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        # Fully decoupled: decay follows the schedule (lr / max_lr) but is not multiplied by lr.
        decouple_lr=True,
        max_lr=cfg.lr,
        triton=use_triton,
        # foreach=True only emits a deprecation warning in optimi 0.3; the for-loop is fine off-GPU.
        foreach=device_type == "cuda" and not use_triton,
    )
