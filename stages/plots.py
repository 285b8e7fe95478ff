"""Plots of a run's metrics (PNG, matplotlib's non-interactive backend).

Axes say their unit. Accuracies (fractions in metrics.jsonl) are drawn in percent on an axis
of their own, 0-100 %, never on the reward's; legends sit below the axes, outside the data.
"""

from __future__ import annotations

import json
from pathlib import Path

# The y axis of the other keys, by what they measure (the first word of a key that names it)
AXIS_LABELS = {"loss": "loss (nats per target token)", "reward": "reward per response"}


def is_accuracy(key: str) -> bool:
    """A 0-1 accuracy (`reward/accuracy`, `eval_accuracy`, `accuracy/goal`): drawn in % on its own axis."""
    return "accuracy" in key


def read_metrics(metrics_path: Path) -> list[dict]:
    rows = []
    if Path(metrics_path).exists():
        for line in Path(metrics_path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def draw_metrics(rows: list[dict], keys: list[str], title: str):
    """The figure of `keys` against `step` (None without data): accuracies in % on a right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in rows if k in r and r[k] is not None] for k in keys}
    if not any(series.values()):
        return None
    other = [k for k in keys if series[k] and not is_accuracy(k)]
    accuracy = [k for k in keys if series[k] and is_accuracy(k)]
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    handles = []
    for k in other:
        handles += ax.plot([p[0] for p in series[k]], [p[1] for p in series[k]], marker=".", label=k)
    if other:
        ax.set_ylabel(next((v for word, v in AXIS_LABELS.items() if all(word in k for k in other)), "value"))
    if accuracy:
        acc_ax = ax.twinx() if other else ax
        colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, k in enumerate(accuracy):
            handles += acc_ax.plot([p[0] for p in series[k]], [100 * p[1] for p in series[k]], marker=".",
                                   linestyle="--", color=colours[(len(other) + i) % len(colours)], label=f"{k} (%)")
        acc_ax.set_ylabel("accuracy (%)")
        acc_ax.set_ylim(0, 100)
    ax.set_xlabel("training step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    return fig


def plot_metrics(metrics_path: Path, out_path: Path, keys: list[str], title: str) -> Path | None:
    """Plot `keys` of `metrics.jsonl` against `step`; return the PNG path (None without data)."""
    import matplotlib.pyplot as plt

    fig = draw_metrics(read_metrics(metrics_path), keys, title)
    if fig is None:
        return None
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
