"""The one place where model, data, optimizer, schedules, checkpoints and loggers meet Composer."""
from __future__ import annotations

import copy
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from composer import Evaluator, Trainer
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import DataSpec, Time, TimeUnit
from composer.utils import dist, get_device, reproducibility

from modernbert_train.data.loader import (LoaderConfig, StepBatcher, StreamConfig, build_chunk_dataloader,
                                          num_samples_in_batch, num_tokens_in_batch, split_batch)
from modernbert_train.data.tokenizer import TextTokenizer
from modernbert_train.model.attention import fastest_available, flex_cpu_training_missing
from modernbert_train.model.config import ModernBertConfig
from modernbert_train.model.modernbert import ModernBertForMaskedLM
from modernbert_train.train.callbacks import (DataResumption, DataTrace, NonFiniteLossGuard,
                                              NonFiniteWeightsGuard, PackingEfficiency, PhaseStart,
                                              RunInfo, StalledDataGuard)
from modernbert_train.train.checkpointing import RemoteRetention, checkpoint_saver, preflight_save_folder
from modernbert_train.train.compile import compile_model
from modernbert_train.train.composer_model import MLMComposerModel
from modernbert_train.train.config import RunConfig, StreamSpec
from modernbert_train.train.loggers import MetricsFileLogger, WandBCompatLogger
from modernbert_train.train.optim import build_optimizer
from modernbert_train.train.schedulers import build_scheduler, chunks_per_step
from modernbert_train.train.trainer import HostAheadTrainer, HostBookkeepingGPU

log = logging.getLogger(__name__)


def resolve_device(cfg: RunConfig) -> str:
    if cfg.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return cfg.device


def model_config_for(cfg: RunConfig, tokenizer: TextTokenizer) -> ModernBertConfig:
    """The model config with the tokenizer's facts (special ids) filled in, the vocab checked and
    `attention_backend: auto` resolved for this machine."""
    if cfg.model.vocab_size < tokenizer.padded_vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer "
                         f"{cfg.data.tokenizer} needs ({tokenizer.tokenizer_vocab_size} tokens, padded "
                         f"to {tokenizer.padded_vocab_size})")
    s = tokenizer.special
    backend, device = cfg.model.attention_backend, resolve_device(cfg)
    if backend == "auto":
        backend = fastest_available("cuda" if device == "gpu" else "cpu")
        log.info("attention_backend auto -> %s", backend)
    if backend == "flex" and device == "cpu" and (why := flex_cpu_training_missing()):
        raise ValueError(f"model.attention_backend=flex cannot train on the CPU: {why}")
    return replace(cfg.model, pad_token_id=s.pad, cls_token_id=s.cls, sep_token_id=s.sep,
                   mask_token_id=s.mask, attention_backend=backend)


def total_tokens(cfg: RunConfig) -> int:
    """max_duration in tokens (batches and samples converted at the full global batch; the decay of
    such a run follows its own unit, schedulers.WarmupStableDecay)."""
    duration = Time.from_timestring(cfg.max_duration)
    if duration.unit == TimeUnit.TOKEN:
        return int(duration.value)
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value) * cfg.batch.global_batch_seqs * cfg.data.max_seq_len
    if duration.unit == TimeUnit.SAMPLE:
        return int(duration.value) * cfg.data.max_seq_len
    raise ValueError(f"max_duration={cfg.max_duration!r}: use tokens (tok), batches (ba) or samples (sp)")


def _streams(specs: list[StreamSpec]) -> tuple[StreamConfig, ...]:
    return tuple(StreamConfig(local=s.local, remote=s.remote, proportion=s.proportion) for s in specs)


def build_train_data(cfg: RunConfig, tokenizer: TextTokenizer) -> tuple[DataSpec, StepBatcher]:
    d = cfg.data
    loader = build_chunk_dataloader(
        LoaderConfig(streams=_streams(d.train_streams), split=d.train_split, max_seq_len=d.max_seq_len,
                     microbatch_seqs=d.microbatch_seqs, mask_rate=d.mask_rate, seed=cfg.seed,
                     shuffle=d.shuffle, num_workers=d.num_workers, prefetch_factor=d.prefetch_factor,
                     download_timeout_s=d.stall_timeout_s, pin_memory=resolve_device(cfg) == "gpu"),
        special=tokenizer.special, special_ids=tokenizer.special_ids,
        vocab_size=tokenizer.tokenizer_vocab_size, tokenizer_sha256=tokenizer.sha256,
        tokenizer_path=tokenizer.path)
    world = dist.get_world_size()
    b = cfg.batch
    schedule = partial(chunks_per_step, start_seqs=b.warmup_start_seqs, end_seqs=b.global_batch_seqs,
                       warmup_tokens=b.warmup_tokens, max_seq_len=d.max_seq_len,
                       microbatch_seqs=d.microbatch_seqs, world_size=world)
    schedule(0)  # fail now, not at the first step, if the batch does not divide over the ranks
    batcher = StepBatcher(loader, chunks_per_step=schedule, world_size=world)
    spec = DataSpec(batcher, get_num_samples_in_batch=num_samples_in_batch,
                    get_num_tokens_in_batch=num_tokens_in_batch, split_batch=split_batch)
    return spec, batcher


def build_eval_data(cfg: RunConfig, tokenizer: TextTokenizer) -> DataSpec | None:
    d = cfg.data
    if not d.eval_streams:
        return None
    loader = build_chunk_dataloader(
        LoaderConfig(streams=_streams(d.eval_streams), split=d.eval_split, max_seq_len=d.max_seq_len,
                     microbatch_seqs=d.microbatch_seqs, mask_rate=d.eval_mask_rate, seed=cfg.seed,
                     shuffle=False, num_workers=min(d.num_workers, 1), prefetch_factor=d.prefetch_factor,
                     download_timeout_s=d.stall_timeout_s, pin_memory=resolve_device(cfg) == "gpu"),
        special=tokenizer.special, special_ids=tokenizer.special_ids,
        vocab_size=tokenizer.tokenizer_vocab_size, tokenizer_sha256=tokenizer.sha256,
        tokenizer_path=tokenizer.path,
        # The same masks at every evaluation, and every sequence evaluated (the last chunk may be short).
        mask_epoch=0, drop_last=False)
    return DataSpec(loader, get_num_samples_in_batch=num_samples_in_batch,
                    get_num_tokens_in_batch=num_tokens_in_batch,
                    split_batch=lambda batch, _size: [batch])


def prepare_demo(cfg: RunConfig) -> None:
    """The tiny recipe's corpus, tokenizer and shards, built on first use. Every rank may call this
    before torch.distributed is up: a file lock lets one build while the others wait."""
    from modernbert_train.data.demo import ensure_demo_assets
    ensure_demo_assets(Path(cfg.data.demo_root), max_seq_len=cfg.data.max_seq_len,
                       vocab_size=cfg.model.vocab_size)


def fit(trainer: Trainer, cfg: RunConfig) -> bool:
    """Train to max_duration; False if the run had already finished (nothing to do)."""
    state = trainer.state
    started_new_phase = cfg.checkpoint.load_path is not None and state.load_path == cfg.checkpoint.load_path
    if started_new_phase and cfg.checkpoint.reset_time:
        trainer.fit(reset_time=True)
        return True
    elapsed = state.timestamp.get(state.max_duration.unit)
    if state.max_duration <= elapsed:
        log.info("run %s already reached max_duration %s (at %s); nothing to do",
                 cfg.run_name, state.max_duration, elapsed)
        return False
    trainer.fit()
    return True


def build_trainer(cfg: RunConfig) -> Trainer:
    device = resolve_device(cfg)
    precision = cfg.precision
    if device == "cpu" and precision != "fp32":
        log.info("precision %s needs a GPU; using fp32 on the CPU", precision)
        precision = "fp32"
    run_dir = Path(cfg.run_dir)
    if cfg.data.demo_root:
        prepare_demo(cfg)
    world_size = dist.get_world_size()
    sync_free = cfg.sync_free_steps and (world_size == 1 or cfg.sync_free_multi_rank)
    if cfg.sync_free_steps and not sync_free:
        log.info("sync_free_steps applies to one process; with %d processes, Composer's per-step "
                 "reductions go through the default process group (NCCL on GPUs) and wait for the "
                 "device as before (sync_free_multi_rank=true: through gloo, host to host)", world_size)
    if sync_free and world_size > 1:
        log.info("sync_free_steps on %d processes: Composer's per-step counts are reduced host to host "
                 "(gloo), the loss on the devices, read one batch later", world_size)
    trainer_device = HostBookkeepingGPU(multi_rank=world_size > 1) if sync_free and device == "gpu" else device
    if world_size > 1:
        # Before any StreamingDataset exists: otherwise each one opens and tears down a temporary
        # process group of its own, and ranks race on the rendezvous store. The trainer's device
        # chooses the group's backends.
        dist.initialize_dist(get_device(trainer_device))
    if dist.get_global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Storage problems (bad credentials, missing bucket, read-only disk) fail before step 1.
        preflight_save_folder(cfg.checkpoint.save_folder, run_dir)

    tokenizer = TextTokenizer.load(cfg.data.tokenizer)
    model_cfg = model_config_for(cfg, tokenizer)
    # Seed before the weights are drawn: a restart before the first checkpoint must build the
    # same initial model as the run it replaces.
    reproducibility.seed_all(cfg.seed)
    model = ModernBertForMaskedLM(model_cfg)
    # In place: parameter names and checkpoints are unchanged.
    compile_model(model, cfg.compile, cfg.compile_memory_budget)
    composer_model = MLMComposerModel(model)
    optimizer = build_optimizer(cfg.optimizer, model, device_type="cuda" if device == "gpu" else "cpu")
    # This config's optimizer settings, before a checkpoint's replace them (callbacks.PhaseStart).
    configured = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
    scheduler = build_scheduler(cfg.scheduler, total_tokens(cfg))
    train_spec, batcher = build_train_data(cfg, tokenizer)
    eval_spec = build_eval_data(cfg, tokenizer)

    ck = cfg.checkpoint
    callbacks = [
        DataResumption(batcher),
        RunInfo(cfg, model_cfg, run_dir),
        NonFiniteWeightsGuard(),
        PackingEfficiency(),
        StalledDataGuard(timeout_s=cfg.data.stall_timeout_s),
        LRMonitor(),
        SpeedMonitor(window_size=20),
    ]
    if ck.load_path:
        callbacks.append(PhaseStart(ck.load_path, reset_time=ck.reset_time, weights_only=ck.load_weights_only,
                                    hyperparameters=configured, batcher=batcher))
    if cfg.logging.data_trace:
        callbacks.append(DataTrace(run_dir))
    if ck.save_folder:
        callbacks.append(checkpoint_saver(ck))
    if ck.save_folder and ck.save_folder.startswith("s3://") and ck.keep_remote:
        callbacks.append(RemoteRetention(ck.save_folder, keep=ck.keep_remote))
    loggers = []
    if cfg.logging.metrics_file:
        loggers.append(MetricsFileLogger(run_dir))
    if cfg.logging.wandb_project and cfg.logging.wandb_mode != "disabled":
        loggers.append(WandBCompatLogger(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                                         mode=cfg.logging.wandb_mode, name=cfg.run_name, wandb_dir=run_dir))
    # A logger destination, so that it sees each loss under its batch, after the metrics file has
    # recorded it.
    loggers.append(NonFiniteLossGuard())
    algorithms = []
    if cfg.optimizer.grad_clip_norm:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=cfg.optimizer.grad_clip_norm))
    parallelism = None
    if cfg.parallelism == "fsdp" and dist.get_world_size() > 1:
        parallelism = {"fsdp": {"sharding_strategy": "SHARD_GRAD_OP", "mixed_precision": "DEFAULT",
                                "use_orig_params": True, "state_dict_type": "full"}}

    evaluators = None
    if eval_spec is not None:
        evaluators = Evaluator(label="val", dataloader=eval_spec,
                               metric_names=list(composer_model.get_metrics(is_train=False)),
                               subset_num_batches=cfg.eval.subset_batches or -1)
    return HostAheadTrainer(
        sync_free_steps=sync_free,
        model=composer_model,
        train_dataloader=train_spec,
        eval_dataloader=evaluators,
        eval_interval=cfg.eval.interval if evaluators is not None else 1,  # Composer warns otherwise
        max_duration=cfg.max_duration,
        optimizers=optimizer,
        schedulers=scheduler,
        step_schedulers_every_batch=True,
        device=trainer_device,
        precision=precision,
        device_train_microbatch_size=cfg.data.microbatch_seqs,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        progress_bar=cfg.logging.progress_bar,
        log_to_console=not cfg.logging.progress_bar,
        console_log_interval=cfg.logging.log_interval,
        run_name=cfg.run_name,
        seed=cfg.seed,
        # Checkpoints: the CheckpointSaver in `callbacks` (checkpointing.checkpoint_saver).
        autoresume=ck.autoresume and ck.save_folder is not None,
        load_path=ck.load_path,
        load_weights_only=ck.load_weights_only,
        load_strict_model_weights=True,
        # A new phase starts from another run's weights, never from its data position (that state
        # belongs to another dataset); autoresume ignores this and restores everything.
        load_ignore_keys=["state/callbacks/DataResumption"] if ck.load_path else None,
        # The data state comes from our own callback (exact sample count); Composer must not
        # replay batches to catch up.
        spin_dataloaders=False,
        # Compiled above, by us: regionally by default, which Composer's compile_config cannot do.
        compile_config=None,
        parallelism_config=parallelism,
    )
