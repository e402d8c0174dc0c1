"""Every recipe loads onto the typed config; typos and bad settings fail early with the key's name."""
from __future__ import annotations

from pathlib import Path

import pytest

from modernbert_train.train.config import ConfigError, load_run_config

YAMLS = sorted((Path(__file__).resolve().parents[2] / "yamls").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in YAMLS}
    assert {"tiny.yaml", "base.yaml", "large.yaml", "base_context_extension.yaml", "base_decay.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_every_recipe_loads(path):
    cfg = load_run_config(path)
    assert cfg.run_name
    assert cfg.batch.global_batch_seqs % cfg.data.microbatch_seqs == 0


def test_base_recipe_is_modernbert_base_phase_one():
    cfg = load_run_config(Path(__file__).resolve().parents[2] / "yamls/base.yaml")
    m = cfg.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (768, 22, 12, 1152)
    assert (cfg.data.max_seq_len, cfg.data.microbatch_seqs, cfg.batch.global_batch_seqs) == (1024, 96, 4608)
    assert (cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.eps, cfg.optimizer.weight_decay) == (
        8e-4, [0.9, 0.98], 1e-6, 1e-5)
    assert cfg.scheduler.warmup_tokens == 3_000_000_000
    assert (cfg.batch.warmup_start_seqs, cfg.batch.warmup_tokens) == (768, 50_000_000_000)
    assert cfg.data.mask_rate == 0.3 and cfg.precision == "amp_bf16" and cfg.compile == "full"
    assert cfg.checkpoint.save_folder.startswith("s3://")


def test_overrides_apply_and_preset_fills_model():
    cfg = load_run_config(YAMLS[0].parent / "base.yaml", ["model.preset=large", "data.microbatch_seqs=48",
                                                         "optimizer.lr=1e-4"])
    assert cfg.model.hidden_size == 1024 and cfg.data.microbatch_seqs == 48 and cfg.optimizer.lr == 1e-4


@pytest.mark.parametrize("override, expected", [
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'. Did you mean 'optimizer.lr'?"),
    ("data.microbatch_seq=4", "Did you mean 'data.microbatch_seqs'?"),
    ("modle.hidden_size=4", "Did you mean 'model'"),
])
def test_typo_is_rejected_with_a_suggestion(override, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config(YAMLS[0].parent / "tiny.yaml", [override])
    assert expected in str(e.value), str(e.value)


def test_typo_inside_a_recipe_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: x\nmax_duration: 10ba\ndata:\n  tokenizer: t\n  train_streams: [{local: d}]\n"
                   "optimizer:\n  weight_decya: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optimizer.weight_decya'.*weight_decay"):
        load_run_config(bad)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="data.microbatch_seqs"):
        load_run_config(YAMLS[0].parent / "tiny.yaml", ["data.microbatch_seqs=many"])


@pytest.mark.parametrize("overrides, expected", [
    (["model.local_attention=127"], "local_attention=127"),
    (["data.microbatch_seqs=64"], "batch.global_batch_seqs=32 is not a multiple of data.microbatch_seqs=64"),
    (["data.max_seq_len=1024"], "exceeds model.max_position_embeddings=512"),
    (["data.mask_rate=1.5"], "mask rates must be in (0, 1)"),
    (["batch.warmup_start_seqs=12"], "batch.warmup_start_seqs=12 must be a multiple"),
    (["model.vocab_size=4000"], "not a multiple of 64"),
    (["scheduler.final_lr_ratio=-1"], "scheduler.final_lr_ratio=-1.0 must be in [0, 1]"),
    (["scheduler.final_lr_ratio=2"], "scheduler.final_lr_ratio=2.0 must be in [0, 1]"),
    (["scheduler.warmup_tokens=-5"], "scheduler.warmup_tokens=-5 must be >= 0"),
    (["scheduler.decay_tokens=-5"], "scheduler.decay_tokens=-5 must be >= 0"),
    (["batch.warmup_tokens=-1"], "batch.warmup_tokens=-1 must be >= 0"),
    (["batch.warmup_start_seqs=0"], "batch.warmup_start_seqs=0 must be >= 1"),
    (["batch.global_batch_seqs=0"], "batch.global_batch_seqs=0 must be >= 1"),
    (["data.microbatch_seqs=0"], "data.microbatch_seqs=0 must be >= 1"),
    (["data.max_seq_len=0"], "data.max_seq_len=0 must be >= 1"),
    (["data.max_seq_len=-128"], "data.max_seq_len=-128 must be >= 1"),
    (["data.num_workers=-1"], "data.num_workers=-1 must be >= 0"),
    (["data.prefetch_factor=0"], "data.prefetch_factor=0 must be >= 1"),
    (["data.stall_timeout_s=0"], "data.stall_timeout_s=0.0 must be > 0"),
    (["checkpoint.keep_local=-1"], "checkpoint.keep_local=-1 must be >= 0"),
    (["checkpoint.keep_remote=0"], "checkpoint.keep_remote=0 must be >= 1"),
    (["eval.subset_batches=0"], "eval.subset_batches=0 must be >= 1 (null: the whole eval set)"),
    (["max_duration=10ep"], "max_duration='10ep': use a positive number of tokens (tok), batches (ba) or samples (sp)"),
    (["max_duration=0.5dur"], "max_duration='0.5dur': use a positive number of tokens"),
    (["max_duration=1000"], "max_duration='1000': use a positive number of tokens"),
    (["max_duration=0ba"], "max_duration='0ba': use a positive number of tokens"),
    (["max_duration=1.5ba"], "max_duration='1.5ba': use a positive number of tokens"),
    (["logging.log_interval=10tok"], "logging.log_interval='10tok': use a positive number of batches"),
    (["eval.interval=0ba"], "eval.interval='0ba': use a positive number of batches"),
    (["checkpoint.save_interval=often"], "checkpoint.save_interval='often': use a positive number of batches"),
    (["checkpoint.save_interval=1ep"], "checkpoint.save_interval='1ep': use a positive number of batches"),
    (["checkpoint.save_interval=0.5dur"], "checkpoint.save_interval='0.5dur': use a positive number of batches"),
    (["eval.interval=2ep"], "eval.interval='2ep': use a positive number of batches"),
    (["logging.log_interval=1ep"], "logging.log_interval='1ep': use a positive number of batches"),
    (["checkpoint.keep_local=0"], "checkpoint.keep_local=0 keeps no checkpoint in the local save_folder"),
    (["optimizer.betas.1=0.95"], "command-line override 'optimizer.betas.1=0.95': Cannot merge incompatible "
                                 "container types: a list is set whole (e.g. optimizer.betas=[0.9,0.95])"),
    (["data.train_streams.0.local=/x"], "override 'data.train_streams.0.local=/x': Cannot merge"),
    (["optimizer=[1]"], "command-line override 'optimizer=[1]': bad value: Merge error: list is not a subclass"),
    (["=5"], "overrides must be key=value, got ['=5']"),
    (["run_dir=${nope}"], "cannot resolve 'run_dir': Interpolation key 'nope' not found"),
])
def test_incompatible_settings_fail_at_startup(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config(YAMLS[0].parent / "tiny.yaml", overrides)
    assert expected in str(e.value), str(e.value)


def test_bad_optimizer_numbers_are_all_listed_in_one_message():
    with pytest.raises(ConfigError) as e:
        load_run_config(YAMLS[0].parent / "tiny.yaml", ["optimizer.lr=0", "optimizer.betas=[0.9,1.0]",
                                                        "optimizer.eps=-1e-8", "optimizer.weight_decay=-0.1",
                                                        "optimizer.grad_clip_norm=-1"])
    message = str(e.value)
    for expected in ["optimizer.lr=0.0 must be > 0", "optimizer.betas=[0.9, 1.0] must be two numbers in [0, 1)",
                     "optimizer.eps=-1e-08 must be > 0", "optimizer.weight_decay=-0.1 must be >= 0",
                     "optimizer.grad_clip_norm=-1.0 must be >= 0"]:
        assert expected in message, message
    assert message.count("\n  - ") == 5, message


@pytest.mark.parametrize("overrides, expected", [
    (["optimizer.lr=-8e-4"], "optimizer.lr=-0.0008 must be > 0"),
    (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] must be two numbers in [0, 1)"),
    (["optimizer.betas=[-0.1,0.98]"], "optimizer.betas=[-0.1, 0.98] must be two numbers"),
    (["compile_memory_budget=0"], "compile_memory_budget=0.0: use a fraction in (0, 1]"),
    (["compile_memory_budget=1.5"], "compile_memory_budget=1.5: use a fraction in (0, 1]"),
    (["checkpoint.latest_poll_s=0"], "checkpoint.latest_poll_s=0.0 must be > 0"),
], ids=["negative-lr", "one-beta", "negative-beta", "zero-memory-budget", "memory-budget-above-1", "zero-latest-poll"])
def test_bad_optimizer_number_fails_at_startup(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config(YAMLS[0].parent / "tiny.yaml", overrides)
    assert expected in str(e.value), str(e.value)


def test_sync_free_multi_rank_needs_sync_free_steps():
    with pytest.raises(ConfigError, match="sync_free_multi_rank=true needs sync_free_steps=true"):
        load_run_config(YAMLS[0].parent / "tiny.yaml", ["sync_free_steps=false", "sync_free_multi_rank=true"])
    assert load_run_config(YAMLS[0].parent / "tiny.yaml", ["sync_free_multi_rank=true"]).sync_free_multi_rank


def test_edge_optimizer_numbers_are_accepted():
    cfg = load_run_config(YAMLS[0].parent / "tiny.yaml", ["optimizer.betas=[0,0.999]", "optimizer.weight_decay=0",
                                                          "optimizer.grad_clip_norm=null"])
    assert (cfg.optimizer.betas, cfg.optimizer.weight_decay, cfg.optimizer.grad_clip_norm) == ([0.0, 0.999], 0.0, None)


def test_problems_are_all_listed_and_nothing_divides_by_a_zero_microbatch():
    with pytest.raises(ConfigError) as e:
        load_run_config(YAMLS[0].parent / "tiny.yaml", ["data.microbatch_seqs=0", "batch.warmup_start_seqs=16",
                                                        "scheduler.final_lr_ratio=2", "max_duration=2ep"])
    message = str(e.value)
    for expected in ["data.microbatch_seqs=0 must be >= 1", "scheduler.final_lr_ratio=2.0 must be in [0, 1]",
                     "max_duration='2ep'"]:
        assert expected in message, message
    assert message.count("\n  - ") == 3, message


def test_edge_settings_are_accepted():
    cfg = load_run_config(YAMLS[0].parent / "tiny.yaml", [
        "scheduler.final_lr_ratio=1", "scheduler.warmup_tokens=0", "batch.warmup_start_seqs=null",
        "batch.warmup_tokens=0", "data.num_workers=0", "checkpoint.save_folder=s3://bucket/run",
        "checkpoint.keep_local=0", "eval.subset_batches=null", "max_duration=3e4tok", "eval.interval=0.5dur",
        "checkpoint.save_interval=10sp", "logging.log_interval=5ba"])
    assert (cfg.scheduler.final_lr_ratio, cfg.batch.warmup_start_seqs, cfg.eval.subset_batches, cfg.max_duration) == (
        1.0, None, None, "3e4tok")


def test_whole_number_floats_fill_int_fields_and_lists_are_set_whole(tmp_path):
    cfg = load_run_config(YAMLS[0].parent / "base.yaml", ["scheduler.warmup_tokens=3e9", "batch.warmup_tokens=5.0e10",
                                                         "optimizer.betas=[0.9,0.95]"])
    assert (cfg.scheduler.warmup_tokens, cfg.batch.warmup_tokens, cfg.optimizer.betas) == (
        3_000_000_000, 50_000_000_000, [0.9, 0.95])
    assert type(cfg.scheduler.warmup_tokens) is int, type(cfg.scheduler.warmup_tokens)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run_name: x\nmax_duration: 10ba\ndata:\n  tokenizer: t\n  train_streams: [{local: d}]\n"
                      "scheduler:\n  warmup_tokens: 2e6\n")
    assert load_run_config(recipe).scheduler.warmup_tokens == 2_000_000
    with pytest.raises(ConfigError, match="bad value for 'scheduler.warmup_tokens'"):
        load_run_config(recipe, ["scheduler.warmup_tokens=1.5"])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="required config keys not set: .*max_duration"):
        load_run_config(None, ["run_name=x", "data.tokenizer=t", "data.train_streams=[{local: d}]"])


@pytest.mark.parametrize("flex_trains", [False, True], ids=["torch-without-cpu-backward", "torch-with-it"])
def test_flex_on_the_cpu_is_refused_where_torch_cannot_train_it(monkeypatch, flex_trains):
    """Torch 2.10+ has no FlexAttention backward on the CPU: a CPU run that asks for flex stops while
    the model is assembled, naming the setting and the fix, not at the first backward pass."""
    from types import SimpleNamespace

    from modernbert_train.train import builder
    cfg = load_run_config(YAMLS[0].parent / "tiny.yaml", ["device=cpu", "model.attention_backend=flex"])
    tokenizer = SimpleNamespace(padded_vocab_size=cfg.model.vocab_size, tokenizer_vocab_size=cfg.model.vocab_size,
                                special=SimpleNamespace(pad=0, cls=1, sep=2, mask=3))
    monkeypatch.setattr(builder, "flex_cpu_training_missing", lambda: None if flex_trains else "no CPU backward here")
    if flex_trains:
        assert builder.model_config_for(cfg, tokenizer).attention_backend == "flex"
    else:
        with pytest.raises(ValueError, match="model.attention_backend=flex cannot train on the CPU: no CPU backward here"):
            builder.model_config_for(cfg, tokenizer)
