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
    assert (fp32["autocast_bf16"], bf16["autocast_bf16"], bf16["autocast_residual"]) == (False, True, True)
    for arm in (fp32, bf16):
        assert arm["batches"] == 6 and [e["batch"] for e in arm["evals"]] == [3, 6], arm
        assert all(math.isfinite(x) and 0 < x < 20 for x in arm["train_loss"]), arm["train_loss"]
    # Same weights and data at batch 0: the losses agree to bf16 precision but are not identical
    # (the bf16 arm really ran under autocast).
    first_fp32, first_bf16 = fp32["train_loss"][0], bf16["train_loss"][0]
    assert first_fp32 != first_bf16 and abs(first_fp32 - first_bf16) < 0.01 * first_fp32, (first_fp32, first_bf16)
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(bf16["evals"], fp32["evals"]))
    assert payload["differences"] == [{"arm": "bf16-residual", "vs": "fp32", "max_abs_val_loss_diff": diff}]
    assert "| bf16-residual |" in payload["table"], payload["table"]
