"""train/composer_model.py: the validation loss metric weights batches by their masked tokens; the
MFU numerator is model/flops.py's formula over the step batch's documents."""
from __future__ import annotations

import numpy as np
import torch

from modernbert_train.model import ModernBertForMaskedLM, preset
from modernbert_train.model.flops import training_flops
from modernbert_train.model.modernbert import MLMOutput
from modernbert_train.train.composer_model import MaskedTokenLoss, MLMComposerModel


def test_masked_token_loss_averages_over_tokens_not_batches():
    metric = MaskedTokenLoss()
    labels = torch.full((8,), -100)
    metric.update(MLMOutput(None, torch.tensor(2.0), torch.tensor(3), None, labels))
    metric.update(MLMOutput(None, torch.tensor(4.0), torch.tensor(1), None, labels))
    assert abs(float(metric.compute()) - (2.0 * 3 + 4.0 * 1) / 4) < 1e-6, float(metric.compute())


def test_trainer_flops_per_batch_counts_the_documents_of_a_step_batch():
    cfg = preset("tiny")
    composer_model = MLMComposerModel(ModernBertForMaskedLM(cfg))
    # Two stacked chunks of 128 tokens: documents (100, 28) and (60, 60, 8); empty slots repeat the end.
    cu = torch.tensor([[0, 100, 128, 128], [0, 60, 120, 128]], dtype=torch.int32)
    labels = torch.full((2, 128), -100)
    labels[:, :20] = 5
    batch = {"cu_seqlens": cu, "num_tokens": torch.tensor([128, 128]), "labels": labels}
    expected = training_flops(cfg, real_tokens=256, masked_tokens=40, span_lengths=np.array([100, 28, 60, 60, 8]))
    assert composer_model.flops_per_batch(batch) == expected
