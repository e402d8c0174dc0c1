"""Does an execution option change what the model learns? The recipe's whole run (default: the tiny
CPU demo on its built-in corpus) once per arm and seed; arms with the same seed see the same data in
the same order from the same initial weights, so their loss curves differ by numerics alone, and
the spread over seeds says how large a difference has to be to mean anything. Prints tables and
writes JSON. Usage:
    python benchmarks/bench_precision.py [--arms fp32 bf16 bf16-residual] [--seeds 1 2 3] [key=value ...]

Arms: `fp32` (no autocast: the demo as `train.py` runs it on the CPU), `bf16` (bf16 autocast around
the model's forward, fp32 residual stream: ModernBERT's amp_bf16 numerics), `bf16-residual` (the
same with model.autocast_residual=true). Composer refuses amp_bf16 on the CPU, so on the CPU this
script enters torch.autocast itself, around the inner model's forward (training and eval alike); on
a GPU the arms set precision=amp_bf16 and Composer does it.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from modernbert_train.train.builder import build_trainer, fit, resolve_device
from modernbert_train.train.config import load_run_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# arm -> (autocast to bf16?, model.autocast_residual)
ARMS = {"fp32": (False, False), "bf16": (True, False), "bf16-residual": (True, True)}


class LossCurve(Callback):
    """Each batch's training loss and each evaluation's masked-token loss and accuracy."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.evals: list[dict[str, Any]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.train.append(float(state.loss))

    def eval_end(self, state: State, logger: Logger) -> None:
        metrics = state.eval_metrics["val"]
        self.evals.append({"batch": int(state.timestamp.batch),
                           "loss": float(metrics["MaskedTokenLoss"].compute()),
                           "accuracy": float(metrics["MaskedTokenAccuracy"].compute())})


def autocast_forward(module: torch.nn.Module, device_type: str) -> None:
    """module.forward under bf16 autocast from now on (this instance only)."""
    forward = module.forward

    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    module.forward = wrapped


def run_arm(arm: str, seed: Optional[int], recipe: str, overrides: list[str], save_root: Path) -> dict[str, Any]:
    """One whole run of the recipe in one arm; `seed` None: the recipe's."""
    bf16, residual = ARMS[arm]
    name = f"{arm}-seed{seed}"
    # precision: Composer's amp_bf16 on a GPU; on the CPU build_trainer falls back to fp32, and the
    # bf16 arms enter autocast themselves below.
    cfg = load_run_config(recipe, ["logging.progress_bar=false", *overrides, f"run_name=precision-{name}",
                                   *([f"seed={seed}"] if seed is not None else []),
                                   f"precision={'amp_bf16' if bf16 else 'fp32'}",
                                   f"model.autocast_residual={str(residual).lower()}",
                                   f"run_dir={save_root / name}", f"checkpoint.save_folder={save_root / name / 'ckpt'}",
                                   "checkpoint.autoresume=false",
                                   "checkpoint.load_path=null", "logging.wandb_mode=disabled"])
    on_gpu = resolve_device(cfg) == "gpu"
    trainer = build_trainer(cfg)
    if bf16 and not on_gpu:
        autocast_forward(trainer.state.model.model, "cpu")
    curve = LossCurve()
    trainer.state.callbacks.append(curve)
    start = time.perf_counter()
    fit(trainer, cfg)
    elapsed = time.perf_counter() - start
    trainer.close()
    tail = curve.train[-50:]
    return {"arm": arm, "seed": cfg.seed, "autocast_bf16": bf16, "autocast_residual": residual,
            "device": "gpu" if on_gpu else "cpu", "batches": len(curve.train), "seconds": elapsed,
            "train_loss_last50_mean": statistics.fmean(tail), "train_loss": curve.train, "evals": curve.evals}


def _markdown(rows: list[list[str]]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], ["---"] * len(rows[0]), *rows[1:]])


def format_runs(results: list[dict[str, Any]]) -> str:
    eval_batches = [e["batch"] for e in results[0]["evals"]]
    rows = [["arm", "seed", "s", "train loss (last 50)"] + [f"val loss @{b}" for b in eval_batches]
            + ["val acc (last)"]]
    for r in results:
        rows.append([r["arm"], str(r["seed"]), f"{r['seconds']:.0f}", f"{r['train_loss_last50_mean']:.4f}"]
                    + [f"{e['loss']:.4f}" for e in r["evals"]]
                    + [f"{r['evals'][-1]['accuracy']:.4f}" if r["evals"] else "-"])
    return _markdown(rows)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm over its seeds: the last evaluation's loss (mean, sample sd), and against the first
    arm with the same seed (paired: same data and initial weights) the mean difference of that loss
    and the largest |difference| at any evaluation. The seeds' spread is what a difference must beat."""
    ref_arm = results[0]["arm"]
    ref = {r["seed"]: r for r in results if r["arm"] == ref_arm}
    summary = []
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == arm]
        final = [r["evals"][-1]["loss"] for r in runs if r["evals"]]
        paired = [(r, ref[r["seed"]]) for r in runs if r["seed"] in ref and r["evals"]]
        summary.append({
            "arm": arm, "seeds": [r["seed"] for r in runs],
            "final_val_loss_mean": statistics.fmean(final) if final else None,
            "final_val_loss_sd": statistics.stdev(final) if len(final) > 1 else None,
            "vs": ref_arm,
            "final_val_loss_diff_mean": (statistics.fmean(r["evals"][-1]["loss"] - b["evals"][-1]["loss"]
                                                          for r, b in paired) if paired else None),
            "max_abs_val_loss_diff": max((abs(x["loss"] - y["loss"]) for r, b in paired
                                          for x, y in zip(r["evals"], b["evals"])), default=None)})
    return summary


def format_summary(summary: list[dict[str, Any]]) -> str:
    def num(value: Optional[float], spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    rows = [["arm", "seeds", "final val loss mean", "sd over seeds", "paired diff vs " + summary[0]["vs"],
             "max abs diff (any eval)"]]
    for s in summary:
        rows.append([s["arm"], str(len(s["seeds"])), num(s["final_val_loss_mean"]), num(s["final_val_loss_sd"]),
                     num(s["final_val_loss_diff_mean"], "+.4f"), num(s["max_abs_val_loss_diff"])])
    return _markdown(rows)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra key=value run-config overrides (e.g. max_duration=200ba)")
    p.add_argument("--recipe", default=str(REPO_ROOT / "yamls/tiny.yaml"))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                   help="the first one is what the others are compared with")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="run every arm once per seed (default: once, with the recipe's seed)")
    p.add_argument("--out-json", type=Path, default=Path("bench_results/precision.json"))
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["WANDB_MODE"] = "disabled"
    results = []
    with tempfile.TemporaryDirectory(prefix="precision-") as save_root:  # checkpoints, run logs
        for seed in args.seeds or [None]:
            for arm in args.arms:
                print(f"== {arm}, seed {seed if seed is not None else 'of the recipe'}", flush=True)
                results.append(run_arm(arm, seed, args.recipe, args.overrides, Path(save_root)))
    summary = summarize(results)
    tables = [format_runs(results), format_summary(summary)]
    print(*tables, sep="\n\n")
    payload = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu_threads": os.cpu_count(), "platform": platform.platform(),
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
               "recipe": args.recipe, "overrides": args.overrides, "command": [sys.executable, *sys.argv],
               "results": results, "summary": summary, "tables": tables}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
