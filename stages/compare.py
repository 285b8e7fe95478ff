"""`lvr compare RUN_DIR...`: finished eval runs side by side, and whether their differences are real.

For each run, overall and per group (category, duration, ...): the accuracy with its 95% Wilson
interval and n (`compare.md`, `compare.png` with interval whiskers, `compare.json`). Every run
after the first is compared with the first on the same items: the paired difference with a 95%
paired-bootstrap interval (`BOOTSTRAP`: 10,000 resamples, fixed seed, so the same runs give the
same interval) and McNemar's exact p-value on the items only one of the two got right.

Runs must hold the same (key, frames) predictions, or the comparison is refused: a difference
between runs on different items mixes the items' difficulty into the models'. Blind rows
(`eval.blind`, frames 0) are not matched; a run's blind accuracy is shown beside its others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from stages.data.records import iter_jsonl
from stages.evalkit.report import BOOTSTRAP, group_fields, order, pct, pct_ci, score
from stages.evalkit.scoring import BLIND_FRAMES, row_correct
from stages.evalkit.stats import paired

SCORINGS = ("lenient", "strict")


class CompareError(ValueError):
    """Runs that cannot be compared (not eval runs, too few, different items): one line."""


@dataclass
class EvalRun:
    name: str
    path: Path
    results: dict
    rows: dict[tuple[str, int], dict]  # (key, frames) -> prediction row, blind rows left out
    blind: dict[str, dict]  # key -> blind prediction row

    def at(self, frames: int) -> list[dict]:
        return [r for (_, f), r in self.rows.items() if f == frames]


def load_run(path: Path, name: str) -> EvalRun:
    """A finished eval run: its results.json and predictions.jsonl (first row per (key, frames))."""
    path = Path(path)
    if not (path / "results.json").is_file() or not (path / "predictions.jsonl").is_file():
        raise CompareError(f"{path}: not a finished eval run (needs results.json and predictions.jsonl)")
    rows, blind = {}, {}
    for _, r in iter_jsonl(path / "predictions.jsonl", on_error=lambda *_: None):
        if int(r["frames"]) == BLIND_FRAMES:
            blind.setdefault(str(r["key"]), r)
        elif not r.get("subtitles"):  # VideoMME's with-subtitles readings: compared on the plain protocol
            rows.setdefault((str(r["key"]), int(r["frames"])), r)
    return EvalRun(name, path, json.loads((path / "results.json").read_text()), rows, blind)


def run_names(paths: list[Path]) -> list[str]:
    """Short unique names: each folder's name, with its parent's where two share one."""
    names = [Path(p).resolve().name for p in paths]
    return [f"{Path(p).resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def check_same_items(runs: list[EvalRun]) -> None:
    """Raise `CompareError` naming the runs when one holds (key, frames) pairs another does not."""
    base = runs[0]
    for other in runs[1:]:
        only_base, only_other = sorted(set(base.rows) - set(other.rows)), sorted(set(other.rows) - set(base.rows))
        if only_base or only_other:
            eg = (only_base or only_other)[0]
            raise CompareError(f"runs {base.name} and {other.name} were not evaluated on the same items: "
                               f"{len(only_base)} (key, frames) only in {base.name}, {len(only_other)} only in "
                               f"{other.name} (e.g. {eg[0]!r} at {eg[1]} frames)")


def _groups(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """`{field: {value: rows}}` for the group fields the rows carry, values in report order."""
    out = {}
    for f in group_fields(rows):
        values: dict[str, list[dict]] = {}
        for r in rows:
            if r.get(f) is not None:
                values.setdefault(str(r[f]), []).append(r)
        if values:
            out[f] = {v: values[v] for v in order(f, values)}
    return out


def _paired_rows(a: list[dict], b: list[dict], scoring: str) -> dict:
    by_key = {str(r["key"]): r for r in b}
    keys = [str(r["key"]) for r in a]
    return paired([row_correct(r, scoring) for r in a], [row_correct(by_key[k], scoring) for k in keys],
                  BOOTSTRAP["resamples"], BOOTSTRAP["seed"])


def compare_runs(run_dirs: list[Path], out_dir: Path | None = None, scoring: str = "lenient") -> dict:
    """Compare finished eval runs (see the module docstring); write `compare.md`, `compare.png`
    and `compare.json` into `out_dir` (default `runs/compare/<A>-vs-<B>...`) and return the
    comparison with `markdown` and `plot`, the paths written."""
    if scoring not in SCORINGS:
        raise CompareError(f"--scoring {scoring!r}: expected one of {', '.join(SCORINGS)}")
    if len(run_dirs) < 2:
        raise CompareError("lvr compare: give two or more eval run directories")
    runs = [load_run(p, n) for p, n in zip(run_dirs, run_names(run_dirs))]
    check_same_items(runs)
    frames = sorted({f for _, f in runs[0].rows})
    if not frames:
        raise CompareError(f"{runs[0].path}: no predictions to compare")
    top = frames[-1]
    out = {"scoring": scoring, "frames": frames, "top_frames": top, "bootstrap": BOOTSTRAP, "runs": []}
    for run in runs:
        rows = run.at(top)
        keys = {str(r["key"]) for r in rows}
        entry = {"name": run.name, "path": str(run.path), "provenance": run.results.get("provenance"),
                 "by_frames": {str(f): score(run.at(f)) for f in frames},
                 "groups": {f: {v: score(rs) for v, rs in vals.items()} for f, vals in _groups(rows).items()}}
        blind = [r for k, r in run.blind.items() if k in keys]
        if blind:
            entry["blind"] = score(blind)
        out["runs"].append(entry)
    base = runs[0]
    out["paired"] = []
    for run in runs[1:]:
        pair = {"run": run.name, "against": base.name,
                "by_frames": {str(f): {m: _paired_rows(run.at(f), base.at(f), m) for m in SCORINGS} for f in frames},
                "groups": {f: {v: _paired_rows(rs, base.at(top), scoring) for v, rs in vals.items()}
                           for f, vals in _groups(run.at(top)).items()}}
        out["paired"].append(pair)
    folder = Path(out_dir) if out_dir else Path("runs") / "compare" / "-vs-".join(
        re.sub(r"[^\w.-]+", "_", r.name) for r in runs)
    folder.mkdir(parents=True, exist_ok=True)
    out["plot"] = str(plot_compare(out, folder / "compare.png"))
    out["markdown"] = str(folder / "compare.md")
    (folder / "compare.md").write_text(compare_markdown(out))
    (folder / "compare.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


# -- the table and the chart ---------------------------------------------------------------------------
def _cell(s: dict, key: str = "accuracy", ci: str = "ci95") -> str:
    return "-" if s.get(key) is None else f"{pct(s[key])} {pct_ci(s[ci])}"


def _points(p: dict) -> tuple[str, str]:
    return f"{100 * p['difference']:+.1f}", pct_ci(p["ci95"])


def compare_markdown(cmp: dict) -> str:
    runs, top, mode = cmp["runs"], cmp["top_frames"], cmp["scoring"]
    acc, ci = ("accuracy", "ci95") if mode == "lenient" else ("accuracy_strict", "ci95_strict")
    names = [r["name"] for r in runs]
    lines = ["# lvr compare", "", "Accuracy % with its 95% Wilson interval; n items per cell. Strict is the official "
             "LongVideo-Reason exact match (the paper's); lenient is lvr eval's `accuracy`.", "",
             "| run | model | revision | lvr commit | date | path |", "|---|---|---|---|---|---|"]
    for r in runs:
        p = r["provenance"] or {}
        m = p.get("model") or {}
        lines.append(f"| {r['name']} | {m.get('name', '-')} | {m.get('revision') or '-'} | "
                     f"{(p.get('git_commit') or '-')[:10]} | {p.get('date', '-')} | `{r['path']}` |")
    head = "| frames | n | " + " | ".join(names) + " |"
    sep = "|---|---|" + "---|" * len(names)
    for label, key, cikey in (("lenient", "accuracy", "ci95"), ("strict, official", "accuracy_strict", "ci95_strict")):
        lines += ["", f"## Overall ({label})", "", head, sep]
        for f in map(str, cmp["frames"]):
            lines.append(f"| {f} | {runs[0]['by_frames'][f]['total']} | "
                         + " | ".join(_cell(r["by_frames"][f], key, cikey) for r in runs) + " |")
        if any("blind" in r for r in runs):
            lines.append("| blind (no video) | - | " + " | ".join(_cell(r["blind"], key, cikey) if "blind" in r
                                                                  else "-" for r in runs) + " |")
    for field, vals in runs[0]["groups"].items():
        lines += ["", f"## By {field.replace('_', ' ')} ({mode}, {top} frames)", "",
                  f"| {field} | n | " + " | ".join(names) + " |", sep]
        for v, s in vals.items():
            lines.append(f"| {v} | {s['total']} | " + " | ".join(_cell(r["groups"][field][v], acc, ci) for r in runs)
                         + " |")
    for pair in cmp["paired"]:
        lines += ["", f"## {pair['run']} minus {pair['against']} (paired, the same items)", "",
                  "| frames | scoring | group | n | difference (points) | 95% CI | right only in "
                  f"{pair['run']} | right only in {pair['against']} | McNemar p |", "|---|---|---|---|---|---|---|---|---|"]
        rows = [(f, m, "overall", pair["by_frames"][f][m]) for f in map(str, cmp["frames"]) for m in SCORINGS]
        rows += [(str(top), mode, f"{field}: {v}", p) for field, vals in pair["groups"].items() for v, p in vals.items()]
        for f, m, group, p in rows:
            d, dci = _points(p)
            lines.append(f"| {f} | {m} | {group} | {p['n']} | {d} | {dci} | {p['only_a']} | {p['only_b']} | "
                         f"{p['mcnemar_p']:.4g} |")
    lines += ["", f"Paired bootstrap: {cmp['bootstrap']['resamples']:,} resamples of the items, seed "
                  f"{cmp['bootstrap']['seed']}; McNemar: exact two-sided binomial test on the discordant items.",
              "", "![accuracy per run](compare.png)"]
    return "\n".join(lines) + "\n"


def plot_compare(cmp: dict, out_path: Path) -> Path:
    """Grouped bars: overall and the first group field's values at the top frame count, one bar per
    run, with 95% Wilson interval whiskers (the selected scoring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs, top = cmp["runs"], str(cmp["top_frames"])
    acc, ci = ("accuracy", "ci95") if cmp["scoring"] == "lenient" else ("accuracy_strict", "ci95_strict")
    field = next(iter(runs[0]["groups"]), None)
    labels = ["overall"] + (list(runs[0]["groups"][field]) if field else [])
    x, width = np.arange(len(labels)), 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) * max(1, len(runs) / 2)), 3.8))
    for i, r in enumerate(runs):
        scores = [r["by_frames"][top]] + [r["groups"][field][v] for v in labels[1:]]
        vals = [100 * (s[acc] or 0) for s in scores]
        lo = [v - 100 * (s[ci] or [0, 0])[0] for v, s in zip(vals, scores)]
        hi = [100 * (s[ci] or [0, 0])[1] - v for v, s in zip(vals, scores)]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=r["name"])
    ax.set_xticks(x, labels)
    ax.set_ylabel(f"accuracy % ({cmp['scoring']})")
    ax.set_ylim(0, 100)
    ax.set_title(f"{top} frames, 95% Wilson intervals")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
