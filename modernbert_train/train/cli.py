"""`modernbert-train RECIPE.yaml [key=value ...]` (and `composer train.py RECIPE.yaml` for many GPUs)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from modernbert_train.train.config import ConfigError, load_run_config


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="modernbert-train",
        description="Pretrain ModernBERT with Composer. Overrides are dotted key=value pairs, e.g. "
                    "data.microbatch_seqs=48 checkpoint.save_folder=s3://bucket/run1; a list is set whole, "
                    "e.g. optimizer.betas=[0.9,0.95]")
    parser.add_argument("recipe", help="YAML recipe (see yamls/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(args.recipe, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if args.print_config:
        print(resolved)
        return 0

    from composer.utils import dist

    from modernbert_train.train.builder import build_trainer, fit
    from modernbert_train.train.checkpointing import CheckpointStorageError
    if dist.get_global_rank() == 0:
        print(f"# resolved config ({args.recipe})\n{resolved}", flush=True)
    try:
        trainer = build_trainer(cfg)
    except (ValueError, CheckpointStorageError) as e:  # found while building: one message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    trained = fit(trainer, cfg)
    trainer.close()
    if not trained and dist.get_global_rank() == 0:
        print(f"run {cfg.run_name} is already complete ({cfg.max_duration}); nothing to do")
    if dist.get_global_rank() == 0 and cfg.logging.metrics_file:
        from modernbert_train.train.plotting import plot_loss_curve
        metrics = Path(cfg.run_dir) / "metrics.jsonl"
        if metrics.exists():
            png = plot_loss_curve(metrics, Path(cfg.run_dir) / "loss_curve.png",
                                  eval_keys=["metrics/val/MaskedTokenLoss"])
            print(f"loss curve: {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
