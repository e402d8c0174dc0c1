"""Rebuild the plain model from a Composer checkpoint written by this project (for HF export).

Composer checkpoints are pickles and loading one can run code: only load checkpoints you trust.
"""
from __future__ import annotations

from pathlib import Path

import torch

from modernbert_train.model.config import PLAIN_EXECUTION, ModernBertConfig
from modernbert_train.model.modernbert import ModernBertForMaskedLM

# Options earlier versions wrote into a checkpoint's model config that no longer exist. They chose
# how a step ran, never what the weights mean, so they are dropped when such a checkpoint is read.
RETIRED_FIELDS = frozenset({"low_memory_norm", "fused_loss_kernel"})


def load_model_from_checkpoint(path: str | Path) -> ModernBertForMaskedLM:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a pickle: trusted input only
    state = ckpt["state"]
    run_info = state.get("callbacks", {}).get("RunInfo")
    if not run_info or "model_config" not in run_info:
        raise ValueError(f"{path} has no model config (RunInfo callback state): not a modernbert-train checkpoint?")
    saved = {k: v for k, v in run_info["model_config"].items() if k not in RETIRED_FIELDS}
    # How the run computed a step (Triton kernels, a GPU backend) does not change the weights: plain
    # PyTorch, so a checkpoint exports on a machine without triton or a GPU.
    config = ModernBertConfig(**{**saved, **PLAIN_EXECUTION})
    model = ModernBertForMaskedLM(config)
    weights = {k.removeprefix("model.").removeprefix("_orig_mod."): v for k, v in state["model"].items()}
    model.load_state_dict(weights)
    return model
