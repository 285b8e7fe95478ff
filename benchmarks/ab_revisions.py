"""`lvr bench-mrsp` on two revisions of lvr, alternated on one machine: how much faster a change made a mode.

`lvr bench-mrsp` compares modes within one checkout; a speed change needs the same mode
before and after it. This script checks `--base` (any git revision) out into a temporary
worktree and runs the same bench recipe there and in this working tree, alternating
(base, head, head, base, ...) so that a slow spell of a shared machine, or a drift, falls
on both sides. Both runs use this Python and its installed packages; only lvr's own code
differs. Per mode it prints the median s/step of each side over the rounds, the ratio
base / head, and the largest difference in the first-step loss and log-prob between the
two sides (each bench computes them from the same initial weights and rollouts: a
difference beyond 1e-4 means the two revisions compute something else, and fails the run).

    python benchmarks/ab_revisions.py --base 37dab98 --rounds 3 --out benchmarks/ab-issue15 -- \\
        recipes/demo/bench.toml "bench.frames=[512]" "bench.modes=['mrsp-shared']" bench.steps=5

Arguments after `--` are the recipe (a path that exists in both revisions) and overrides
both sides accept; `--head-only` adds overrides for this tree alone (a mode the base does
not know). Writes `OUT.json` (every run's cells) and `OUT.md` (the summary table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HEAD = Path(__file__).resolve().parent.parent


def git(*args: str, cwd: Path = HEAD) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def bench(root: Path, work: Path, tag: str, args: list[str]) -> tuple[list[dict], str]:
    """Run `lvr bench-mrsp` from the checkout at `root`; return its result cells and machine line."""
    out = work / tag
    cmd = [sys.executable, "-m", "lvr_cli.main", "bench-mrsp", *args, "output.overwrite=true",
           f"output.dir={out}/run", f"bench.out_dir={out}", "bench.name=ab"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ab_revisions: {tag} failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    report = json.loads((out / "ab.json").read_text())
    # older revisions gave the response length once, for the whole run
    return [{"response_tokens": report.get("response_tokens"), **c} for c in report["results"]], report["machine"]


def summarize(runs: list[dict], base: str, head: str) -> tuple[list[dict], str]:
    cells: dict = {}
    for r in runs:
        for c in r["results"]:
            if not c["oom"]:
                cell = cells.setdefault((c["mode"], c["frames"], c.get("response_tokens")), {})
                cell.setdefault(r["side"], []).append(c)
    rows, lines = [], [f"base {base}, head {head}; median s/step over the rounds (each run's own median step)", "",
                       "| mode | frames | response tokens | base s/step | head s/step | base / head "
                       "| runs (base, head) | first-step loss, log-prob: max diff |",
                       "|---|---:|---:|---:|---:|---:|---|---:|"]
    for (mode, frames, tokens), sides in sorted(cells.items(), key=lambda kv: (kv[0][1], str(kv[0][2]), kv[0][0])):
        med = {s: statistics.median(c["seconds_per_step"] for c in cs) for s, cs in sides.items()}
        both = [c for s in ("base", "head") for c in sides.get(s, [])]
        diff = max(max(abs(c[k] - both[0][k]) for c in both) for k in ("first_step_loss", "first_step_logp"))
        row = {"mode": mode, "frames": frames, "response_tokens": tokens, "median_s": med,
               "runs_s": {s: [round(c["seconds_per_step"], 3) for c in cs] for s, cs in sides.items()},
               "base_over_head": med["base"] / med["head"] if len(med) == 2 else None, "first_step_max_diff": diff}
        rows.append(row)
        ratio = f"{row['base_over_head']:.2f}x" if row["base_over_head"] else ""
        runs_text = ", ".join(" / ".join(f"{x:.2f}" for x in row["runs_s"].get(s, [])) or "-" for s in ("base", "head"))
        base_s, head_s = (f"{med[s]:.2f}" if s in med else "-" for s in ("base", "head"))
        lines.append(f"| {mode} | {frames} | {tokens} | {base_s} | {head_s} | {ratio} | {runs_text} | {diff:.2g} |")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare this working tree against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--head-only", nargs="*", default=[], help="overrides for this tree's runs only")
    ap.add_argument("bench_args", nargs="+", help="after --: recipe path and overrides for both sides")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    base_rev = git("rev-parse", "--short", a.base)
    head_rev = git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no")
                                                     else "")
    runs, machine = [], ""
    with tempfile.TemporaryDirectory(prefix="lvr-ab-") as tmp:
        work, base_root = Path(tmp), Path(tmp) / "base"
        git("worktree", "add", "--detach", str(base_root), base_rev)
        try:
            for k in range(a.rounds):
                order = ("base", "head") if k % 2 == 0 else ("head", "base")
                for side in order:
                    root, extra = (base_root, []) if side == "base" else (HEAD, a.head_only)
                    results, named = bench(root, work, f"{side}-{k}", [*a.bench_args, *extra])
                    machine = named if side == "head" else machine  # older revisions name the CPU less
                    runs.append({"side": side, "round": k, "results": results})
                    times = [f"{c['mode']}@{c['frames']} {c['seconds_per_step']:.3f} s/step"
                             for c in results if not c["oom"]]
                    print(f"round {k} {side}: " + ", ".join(times), flush=True)
        finally:
            git("worktree", "remove", "--force", str(base_root))
    rows, table = summarize(runs, base_rev, head_rev)
    Path(f"{a.out}.json").write_text(json.dumps({"base": base_rev, "head": head_rev, "machine": machine,
                                                 "bench_args": a.bench_args, "head_only": a.head_only,
                                                 "rounds": a.rounds, "summary": rows, "runs": runs}, indent=1))
    command = f"Both sides: `{' '.join(a.bench_args)}`" + (f"; head only: `{' '.join(a.head_only)}`" if a.head_only
                                                            else "")
    Path(f"{a.out}.md").write_text(f"Machine: {machine}.\n\n{command}.\n\n{table}\n")
    print(table)
    worst = max((r["first_step_max_diff"] for r in rows), default=0.0)
    if worst > 1e-4:
        sys.exit(f"ab_revisions: the revisions' first-step loss or log-prob differ by {worst:.3g} (> 1e-4)")


if __name__ == "__main__":
    main()
