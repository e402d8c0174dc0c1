"""The Composer adapter around the plain model: batch in, MLM loss out, eval metrics."""
from __future__ import annotations

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from modernbert_train.model.flops import training_flops
from modernbert_train.model.modernbert import IGNORE_INDEX, MLMOutput, ModernBertForMaskedLM
from modernbert_train.train.compile import mark_varlen_dims


class MaskedTokenLoss(Metric):
    """Cross-entropy averaged over every masked token seen (not over batches)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: MLMOutput) -> None:
        n = output.num_predictions  # the positions output.loss averages over
        self.loss_sum += output.loss.detach().double() * n
        self.count += n

    def compute(self) -> torch.Tensor:
        return (self.loss_sum / self.count.clamp(min=1)).float()


class MaskedTokenAccuracy(Metric):
    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: MLMOutput) -> None:
        # Keep the labelled rows only: a dense head has a row per token, a sparse one may have
        # filler rows (fixed prediction slots).
        keep = output.labels != IGNORE_INDEX
        logits, labels = output.logits[keep], output.labels[keep]
        self.correct += (logits.argmax(-1) == labels).sum()
        self.count += labels.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.count.clamp(min=1)


def chunk_inputs(batch: dict) -> dict:
    """One varlen chunk, as the loader stacks it (leading dim 1), in the model's packed form."""
    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1) if x.dim() > 1 else x
    cu_seqlens = flat(batch["cu_seqlens"])
    mark_varlen_dims(cu_seqlens)
    return dict(input_ids=flat(batch["input_ids"]), cu_seqlens=cu_seqlens,
                position_ids=flat(batch["position_ids"]), max_seqlen=int(batch["max_seqlen"]),
                labels=flat(batch["labels"]), prediction_slots=int(batch["prediction_slots"]))


class MLMComposerModel(ComposerModel):
    def __init__(self, model: ModernBertForMaskedLM):
        super().__init__()
        self.model = model
        self.val_metrics = {"MaskedTokenLoss": MaskedTokenLoss(), "MaskedTokenAccuracy": MaskedTokenAccuracy()}

    def forward(self, batch: dict) -> MLMOutput:
        if batch["input_ids"].dim() > 1 and batch["input_ids"].shape[0] != 1:
            raise ValueError(f"expected one varlen chunk per microbatch, got {batch['input_ids'].shape[0]}")
        return self.model(**chunk_inputs(batch))

    def loss(self, outputs: MLMOutput, batch: dict) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict, outputs=None) -> MLMOutput:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else self.val_metrics

    def update_metric(self, batch, outputs: MLMOutput, metric: Metric) -> None:
        metric.update(outputs)

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs of one batch for Composer's MFU: model/flops.py's formula over the batch's
        documents (the loader's host tensors: no device sync). The pad tail's documents start at or
        after a chunk's `num_tokens`: padding, not counted."""
        cu = batch["cu_seqlens"]
        real = cu[..., :-1] < batch["num_tokens"].reshape(*cu.shape[:-1], 1)
        lengths = cu.diff(dim=-1)[real].numpy(force=True)
        return training_flops(self.model.config, real_tokens=int(batch["num_tokens"].sum()),
                              masked_tokens=int((batch["labels"] != IGNORE_INDEX).sum()),
                              span_lengths=lengths)
