"""benchmarks/bench_trainer.py end to end on the tiny recipe on the CPU: the real trainer and the raw
loop both run, on the same chunks. A correctness smoke test of the script; it asserts nothing about speed.
"""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_trainer


def test_main_times_both_trainers_and_the_raw_loop_on_the_same_tokens(tmp_path):
    out = tmp_path / "trainer.json"
    rc = bench_trainer.main(["--device", "cpu", "--warmup-batches", "1", "--batches", "2", "--sync-free", "both",
                             "--data-dir", str(tmp_path / "data"), "--out-json", str(out),
                             "logging.progress_bar=false"])
    payload = json.loads(out.read_text())
    results = {r["loop"]: r for r in payload["results"]}
    assert rc == 0 and [r["loop"] for r in payload["results"]] == ["trainer", "sync-free", "raw"], (rc, results)
    trainer, sync_free, raw = results["trainer"], results["sync-free"], results["raw"]
    for r in (trainer, sync_free, raw):
        assert r["timed_batches"] == 2 and not r["stopped_by_time_limit"], r
        assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0, r
        assert r["chunk_tokens_per_step"] == 8 * 128, r
        assert r["loss_last"] is not None and 0 < r["loss_last"] < 20, r
        assert r["dynamo_frames_timed"] == 0, r  # tiny.yaml does not compile
    # The trainer counts its host batches as they arrive; the raw loop replays the timed ones.
    assert trainer["real_tokens_per_step"] == raw["real_tokens_per_step"], (trainer, raw)
    # Best-fit packing of lognormal documents leaves little padding.
    assert 0.9 * 8 * 128 < trainer["real_tokens_per_step"] <= 8 * 128, trainer
    assert sync_free["real_tokens_per_step"] == trainer["real_tokens_per_step"], (sync_free, trainer)
    for name, r in (("trainer", trainer), ("sync_free", sync_free)):
        ratio = payload["ratios"][f"step_time_{name}_over_raw"]
        assert ratio == r["ms_per_step"] / raw["ms_per_step"], payload["ratios"]
    assert payload["args"]["recipe"] == "yamls/tiny.yaml", payload["args"]
    assert payload["compile"] == "none" and payload["attention_backend"] == "sdpa", payload  # tiny.yaml's
    assert payload["run_config_overrides"][-1] == "logging.progress_bar=false", payload["run_config_overrides"]
    assert payload["machine"]["mosaicml"], payload["machine"]
    assert trainer["optimizer_closure"] is False, trainer  # train/builder.py's trainer
    # The synthetic shards stay in --data-dir and carry the loader's metadata contract.
    assert (tmp_path / "data" / "train" / "modernbert_meta.json").is_file()
    assert (tmp_path / "data" / "tokenizer.json").is_file()


def test_composer_closure_ablation_and_gap_profile_reach_the_trainer(tmp_path):
    out = tmp_path / "trainer.json"
    rc = bench_trainer.main(["--device", "cpu", "--warmup-batches", "1", "--batches", "1", "--composer-closure",
                             "--sync-free", "off", "--profile-gap", "2", "--data-dir", str(tmp_path / "data"), "--out-json", str(out),
                             "logging.progress_bar=false"])
    payload = json.loads(out.read_text())
    results = {r["loop"]: r for r in payload["results"]}
    assert rc == 0 and results["trainer"]["optimizer_closure"] is True, (rc, results)
    # The profiled batches come after the window: neither loop times them.
    assert results["trainer"]["timed_batches"] == 1 and results["raw"]["timed_batches"] == 1, results
    gap = payload["host_gap_profile"]["trainer"]
    assert gap["gaps"] == 2 and len(gap["gap_ms"]) == 2 and min(gap["gap_ms"]) > 0, gap
    # The next batch is fetched between batch_end and the forward: the loader must be in the profile.
    fetch = [r for r in gap["top_cumulative"] if r["function"].startswith("modernbert_train/data/loader.py:")]
    assert fetch and all(r["calls_per_gap"] >= 1 for r in fetch), gap["top_cumulative"]
    assert all(r["cum_ms_per_gap"] <= max(gap["gap_ms"]) + 1e-6 for r in gap["top_cumulative"]), gap


def test_composer_closure_times_the_stock_trainer_only(capsys):
    """Composer's closure reads the loss back inside the step: with sync_free_steps (the default)
    that would time neither trainer, so the flag asks for --sync-free off."""
    with pytest.raises(SystemExit):
        bench_trainer.parse_args(["--composer-closure"])
    assert "add --sync-free off" in capsys.readouterr().err
    assert bench_trainer.parse_args(["--composer-closure", "--sync-free", "off"]).composer_closure


def test_host_sync_counter_counts_each_wait_by_line_and_passes_other_warnings_on(monkeypatch):
    """Without a GPU: CUDA's sync debug mode is stubbed (its mode switches recorded) and its warning
    raised by hand; each is counted at the line that raised it, other warnings still reach the user."""
    import warnings

    import pytest
    import torch

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter = bench_trainer.HostSyncCounter(enabled=True)
    with pytest.warns(UserWarning, match="an unrelated warning"):
        counter.start()
        for _ in range(3):
            warnings.warn(bench_trainer.HostSyncCounter.MESSAGE)  # one line, three waits
        warnings.warn(bench_trainer.HostSyncCounter.MESSAGE)
        warnings.warn("an unrelated warning")
        counter.stop()
    assert modes == ["warn", "default"], modes
    assert sorted(counter.sites.values()) == [1, 3], counter.sites
    assert all(site.startswith("tests/benchmarks/test_bench_trainer_smoke.py:") for site in counter.sites), counter.sites
    disabled = bench_trainer.HostSyncCounter(enabled=False)
    with pytest.warns(UserWarning, match=bench_trainer.HostSyncCounter.MESSAGE):  # not swallowed
        disabled.start()
        warnings.warn(bench_trainer.HostSyncCounter.MESSAGE)
        disabled.stop()
    assert not disabled.sites and modes == ["warn", "default"]
