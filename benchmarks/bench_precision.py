"""Does an execution option change what the model learns? The recipe's whole run (default: the tiny
CPU demo on its built-in corpus) once per arm, same seed, same data order, same initial weights, so
the loss curves differ by numerics alone. Prints a table and writes JSON. Usage:
    python benchmarks/bench_precision.py [--arms fp32 bf16 bf16-residual] [key=value ...]

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

log = logging.getLogger(__name__)
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


def run_arm(arm: str, recipe: str, overrides: list[str], save_root: Path) -> dict[str, Any]:
    bf16, residual = ARMS[arm]
    cfg = load_run_config(recipe, ["logging.progress_bar=false", *overrides, f"run_name=precision-{arm}",
                                   f"model.autocast_residual={str(residual).lower()}",
                                   f"run_dir={save_root / arm}", f"checkpoint.save_folder={save_root / arm / 'ckpt'}",
                                   "checkpoint.autoresume=false",
                                   "checkpoint.load_path=null", "logging.wandb_mode=disabled"])
    on_gpu = resolve_device(cfg) == "gpu"
    if on_gpu:
        cfg.precision = "amp_bf16" if bf16 else "fp32"
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
    return {"arm": arm, "autocast_bf16": bf16, "autocast_residual": residual, "device": "gpu" if on_gpu else "cpu",
            "batches": len(curve.train), "seconds": elapsed, "train_loss_last50_mean": statistics.fmean(tail),
            "train_loss": curve.train, "evals": curve.evals}


def format_table(results: list[dict[str, Any]]) -> str:
    eval_batches = [e["batch"] for e in results[0]["evals"]]
    head = ["arm", "s", "train loss (last 50)"] + [f"val loss @{b}" for b in eval_batches] + ["val acc (last)"]
    rows = [head, ["---"] * len(head)]
    for r in results:
        rows.append([r["arm"], f"{r['seconds']:.0f}", f"{r['train_loss_last50_mean']:.4f}"]
                    + [f"{e['loss']:.4f}" for e in r["evals"]]
                    + [f"{r['evals'][-1]['accuracy']:.4f}" if r["evals"] else "-"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def differences(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each arm's largest |val loss difference| against the first arm, over the evaluations."""
    ref = results[0]
    return [{"arm": r["arm"], "vs": ref["arm"],
             "max_abs_val_loss_diff": max((abs(a["loss"] - b["loss"]) for a, b in zip(r["evals"], ref["evals"])),
                                          default=None)}
            for r in results[1:]]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra key=value run-config overrides (e.g. max_duration=200ba)")
    p.add_argument("--recipe", default=str(REPO_ROOT / "yamls/tiny.yaml"))
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                   help="the first one is what the others are compared with")
    p.add_argument("--out-json", type=Path, default=Path("bench_results/precision.json"))
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ["WANDB_MODE"] = "disabled"
    results = []
    with tempfile.TemporaryDirectory(prefix="precision-") as save_root:  # checkpoints, run logs
        for arm in args.arms:
            print(f"== {arm}", flush=True)
            results.append(run_arm(arm, args.recipe, args.overrides, Path(save_root)))
    table = format_table(results)
    print(table)
    diffs = differences(results)
    for d in diffs:
        print(f"{d['arm']} vs {d['vs']}: largest |val loss difference| {d['max_abs_val_loss_diff']:.4f}")
    payload = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu_threads": os.cpu_count(), "platform": platform.platform(),
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
               "recipe": args.recipe, "overrides": args.overrides, "command": [sys.executable, *sys.argv],
               "results": results, "differences": diffs, "table": table}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
