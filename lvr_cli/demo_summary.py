"""Print the demo's end-of-run table from the summaries its stages wrote (`make demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = [("synth", "data"), ("filter", "filter"), ("sft", "sft"), ("eval", "eval_sft"), ("rl", "rl"),
          ("eval", "eval")]
KEYS = {"synth": ["seconds"], "filter": ["items", "rl", "sft", "mean_pass_rate", "seconds"],
        "sft": ["steps", "loss_first", "loss_last", "eval_loss_last", "seconds"],
        "rl": ["steps", "accuracy_first_half", "accuracy_second_half", "eval_accuracy_last", "seconds"],
        "eval": ["items", "accuracy", "by_category", "unparsed", "seconds"]}


def main(root: str = "runs/demo") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lvr demo: {root}")
    table.add_column("stage")
    table.add_column("results")
    for stage, folder in STAGES:
        path = Path(root) / folder / "summary.json"
        if not path.exists():
            table.add_row(f"{stage} ({folder})", "[red]not run[/]")
            continue
        s = json.loads(path.read_text())
        vals = [f"{k}={s[k]:.4g}" if isinstance(s.get(k), float) else f"{k}={s.get(k)}" for k in KEYS[stage] if k in s]
        table.add_row(f"{stage} ({folder})", ", ".join(vals))
    Console().print(table)


if __name__ == "__main__":
    main(*sys.argv[1:])
