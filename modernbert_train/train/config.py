"""The typed run configuration: YAML recipes and `key=value` overrides merge onto these dataclasses.

Defaults live here once; recipes say only what differs. `load_run_config` is the only place that
touches raw YAML; everything downstream takes these dataclasses.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

from modernbert_train.model.config import ModernBertConfig, preset
from modernbert_train.train.compile import COMPILE_MODES


@dataclass
class StreamSpec:
    """One MDS dataset: a local folder, or a remote prefix cached in `local`."""

    local: str = MISSING
    remote: Optional[str] = None
    proportion: Optional[float] = None


@dataclass
class DataConfig:
    tokenizer: str = MISSING
    train_streams: list[StreamSpec] = field(default_factory=list)
    eval_streams: list[StreamSpec] = field(default_factory=list)
    train_split: Optional[str] = "train"
    eval_split: Optional[str] = "val"
    max_seq_len: int = 1024
    # Packed sequences per varlen chunk (ModernBERT's microbatch of 96 x 1024 tokens).
    microbatch_seqs: int = 96
    mask_rate: float = 0.3
    eval_mask_rate: float = 0.15
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle: bool = True
    # A stalled data path (e.g. a download that never returns) becomes an error after this long.
    stall_timeout_s: float = 600.0
    # Build the embedded demo corpus, tokenizer and shards under this folder first (the tiny
    # recipe); tokenizer and streams then point inside it.
    demo_root: Optional[str] = None


@dataclass
class BatchConfig:
    global_batch_seqs: int = 4608
    # Batch-size warmup: start at this many sequences per step and ramp linearly to
    # global_batch_seqs over warmup_tokens (None: no warmup).
    warmup_start_seqs: Optional[int] = None
    warmup_tokens: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 8e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    # Fully decoupled weight decay (optimi decouple_lr), not multiplied by the lr.
    weight_decay: float = 1e-5
    exclude_norms_and_biases_from_weight_decay: bool = True
    grad_clip_norm: Optional[float] = 1.0


@dataclass
class SchedulerConfig:
    # "wsd": linear warmup, constant, then decay over decay_tokens at the end of max_duration.
    # "constant": warmup then constant. "decay": 1-sqrt decay from the start of the run.
    name: str = "wsd"
    warmup_tokens: int = 3_000_000_000
    decay_tokens: int = 0
    decay_shape: str = "one_minus_sqrt"  # or "linear"
    final_lr_ratio: float = 0.0


@dataclass
class CheckpointConfig:
    # Local folder or s3://bucket/prefix (endpoint from S3_ENDPOINT_URL / AWS_ENDPOINT_URL_S3).
    save_folder: Optional[str] = None
    save_interval: str = "1000ba"
    # Checkpoints kept locally and on the bucket (None: keep all).
    keep_local: Optional[int] = 2
    keep_remote: Optional[int] = None
    # Seconds between checks that a checkpoint's upload has finished, after which `latest` on the
    # bucket moves to it. Composer's own is 30 s: `latest` lagged the newest upload by up to that,
    # a preemption in between resumed from an older checkpoint, and every run's end waited for it.
    # Each check is one HEAD request.
    latest_poll_s: float = 2.0
    autoresume: bool = True
    # Start from another run's checkpoint (chaining phases); only read when no autoresume
    # checkpoint exists.
    load_path: Optional[str] = None
    load_weights_only: bool = False
    # A new phase starts its clock at zero (schedulers, batch warmup, duration).
    reset_time: bool = False


@dataclass
class LoggingConfig:
    log_interval: str = "10ba"
    progress_bar: bool = True
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    # online / offline / disabled; offline needs no login.
    wandb_mode: str = "offline"
    metrics_file: bool = True
    # Record the sample and document ids of every batch (run_dir/data_trace-rank*.jsonl).
    data_trace: bool = False


@dataclass
class EvalConfig:
    interval: str = "1000ba"
    subset_batches: Optional[int] = 20


@dataclass
class RunConfig:
    run_name: str = MISSING
    seed: int = 17
    max_duration: str = MISSING
    # "auto": cuda if available else cpu.
    device: str = "auto"
    precision: str = "amp_bf16"
    # How the model is compiled (train/compile.py): full (one graph; the fastest step: 8% over
    # regional on an H200), regional (each layer; 3x faster start-up) or none.
    compile: str = "full"
    # Activation memory the compiled step keeps, as a fraction of what it keeps for speed alone
    # (train/compile.py); lower recomputes more in the backward pass. Ignored with compile: none.
    compile_memory_budget: float = 1.0
    # "ddp" or "fsdp" when more than one process.
    parallelism: str = "ddp"
    # One process: the host never waits for the GPU in or between steps (train/trainer.py): each
    # batch's train loss is read once the next batch is queued and logged under its own batch.
    # The trainer at 99% of the raw step's tokens/s instead of 94% on an H200 (benchmarks/README.md).
    # Several processes train with stock Composer's per-step bookkeeping (a line in the log says so)
    # unless sync_free_multi_rank is true.
    sync_free_steps: bool = True
    # sync_free_steps with several processes too: the process group gets gloo for host tensors next
    # to NCCL for CUDA tensors, Composer's per-step counts are reduced host to host through gloo,
    # the loss on the GPUs without the host waiting (train/trainer.py). Off by default: gloo's TCP
    # must reach every node (set GLOO_SOCKET_IFNAME where the default interface does not), and it
    # has been run on CPU ranks only, never on several GPUs.
    sync_free_multi_rank: bool = False
    # Where the run writes its local files (metrics, resolved config, local checkpoint copies).
    run_dir: str = "runs/${run_name}"
    model: ModernBertConfig = field(default_factory=ModernBertConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ConfigError(ValueError):
    """A recipe or override that does not fit RunConfig; the message names the key."""


def _known_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if is_dataclass(node):
        for f in fields(node):
            dotted = f"{prefix}{f.name}"
            keys.append(dotted)
            keys.extend(_known_keys(getattr(node, f.name), dotted + "."))
    return keys


def _did_you_mean(bad_key: str, known: list[str]) -> str:
    leaf = bad_key.rsplit(".", 1)[-1]
    candidates = difflib.get_close_matches(bad_key, known, n=1, cutoff=0.6)
    if not candidates:
        leaves = {k.rsplit(".", 1)[-1]: k for k in known}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        candidates = [leaves[close[0]]] if close else []
    return f" Did you mean '{candidates[0]}'?" if candidates else ""


def _int_keys(node: Any, prefix: str = "") -> set[str]:
    """Dotted keys of the int (or Optional[int]) fields under `node`."""
    keys = set()
    if is_dataclass(node):
        hints = get_type_hints(type(node))
        for f in fields(node):
            if hints[f.name] in (int, Optional[int]):
                keys.add(f"{prefix}{f.name}")
            keys |= _int_keys(getattr(node, f.name), f"{prefix}{f.name}.")
    return keys


def _whole_floats_to_int(raw: DictConfig, int_keys: set[str]) -> DictConfig:
    """YAML reads `warmup_tokens: 3e9` as the float 3000000000.0; an int field takes it when whole."""
    tree = OmegaConf.to_container(raw, resolve=False)

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, float) and value.is_integer() and f"{prefix}{key}" in int_keys:
                node[key] = int(value)

    walk(tree, "")
    return OmegaConf.create(tree)


def _merge(base: DictConfig, other: Any, where: str, known: list[str]) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or e.key or "?"
        raise ConfigError(
            f"{where}: unknown config key '{key}'.{_did_you_mean(str(key), known)}") from None
    except ValidationError as e:
        key = f" for '{e.full_key}'" if e.full_key else ""
        raise ConfigError(f"{where}: bad value{key}: {str(e).splitlines()[0]}") from None
    except TypeError as e:  # a dict merged onto a list (`optimizer.betas.1=0.95`) or the reverse
        raise ConfigError(f"{where}: {e}: a list is set whole (e.g. optimizer.betas=[0.9,0.95]), "
                          "not item by item") from None


def load_run_config(yaml_path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Merge a recipe and `key=value` overrides onto RunConfig and validate the result."""
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    raw = OmegaConf.load(yaml_path) if yaml_path is not None else OmegaConf.create({})
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{yaml_path}: a recipe is a mapping of config keys to values, not a list")
    cli = [OmegaConf.from_dotlist([o]) for o in overrides]
    # The model preset decides the model defaults before the recipe's own model keys apply
    # (the last override naming one wins over the recipe).
    presets = [OmegaConf.select(c, "model.preset") for c in [raw, *cli]]
    preset_name = next((name for name in reversed(presets) if name), None)
    base = RunConfig(model=preset(preset_name) if preset_name else ModernBertConfig())
    known = _known_keys(base)
    int_keys = _int_keys(base)
    schema = OmegaConf.structured(base)
    merged = _merge(schema, _whole_floats_to_int(raw, int_keys), str(yaml_path), known)
    # One override at a time, so an error names the override it comes from.
    for override, c in zip(overrides, cli):
        merged = _merge(merged, _whole_floats_to_int(c, int_keys), f"command-line override {override!r}", known)
    try:
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{yaml_path}: required config keys not set: {', '.join(missing)}")
        OmegaConf.resolve(merged)
    except InterpolationResolutionError as e:
        raise ConfigError(f"cannot resolve '{e.full_key}': {str(e).splitlines()[0]}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Incompatible settings fail here, at start-up, with one message each."""
    problems = _range_problems(cfg) + _time_problems(cfg)
    d, b, m = cfg.data, cfg.batch, cfg.model
    per_step_unit = d.microbatch_seqs
    if per_step_unit >= 1 and b.global_batch_seqs % per_step_unit:
        problems.append(f"batch.global_batch_seqs={b.global_batch_seqs} is not a multiple of "
                        f"data.microbatch_seqs={d.microbatch_seqs}")
    if d.microbatch_seqs > b.global_batch_seqs:
        problems.append(f"data.microbatch_seqs={d.microbatch_seqs} is larger than "
                        f"batch.global_batch_seqs={b.global_batch_seqs}")
    if per_step_unit >= 1 and b.warmup_start_seqs is not None and (
            b.warmup_start_seqs % per_step_unit or b.warmup_start_seqs > b.global_batch_seqs):
        problems.append(f"batch.warmup_start_seqs={b.warmup_start_seqs} must be a multiple of "
                        f"data.microbatch_seqs={d.microbatch_seqs} and <= global_batch_seqs")
    if d.max_seq_len > m.max_position_embeddings:
        problems.append(f"data.max_seq_len={d.max_seq_len} exceeds model.max_position_embeddings="
                        f"{m.max_position_embeddings} (the length the recipe's RoPE is set up for)")
    if not 0.0 < d.mask_rate < 1.0 or not 0.0 < d.eval_mask_rate < 1.0:
        problems.append(f"mask rates must be in (0, 1): data.mask_rate={d.mask_rate}, "
                        f"data.eval_mask_rate={d.eval_mask_rate}")
    if not d.train_streams:
        problems.append("data.train_streams is empty: name at least one MDS dataset")
    if cfg.compile not in COMPILE_MODES:
        problems.append(f"compile={cfg.compile!r}: use one of {', '.join(COMPILE_MODES)}")
    if not 0.0 < cfg.compile_memory_budget <= 1.0:
        problems.append(f"compile_memory_budget={cfg.compile_memory_budget}: use a fraction in (0, 1]")
    if cfg.parallelism not in ("ddp", "fsdp"):
        problems.append(f"parallelism={cfg.parallelism!r}: use 'ddp' or 'fsdp'")
    if cfg.sync_free_multi_rank and not cfg.sync_free_steps:
        problems.append("sync_free_multi_rank=true needs sync_free_steps=true (it extends it to several processes)")
    if cfg.scheduler.name not in ("wsd", "constant", "decay"):
        problems.append(f"scheduler.name={cfg.scheduler.name!r}: use wsd, constant or decay")
    if cfg.scheduler.decay_shape not in ("one_minus_sqrt", "linear"):
        problems.append(f"scheduler.decay_shape={cfg.scheduler.decay_shape!r}: one_minus_sqrt or linear")
    o = cfg.optimizer
    if not o.lr > 0:
        problems.append(f"optimizer.lr={o.lr} must be > 0")
    if len(o.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in o.betas):
        problems.append(f"optimizer.betas={list(o.betas)} must be two numbers in [0, 1)")
    if not o.eps > 0:
        problems.append(f"optimizer.eps={o.eps} must be > 0")
    if not o.weight_decay >= 0:
        problems.append(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if o.grad_clip_norm is not None and not o.grad_clip_norm >= 0:
        problems.append(f"optimizer.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0 or null: no clipping)")
    if not cfg.checkpoint.latest_poll_s > 0:
        problems.append(f"checkpoint.latest_poll_s={cfg.checkpoint.latest_poll_s} must be > 0")
    if cfg.logging.wandb_mode not in ("online", "offline", "disabled"):
        problems.append(f"logging.wandb_mode={cfg.logging.wandb_mode!r}: online/offline/disabled")
    try:
        m.validate()
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _range_problems(cfg: RunConfig) -> list[str]:
    """Counts, sizes and fractions that have one obvious valid range."""
    d, b, s, ck, ev = cfg.data, cfg.batch, cfg.scheduler, cfg.checkpoint, cfg.eval
    checks = [  # (key, value, valid, what it must be)
        ("data.max_seq_len", d.max_seq_len, d.max_seq_len >= 1, ">= 1"),
        ("data.microbatch_seqs", d.microbatch_seqs, d.microbatch_seqs >= 1, ">= 1"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.prefetch_factor", d.prefetch_factor, d.prefetch_factor >= 1, ">= 1"),
        ("data.stall_timeout_s", d.stall_timeout_s, d.stall_timeout_s > 0, "> 0"),
        ("batch.global_batch_seqs", b.global_batch_seqs, b.global_batch_seqs >= 1, ">= 1"),
        ("batch.warmup_start_seqs", b.warmup_start_seqs,
         b.warmup_start_seqs is None or b.warmup_start_seqs >= 1, ">= 1 (null: no batch-size warmup)"),
        ("batch.warmup_tokens", b.warmup_tokens, b.warmup_tokens >= 0, ">= 0"),
        ("scheduler.warmup_tokens", s.warmup_tokens, s.warmup_tokens >= 0, ">= 0"),
        ("scheduler.decay_tokens", s.decay_tokens, s.decay_tokens >= 0, ">= 0"),
        ("scheduler.final_lr_ratio", s.final_lr_ratio, 0.0 <= s.final_lr_ratio <= 1.0,
         "in [0, 1] (the end lr as a fraction of the peak)"),
        ("checkpoint.keep_local", ck.keep_local, ck.keep_local is None or ck.keep_local >= 0,
         ">= 0 (null: keep all)"),
        ("checkpoint.keep_remote", ck.keep_remote, ck.keep_remote is None or ck.keep_remote >= 1,
         ">= 1 (null: keep all)"),
        ("eval.subset_batches", ev.subset_batches, ev.subset_batches is None or ev.subset_batches >= 1,
         ">= 1 (null: the whole eval set)"),
    ]
    problems = [f"{key}={value} must be {rule}" for key, value, valid, rule in checks if not valid]
    if ck.keep_local == 0 and ck.save_folder and not ck.save_folder.startswith("s3://"):
        # Composer deletes each checkpoint once written and points `latest` at none: the run would
        # end with an empty folder and a restart would train from batch 0.
        problems.append(f"checkpoint.keep_local=0 keeps no checkpoint in the local save_folder "
                        f"{ck.save_folder}: nothing to resume from; use >= 1 (null: keep all)")
    return problems


def _time_problems(cfg: RunConfig) -> list[str]:
    """Durations and intervals are composer time strings; read them as composer will."""
    from composer.core.time import Time  # here, not at import: composer is slow to import

    def problem(key: str, text: str, units: Optional[tuple[str, ...]], use: str) -> Optional[str]:
        try:
            time = Time.from_timestring(text)
        except (ValueError, TypeError):  # no unit, an unknown one, or a fraction of a batch
            time = None
        if time is None or (units and time.unit.value not in units) or not time.value > 0:
            return f"{key}={text!r}: use {use}"
        return None

    found = [
        problem("max_duration", cfg.max_duration, ("tok", "ba", "sp"),
                "a positive number of tokens (tok), batches (ba) or samples (sp), e.g. 1000ba"),
        # The training data never ends an epoch (data/loader.py StepBatcher streams steps across
        # epochs), so an interval in epochs would never come, and Composer's checkpoint saver needs
        # a sized dataloader for a fraction of the run (dur).
        problem("logging.log_interval", cfg.logging.log_interval, ("ba",), "a positive number of batches, e.g. 10ba"),
        problem("checkpoint.save_interval", cfg.checkpoint.save_interval, ("ba", "tok", "sp"),
                "a positive number of batches (ba), tokens (tok) or samples (sp), e.g. 1000ba"),
        problem("eval.interval", cfg.eval.interval, ("ba", "tok", "sp", "dur"),
                "a positive number of batches (ba), tokens (tok) or samples (sp), or a fraction of the "
                "run (dur), e.g. 1000ba"),
    ]
    return [p for p in found if p]
