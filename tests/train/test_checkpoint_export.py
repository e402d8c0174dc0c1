"""train/checkpoint_export.py: the plain model back from a checkpoint's state and RunInfo config."""
from __future__ import annotations

import importlib
import warnings
from dataclasses import asdict

import pytest
import torch

from modernbert_train.model.config import PLAIN_EXECUTION, preset
from modernbert_train.model.modernbert import ModernBertForMaskedLM
from modernbert_train.train.checkpoint_export import load_model_from_checkpoint


def _checkpoint(path, model_config: dict, model: torch.nn.Module) -> None:
    weights = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    torch.save({"state": {"callbacks": {"RunInfo": {"model_config": model_config}}, "model": weights}}, path)


def test_weights_come_back_and_retired_options_of_older_checkpoints_are_dropped(tmp_path):
    cfg = preset("tiny")
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg)
    # Written by versions that still had the low-memory LayerNorm and the Triton loss kernel options.
    _checkpoint(tmp_path / "old.pt", {**asdict(cfg), "low_memory_norm": True, "fused_loss_kernel": False}, model)
    loaded = load_model_from_checkpoint(tmp_path / "old.pt")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.attention_backend == "sdpa"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_config_field_nobody_ever_wrote_is_still_an_error(tmp_path):
    cfg = preset("tiny")
    _checkpoint(tmp_path / "odd.pt", {**asdict(cfg), "hidden_sizes": 3}, ModernBertForMaskedLM(cfg))
    with pytest.raises(TypeError, match="hidden_sizes"):
        load_model_from_checkpoint(tmp_path / "odd.pt")


@pytest.mark.parametrize("option", ["fused_layer_norm", "window_attention_rope", "global_attention_kernel"])
def test_a_checkpoint_trained_with_triton_kernels_exports_without_triton(tmp_path, monkeypatch, option):
    """Kernel options choose how a step ran, not what the weights mean: a machine without triton
    (torch's CPU wheels) still rebuilds the model, in plain PyTorch, with the same weights."""
    cfg = preset("tiny")
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(cfg)
    _checkpoint(tmp_path / "kernels.pt", {**asdict(cfg), option: True, "fused_kernels": True,
                                          "window_attention_kernel": True}, model)
    real_import = importlib.import_module

    def no_triton(name, *args, **kwargs):
        if name.startswith("triton") or name.endswith((".fused_kernels", ".window_attention")):
            raise ImportError(f"No module named {name!r} (test: no triton here)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_triton)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even the fallback warnings: nothing asks for triton
        loaded = load_model_from_checkpoint(tmp_path / "kernels.pt")
    assert {name: getattr(loaded.config, name) for name in PLAIN_EXECUTION} == PLAIN_EXECUTION
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
