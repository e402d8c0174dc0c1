"""Composer's Trainer, kept from making the host wait for the GPU inside and between steps.

Every wait costs a GPU idle gap: once the host has waited for the step to finish, the GPU has no
work until the host has done its bookkeeping and launched the next step's kernels.
"""
from __future__ import annotations

import datetime
from typing import Any, Optional

import torch
from composer import Trainer
from composer.core import Callback, State
from composer.devices import DeviceGPU
from composer.loggers import Logger
from composer.utils import dist, map_collection

from modernbert_train.train.callbacks import checkpoint_due


def stays_on_host(tensor: torch.Tensor) -> bool:
    """Composer's bookkeeping tensors: batch sizes, token counts, "dataloader finished" and OOM
    flags, FLOPs (integers, booleans, scalars) that it only reduces over the ranks and reads back.
    Its loss accumulators, which it adds device losses into, are float vectors."""
    return tensor.dim() == 0 or not tensor.is_floating_point()


class HostBookkeepingGPU(DeviceGPU):
    """One GPU whose bookkeeping stays on the host.

    Composer 0.32.1 sends its per-step counts to the device (`tensor_to_device(torch.tensor(n))`),
    reduces them over the ranks and reads them back (`.item()`): each read waits for every kernel
    queued before it. Here those tensors (`stays_on_host`) never leave the host, so the reads are
    plain memory reads; batches, the model and the optimizer state go to the GPU as before. One
    process: the process group is gloo, which reduces host tensors. Several (`multi_rank`): one
    group with two backends, gloo for host tensors (the bookkeeping; object collectives too) and
    NCCL for CUDA tensors (gradients, the loss), so the bookkeeping's reductions are host-to-host
    and never wait for a GPU."""

    dist_backend = "gloo"

    def __init__(self, multi_rank: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        if multi_rank:
            self.dist_backend = "cpu:gloo,cuda:nccl"

    def tensor_to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if stays_on_host(tensor) else self.to_gpu(tensor)

    def to_gpu(self, tensor: torch.Tensor) -> torch.Tensor:
        return super().tensor_to_device(tensor)

    def batch_to_device(self, batch: Any) -> Any:
        """Every tensor of the batch (token ids are integers, and they belong on the GPU)."""
        if isinstance(batch, torch.Tensor):
            return self.to_gpu(batch)
        if isinstance(batch, (dict, list, tuple)):
            return map_collection(batch, self.batch_to_device)
        return batch

    def optimizer_to_device(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = self.to_gpu(value)
        return optimizer


class LossInFlight:
    """One batch's loss totals on their way to the host: copied without blocking when the batch's
    kernels are queued, read (`landed`) once a later batch's are. With several ranks the totals are
    summed over the ranks on the device first (NCCL enqueues the reduction: the host goes on) and
    divided by the world size on landing, as Composer averages them."""

    def __init__(self, losses: dict[str, torch.Tensor], batch: int):
        self.batch = batch
        self._world_size = dist.get_world_size()
        for loss in losses.values() if self._world_size > 1 else ():
            dist.all_reduce(loss, reduce_operation="SUM")  # in place: Composer drops these totals
        self._host = {}
        for name, loss in losses.items():
            host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=loss.is_cuda)
            host.copy_(loss.detach(), non_blocking=True)
            self._host[name] = host
        self._copied: Optional[torch.cuda.Event] = None
        if any(loss.is_cuda for loss in losses.values()):
            self._copied = torch.cuda.Event()
            self._copied.record()

    def landed(self) -> dict[str, float]:
        if self._copied is not None:
            self._copied.synchronize()  # this batch's kernels only: later batches stay queued
        return {name: host.item() / self._world_size for name, host in self._host.items()}


class HostAheadTrainer(Trainer):
    """Composer's Trainer with fewer or no host waits for the GPU.

    Always: the optimizer steps after the backward passes instead of through a closure. Composer
    0.32.1 passes a closure to `optimizer.step` under every precision but fp16 AMP, and that closure
    reads the loss back (`.item()`) between the last backward pass and the optimizer: the GPU then
    idles while the host launches the optimizer's kernels (StableAdamW: two per parameter tensor).
    StableAdamW never re-evaluates the loss, so nothing needs the closure.

    With `sync_free_steps` (the run config's; several processes with `sync_free_multi_rank`):
    nothing in or between steps waits for the GPU, so the host queues step k+1 while the GPU still
    runs step k.
    - Each batch's loss totals are copied to the host without blocking and read once the next
      batch's kernels are queued; they are logged under their own batch (`Logger.log_metrics(...,
      step=k)`, one batch late in wall time). The last batch's are read when the loop ends.
    - Composer's per-step counts stay on the host (`HostBookkeepingGPU`). With one rank the time
      accumulation skips its device round trip (a one-rank sum is the identity); with several it
      sums samples and tokens and takes rank 0's batch time through host tensors (gloo).
    What is trained is unchanged: same batches, same steps, same weights.
    """

    def __init__(self, *args: Any, sync_free_steps: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sync_free_steps = sync_free_steps
        self._in_flight: Optional[LossInFlight] = None
        if sync_free_steps:
            self.state.callbacks.insert(0, LandLossBeforeCheckpoint(self))

    def _use_closures(self) -> bool:
        return False

    def _accumulate_time_across_ranks(self, num_samples: int | float, num_tokens: int,
                                      batch_time: datetime.timedelta) -> tuple[Any, int, datetime.timedelta]:
        if not self._sync_free_steps:
            return super()._accumulate_time_across_ranks(num_samples, num_tokens, batch_time)
        if dist.get_world_size() == 1:  # the sums are the inputs
            return num_samples, num_tokens, batch_time
        # Host tensors: gloo reduces them (HostBookkeepingGPU's multi-rank group; DeviceCPU's).
        counts = torch.tensor([num_samples, num_tokens], dtype=torch.float64)
        dist.all_reduce(counts, reduce_operation="SUM")
        elapsed = torch.tensor([batch_time.total_seconds()], dtype=torch.float64)
        dist.broadcast(elapsed, src=0)
        return (round(counts[0].item()), round(counts[1].item()),
                datetime.timedelta(seconds=elapsed.item()))

    def _train_batch(self, use_grad_scaling: bool) -> Optional[dict[str, torch.Tensor]]:
        losses = super()._train_batch(use_grad_scaling)
        if not self._sync_free_steps or losses is None:
            return losses
        self.land_loss()  # the previous batch's: this batch's kernels are queued behind it
        self._in_flight = LossInFlight(losses, int(self.state.timestamp.batch))
        return None  # Composer then neither reads nor logs this batch's losses: land_loss does, later

    def _train_loop(self) -> None:
        try:
            super()._train_loop()
        except Exception:
            # Log the last batch's loss before the run stops (a NaN there names the cause); an
            # error from that (NonFiniteLossGuard) is raised with this one as its context.
            self.land_loss()
            raise
        self.land_loss()

    def land_loss(self) -> None:
        """Wait for the batch whose loss is in flight, then log it under that batch."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        losses = in_flight.landed()
        self.state.total_loss_dict = losses
        self.logger.log_metrics(losses, step=in_flight.batch)


class LandLossBeforeCheckpoint(Callback):
    """Before a checkpoint is written, the loss of the batch it holds is logged (and checked by
    NonFiniteLossGuard, which then stops the run before a batch with a NaN loss is saved). First
    in the callback order: before NonFiniteWeightsGuard and Composer's CheckpointSaver."""

    def __init__(self, trainer: HostAheadTrainer):
        self._trainer = trainer

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        del logger
        if checkpoint_due(state):
            self._trainer.land_loss()
