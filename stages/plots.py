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
