"""ModernBERT, plain PyTorch: config, architecture, attention backends, HF interop."""
from modernbert_train.model.config import ModernBertConfig, preset
from modernbert_train.model.modernbert import MLMOutput, ModernBertForMaskedLM, ModernBertModel

__all__ = ["ModernBertConfig", "preset", "ModernBertForMaskedLM", "ModernBertModel", "MLMOutput"]
