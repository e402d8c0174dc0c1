"""Loss curves from a run's metrics.jsonl (written by `MetricsFileLogger`) as a PNG."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

TRAIN_LOSS_KEY = "loss/train/total"


def _is_eval_loss(key: str) -> bool:
    return key.startswith("loss/eval") or (key.startswith("metrics/eval/") and "CrossEntropy" in key)


def _read_records(metrics_jsonl: Path) -> list[dict]:
    records = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # A run killed mid-write leaves a torn last line; the rest is still worth plotting.
                log.warning("%s:%d: skipping a line that is not JSON", metrics_jsonl, line_no)
    return records


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curve(metrics_jsonl: Path, out_png: Path, *, train_key: str = TRAIN_LOSS_KEY,
                    eval_keys: Optional[Sequence[str]] = None) -> Path:
    """Train loss (raw and smoothed) and eval losses against tokens seen; returns `out_png`.

    `eval_keys` defaults to every `loss/eval*` and `metrics/eval/*CrossEntropy*` key present.
    The x axis is tokens, or batches when the run did not count tokens.
    """
    import matplotlib

    matplotlib.use("Agg")  # set here, not at import, so importing this module changes nothing
    import matplotlib.pyplot as plt

    records = _read_records(Path(metrics_jsonl))
    use_tokens = any(r.get("tokens") for r in records)
    x_key = "tokens" if use_tokens else "batch"

    def series(key: str) -> tuple[list[float], list[float]]:
        # After a resume the file repeats the steps past the last checkpoint: the later line wins.
        by_x = {r[x_key]: r[key] for r in records
                if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}
        xs = sorted(by_x)
        return xs, [by_x[x] for x in xs]

    if eval_keys is None:
        eval_keys = sorted({k for r in records for k in r if _is_eval_loss(k)})

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    xs, ys = series(train_key)
    if xs:
        window = max(1, len(ys) // 50)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=0.8,
                label=f"train ({train_key})")
        if window > 1:
            ax.plot(xs, _moving_average(ys, window), color="tab:blue", linewidth=1.8,
                    label=f"train, mean of {window}")
    for key, color in zip(eval_keys, ("tab:orange", "tab:green", "tab:red", "tab:purple")):
        ex, ey = series(key)
        if ex:
            ax.plot(ex, ey, "o-", color=color, markersize=3, label=f"eval ({key})")
    if not ax.lines:
        log.warning("%s has no %s or eval loss values; the plot is empty", metrics_jsonl, train_key)
    ax.set_xlabel("tokens seen" if use_tokens else "batches")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_jsonl).parent.name or str(metrics_jsonl))
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
