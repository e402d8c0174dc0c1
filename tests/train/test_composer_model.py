"""train/composer_model.py: the validation loss metric weights batches by their masked tokens; the
MFU numerator is model/flops.py's formula over the step batch's documents."""
from __future__ import annotations

import numpy as np
import torch

from modernbert_train.data.loader import collate_chunk, stack_chunks
from modernbert_train.model import ModernBertForMaskedLM, preset
from modernbert_train.model.flops import training_flops
from modernbert_train.model.modernbert import MLMOutput
from modernbert_train.train.composer_model import MaskedTokenLoss, MLMComposerModel
from tests.data.test_loader import PAD, make_masker, make_packed_samples


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
    # A third chunk holds one document of 40 tokens and a pad tail of two documents: not counted.
    cu = torch.tensor([[0, 100, 128, 128], [0, 60, 120, 128], [0, 40, 104, 128]], dtype=torch.int32)
    labels = torch.full((3, 128), -100)
    labels[:, :20] = 5
    batch = {"cu_seqlens": cu, "num_tokens": torch.tensor([128, 128, 40]), "labels": labels}
    expected = training_flops(cfg, real_tokens=296, masked_tokens=60,
                              span_lengths=np.array([100, 28, 60, 60, 8, 40]))
    assert composer_model.flops_per_batch(batch) == expected


def test_a_chunk_that_is_mostly_padding_trains():
    """The last chunk of an epoch may hold one short sequence. Its pad tail, 31+ sequences long,
    is documents of max_seq_len at most (data/chunk_layout.py pad_tail_lengths): as one document
    its positions ran past tiny's 512-token RoPE tables (IndexError here; a device assert on a GPU),
    and varlen kernels, told max_seqlen, would leave most of its rows unwritten."""
    cfg = preset("tiny")
    samples = make_packed_samples(1, max_seq_len=128, seed=0)
    samples[0]["sample_idx"] = 0
    chunk = collate_chunk(samples, max_seq_len=128, microbatch_seqs=32, pad_id=PAD, masker=make_masker(0), epoch=0)
    assert 32 * 128 - int(chunk["num_tokens"]) > cfg.max_position_embeddings
    torch.manual_seed(0)
    composer_model = MLMComposerModel(ModernBertForMaskedLM(cfg))
    batch = stack_chunks([chunk])
    loss = composer_model.loss(composer_model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in composer_model.parameters() if p.grad is not None)
