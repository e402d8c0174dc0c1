"""benchmarks/bench_precision.py end to end on the tiny recipe on the CPU: each arm trains the same
run (same data, same initial weights), and only the bf16 arms run under autocast. A correctness
smoke test of the script; it asserts nothing about which arm learns better."""
from __future__ import annotations

import json
import math

from benchmarks import bench_precision


def test_arms_train_the_same_run_with_their_own_numerics(tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "precision.json"
    shards = f"[{{local: {demo}/mds-v4096-s128}}]"
    rc = bench_precision.main([
        "--arms", "fp32", "bf16-residual", "--out-json", str(out),
        f"data.demo_root={demo}", f"data.tokenizer={demo}/tokenizer-v4096/tokenizer.json",
        f"data.train_streams={shards}", f"data.eval_streams={shards}", "max_duration=6ba", "eval.interval=3ba",
        "eval.subset_batches=2", "scheduler.warmup_tokens=0", "scheduler.decay_tokens=0",
        "batch.warmup_start_seqs=null", "batch.warmup_tokens=0"])
    payload = json.loads(out.read_text())
    fp32, bf16 = payload["results"]
    assert rc == 0 and (fp32["arm"], bf16["arm"]) == ("fp32", "bf16-residual"), payload["results"]
    assert fp32["seed"] == bf16["seed"] == 17, "the recipe's seed (tiny.yaml inherits RunConfig's)"
    assert (fp32["autocast_bf16"], bf16["autocast_bf16"], bf16["autocast_residual"]) == (False, True, True)
    for arm in (fp32, bf16):
        assert arm["batches"] == 6 and [e["batch"] for e in arm["evals"]] == [3, 6], arm
        assert all(math.isfinite(x) and 0 < x < 20 for x in arm["train_loss"]), arm["train_loss"]
    # Same weights and data at batch 0: the losses agree to bf16 precision but are not identical
    # (the bf16 arm really ran under autocast).
    first_fp32, first_bf16 = fp32["train_loss"][0], bf16["train_loss"][0]
    assert first_fp32 != first_bf16 and abs(first_fp32 - first_bf16) < 0.01 * first_fp32, (first_fp32, first_bf16)
    ref, other = payload["summary"]
    assert ref["final_val_loss_diff_mean"] == 0.0 and ref["final_val_loss_sd"] is None, ref
    assert other["final_val_loss_mean"] == bf16["evals"][-1]["loss"], other
    assert other["final_val_loss_diff_mean"] == bf16["evals"][-1]["loss"] - fp32["evals"][-1]["loss"], other
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(bf16["evals"], fp32["evals"]))
    assert other["max_abs_val_loss_diff"] == diff, other
    assert "| bf16-residual | 17 |" in payload["tables"][0], payload["tables"][0]


def test_summary_pairs_runs_by_seed_and_reports_the_spread_over_seeds():
    def run(arm, seed, losses):
        return {"arm": arm, "seed": seed, "evals": [{"batch": 10 * (i + 1), "loss": x} for i, x in enumerate(losses)]}

    results = [run("fp32", 1, [5.0, 4.0]), run("bf16", 1, [5.1, 4.2]),
               run("fp32", 2, [5.0, 3.0]), run("bf16", 2, [4.7, 3.1])]
    ref, bf16 = bench_precision.summarize(results)
    assert (ref["arm"], ref["seeds"], ref["final_val_loss_mean"]) == ("fp32", [1, 2], 3.5), ref
    assert abs(ref["final_val_loss_sd"] - 0.7071) < 1e-4, ref
    assert abs(bf16["final_val_loss_diff_mean"] - 0.15) < 1e-12, bf16  # (0.2 + 0.1) / 2, paired by seed
    assert abs(bf16["max_abs_val_loss_diff"] - 0.3) < 1e-12, bf16  # seed 2, first evaluation
    assert "| bf16 | 2 | 3.6500 |" in bench_precision.format_summary([ref, bf16])
