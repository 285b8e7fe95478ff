"""Plots of a run's metrics (PNG, matplotlib's non-interactive backend)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, out_path: Path, keys: list[str], title: str) -> Path | None:
    """Plot `keys` of `metrics.jsonl` against `step`; return the PNG path (None without data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    if Path(metrics_path).exists():
        for line in Path(metrics_path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    series = {k: [(r["step"], r[k]) for r in rows if k in r and r[k] is not None] for k in keys}
    if not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=k)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


# The curves `lvr sft` and `lvr rl` draw at the end of a run: stage -> (PNG name, keys, title).
CURVES = {
    "sft": ("loss.png", ["loss", "eval_loss"], "CoT-SFT loss"),
    "rl": ("rewards.png", ["reward/total", "reward/accuracy", "reward/format", "eval_accuracy"], "GRPO rewards"),
}


def plot_run(run_dir: Path) -> Path:
    """Re-draw a training run's curves PNG from its metrics.jsonl; `ValueError` when it cannot."""
    run_dir = Path(run_dir)
    try:
        stage = json.loads((run_dir / "recipe.json").read_text())["stage"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"{run_dir}: no readable recipe.json (not an lvr run directory)") from None
    if stage not in CURVES:
        raise ValueError(f"{run_dir}: {stage} runs have no metric curves (only {' and '.join(CURVES)} runs do)")
    name, keys, title = CURVES[stage]
    out = plot_metrics(run_dir / "metrics.jsonl", run_dir / name, keys, title)
    if out is None:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no values of {', '.join(keys)} to plot")
    return out
