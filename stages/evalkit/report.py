"""`results.json`, the flat summary and `report.md` of an eval run, from its prediction rows.

Every accuracy is a score `{"correct", "total", "accuracy", "ci95", "correct_strict",
"accuracy_strict", "ci95_strict"}`: `total` is n, the items scored; `ci95` is the 95% Wilson
interval. `accuracy` is the lenient score (what lvr reported before both were kept, so runs stay
comparable under one name); `accuracy_strict` is the official LongVideo-Reason exact match,
the one the paper's numbers use (`SCORING` says this in every results.json).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from stages.data.records import CATEGORIES
from stages.evalkit.baselines import UNPARSED, letter_baselines
from stages.evalkit.formats.videomme import DURATIONS
from stages.evalkit.items import EvalItem, GROUP_FIELDS
from stages.evalkit.provenance import run_provenance
from stages.evalkit.scoring import BLIND_FRAMES, row_correct, row_format
from stages.evalkit.stats import paired, proportion

SCORING = {
    "accuracy": "lenient: the option letter the reply names (last <answer> block, else the text outside "
                "<think>); naming none or several is wrong",
    "accuracy_strict": "strict, the official LongVideo-Reason scorer and the paper's: the first one-line "
                       "<answer> span stripped (else the whole reply) equals the gold letter exactly",
    "ci95": "95% Wilson score interval; total is n, the items scored",
    "well_formed": "share of replies the lenient parse reads a letter from",
    "format": "share of replies in <think>...</think><answer>...</answer> format (format_reward)",
}
BOOTSTRAP = {"resamples": 10_000, "seed": 0}


def order(field_name: str, values) -> list[str]:
    """Group values in the paper's order (categories, durations), others after them: numbers
    (LongVideoBench's duration groups) by value, then text sorted."""
    known = {"category": CATEGORIES, "duration": DURATIONS}.get(field_name, ())
    rest = [v for v in values if v not in known]
    numbers = sorted((v for v in rest if _number(v) is not None), key=_number)
    return [v for v in known if v in values] + numbers + sorted(v for v in rest if _number(v) is None)


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def group_fields(rows: list[dict]) -> list[str]:
    """The group fields prediction rows carry: `GROUP_FIELDS` in that order, then the others
    their `group_by` names (`[eval.fields]` groups), in order of appearance."""
    named = dict.fromkeys(f for r in rows for f in r.get("group_by", ()))
    return [f for f in GROUP_FIELDS if any(r.get(f) is not None for r in rows)] + [f for f in named
                                                                                    if f not in GROUP_FIELDS]


def score(rows: list[dict]) -> dict:
    """The lenient and strict accuracy of prediction rows, each with its Wilson interval."""
    strict = proportion(sum(row_correct(r, "strict") for r in rows), len(rows))
    return proportion(sum(row_correct(r, "lenient") for r in rows), len(rows)) | {
        "correct_strict": strict["correct"], "accuracy_strict": strict["accuracy"], "ci95_strict": strict["ci95"]}


def aggregate(rows: list[dict]) -> dict[int, dict]:
    """Per frame count (ascending), from prediction rows: `{"overall": score, "unparsed": n,
    "well_formed", "format" (proportions), "frames_sampled": {min, max, mean}, "by_<field>":
    {value: score}, "letters": letter_baselines}` (see the module docstring for a score)."""
    by_frames: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_frames[int(r["frames"])].append(r)
    out = {}
    for frames in sorted(by_frames):
        rs = by_frames[frames]
        parsed = sum(r.get("extracted") is not None for r in rs)
        res = {"overall": score(rs), "unparsed": len(rs) - parsed, "well_formed": proportion(parsed, len(rs)),
               "format": proportion(sum(row_format(r) for r in rs), len(rs))}
        sampled = [int(r["frames_sampled"]) for r in rs if r.get("frames_sampled") is not None]
        if sampled:
            res["frames_sampled"] = {"min": min(sampled), "max": max(sampled),
                                     "mean": round(sum(sampled) / len(sampled), 2)}
        for f in group_fields(rs):
            groups: dict[str, list[dict]] = defaultdict(list)
            for r in rs:
                if r.get(f) is not None:
                    groups[str(r[f])].append(r)
            if groups:
                res[f"by_{f}"] = {v: score(groups[v]) for v in order(f, groups)}
                res.setdefault("mean_over_groups", {})[f] = group_mean(res[f"by_{f}"])
        res["letters"] = letter_baselines(rs)
        out[frames] = res
    return out


def group_mean(by: dict[str, dict]) -> dict:
    """The unweighted mean of the groups' accuracies (MLVU's M-Avg over task types), lenient
    and strict, and how many groups it averages."""
    def mean(key):
        values = [s[key] for s in by.values() if s.get(key) is not None]
        return sum(values) / len(values) if values else None
    return {"accuracy": mean("accuracy"), "accuracy_strict": mean("accuracy_strict"), "groups": len(by)}


def blind_results(rows: list[dict], video_rows: list[dict], frames: int) -> dict:
    """The blind rows' aggregate on the items scored with video at `frames` (so the two are over
    the same items), with `paired`: video minus blind, lenient and strict (`stats.paired`)."""
    seen = {str(r["key"]): r for r in video_rows if int(r["frames"]) == frames}
    blind = {str(r["key"]): r for r in rows if int(r["frames"]) == BLIND_FRAMES and str(r["key"]) in seen}
    keys = [k for k in seen if k in blind]
    res = aggregate([blind[k] for k in keys]).get(BLIND_FRAMES, {"overall": score([]), "unparsed": 0})
    res["paired"] = {"frames": frames, **BOOTSTRAP} | {
        m: paired([row_correct(seen[k], m) for k in keys], [row_correct(blind[k], m) for k in keys],
                  BOOTSTRAP["resamples"], BOOTSTRAP["seed"]) for m in ("lenient", "strict")}
    return res


def results_dict(recipe, items: list[EvalItem], frames_list: list[int], rows: list[dict], failed: int) -> dict:
    """`results.json`: what was run (provenance, scoring) and the scores per frame count; with
    `eval.blind`, the blind scores next to them."""
    wanted = {(it.key, f) for it in items for f in frames_list}
    rows_now = [r for r in rows if (str(r["key"]), int(r["frames"])) in wanted]
    video_rows = [r for r in rows_now if not r.get("subtitles")]
    by_frames = aggregate(video_rows)
    prov = run_provenance(recipe)
    results = {
        "model": recipe.model.path, "model_revision": prov["model"]["revision"], "data": recipe.data.input,
        "formats": sorted({it.format for it in items}), "items": sum(not it.subtitled for it in items),
        "failed": failed,
        "frames": sorted(frames_list), "think": recipe.prompt.think,
        "temperature": recipe.generation.temperature, "max_new_tokens": recipe.generation.max_new_tokens,
        "scoring": SCORING, "provenance": prov, "by_frames": {str(f): v for f, v in by_frames.items()},
    }
    if recipe.eval.blind and by_frames:
        results["blind"] = blind_results(rows, video_rows, max(by_frames))
    subtitled = [r for r in rows_now if r.get("subtitles")]
    if subtitled:  # VideoMME's with-subtitles protocol, beside by_frames (the same items without)
        results["with_subtitles"] = {str(f): v for f, v in aggregate(subtitled).items()}
    return results


# -- the summary -------------------------------------------------------------------------------------
def ci_text(ci, digits: int = 4) -> str | None:
    """`"[lo, hi]"` of an interval (None stays None)."""
    return None if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def summary_dict(results: dict) -> dict:
    """The flat stage summary at the largest frame count: n, accuracy (lenient) and
    accuracy_strict with their `_ci95`, well-formed and format shares, the majority-letter and
    blind baselines, per group `by_<field>` (accuracy), `by_<field>_ci95`, `by_<field>_n` and
    `mean_over_<field>`, and with subtitles `accuracy_with_subtitles` (+ per duration)."""
    by = results["by_frames"]
    top = max(by, key=int) if by else None
    last = by[top] if by else {"overall": score([]), "unparsed": 0}
    o = last["overall"]
    out = {"items": results["items"], "frames": int(top) if top else None, "n": o["total"],
           "accuracy": o["accuracy"], "accuracy_ci95": ci_text(o["ci95"]),
           "accuracy_strict": o.get("accuracy_strict"), "accuracy_strict_ci95": ci_text(o.get("ci95_strict"))}
    if "well_formed" in last:
        out |= {"well_formed": last["well_formed"]["accuracy"], "format": last["format"]["accuracy"]}
    majority = last.get("letters", {}).get("majority")
    if majority:
        out |= {"majority_letter": majority["letter"], "accuracy_majority": majority["accuracy"]}
    if results.get("blind"):
        b = results["blind"]["overall"]
        out |= {"accuracy_blind": b["accuracy"], "accuracy_blind_ci95": ci_text(b["ci95"])}
    for f in _fields_of(last):
        groups = last[f"by_{f}"]
        out[f"by_{f}"] = {v: (round(s["accuracy"], 4) if s["accuracy"] is not None else None)
                          for v, s in groups.items()}
        out[f"by_{f}_ci95"] = {v: ci_text(s["ci95"]) for v, s in groups.items()}
        out[f"by_{f}_n"] = {v: s["total"] for v, s in groups.items()}
        mean = last.get("mean_over_groups", {}).get(f)
        if mean and mean["groups"] > 1 and mean["accuracy"] is not None:  # MLVU's M-Avg for question_type
            out[f"mean_over_{f}"] = round(mean["accuracy"], 4)
    subs = results.get("with_subtitles", {}).get(top) if top else None
    if subs:
        out |= {"accuracy_with_subtitles": subs["overall"]["accuracy"],
                "accuracy_with_subtitles_ci95": ci_text(subs["overall"]["ci95"])}
        if subs.get("by_duration"):
            out["by_duration_with_subtitles"] = {v: (round(s["accuracy"], 4) if s["accuracy"] is not None else None)
                                                 for v, s in subs["by_duration"].items()}
    if len(by) > 1:
        out["accuracy_by_frames"] = {f: v["overall"]["accuracy"] for f, v in by.items()}
        out["accuracy_by_frames_ci95"] = {f: ci_text(v["overall"]["ci95"]) for f, v in by.items()}
    return out | {"unparsed": last["unparsed"], "failed": results["failed"]}


# -- report.md ------------------------------------------------------------------------------------------
def _fields_of(res: dict) -> list[str]:
    """The group fields an aggregate holds a `by_<field>` table of, in its order."""
    return [k[3:] for k in res if k.startswith("by_")]


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def pct_ci(ci) -> str:
    return "-" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _sweep_fields(by_frames: dict) -> list[tuple[str, list[str]]]:
    """The group fields (and their values) shown as columns of the sweep table."""
    cols = []
    for f in ("category", "duration"):
        values = {v for res in by_frames.values() for v in res.get(f"by_{f}", {})}
        if values:
            cols.append((f, order(f, values)))
    return cols


def _provenance_lines(prov: dict | None) -> list[str]:
    if not prov:
        return []
    m, gen, video = prov["model"], prov["generation"], prov["video"]
    where = {"hub": f"hub, revision `{m['revision'] or 'not in the local cache'}`",
             "local": f"local folder `{m['name']}`", "tiny": "lvr's tiny test model"}[m["source"]]
    fps = f"at most {video['fps']} fps" if video.get("fps") else "spread uniformly"
    commit = (prov["git_commit"] or "unknown") + (" with uncommitted changes" if prov.get("git_dirty") else "")
    return [f"Model `{m['path']}` ({where}); lvr commit `{commit}`; {prov['date']}; "
            f"seed {prov['seed']}. Frames {fps}, at most {video['max_pixels']} pixels each; decoding: "
            f"temperature {gen['temperature']}, top_p {gen['top_p']}, {gen['max_new_tokens']} new tokens at most.", ""]


def _baseline_lines(results: dict, top: str) -> list[str]:
    res, blind = results["by_frames"][top], results.get("blind")
    o, letters = res["overall"], res.get("letters")
    lines = [f"## Baselines ({top} frames, the same {o['total']} items)", "",
             "| reading | accuracy % | 95% CI |", "|---|---|---|",
             f"| this model (lenient) | {pct(o['accuracy'])} | {pct_ci(o['ci95'])} |",
             f"| this model (strict, official) | {pct(o.get('accuracy_strict'))} | {pct_ci(o.get('ci95_strict'))} |"]
    if blind:
        b = blind["overall"]
        lines += [f"| blind: same model and prompt, no video (lenient) | {pct(b['accuracy'])} | {pct_ci(b['ci95'])} |",
                  f"| blind (strict, official) | {pct(b.get('accuracy_strict'))} | {pct_ci(b.get('ci95_strict'))} |"]
    if letters and letters.get("majority"):
        m = letters["majority"]
        lines.append(f"| always the majority gold letter ({m['letter']}) | {pct(m['accuracy'])} | {pct_ci(m['ci95'])} |")
        lines += [f"| always {x} | {pct(s['accuracy'])} | {pct_ci(s['ci95'])} |" for x, s in letters["always"].items()]
    if blind and blind["paired"]["lenient"]["n"]:
        p = blind["paired"]["lenient"]
        lines += ["", f"Video minus blind (lenient, {p['n']} items): {100 * p['difference']:+.1f} points, 95% CI "
                      f"{pct_ci(p['ci95'])} (paired bootstrap, {blind['paired']['resamples']:,} resamples); "
                      f"McNemar exact p = {p['mcnemar_p']:.4g} ({p['only_a']} right only with video, "
                      f"{p['only_b']} only blind)."]
    if letters:
        blind_pred = (blind or {}).get("letters", {}).get("predicted")
        head = "| letter | gold | predicted |" + (" predicted blind |" if blind_pred else "")
        lines += ["", "Answer letters:", "", head, "|---|---|---|" + ("---|" if blind_pred else "")]
        for x in [*letters["letters"], UNPARSED]:
            gold = str(letters["gold"][x]) if x in letters["gold"] else "-"
            cells = [x, gold, str(letters["predicted"].get(x, 0))]
            cells += [str(blind_pred.get(x, 0))] if blind_pred else []
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(results: dict, plot: Path | None) -> str:
    by = results["by_frames"]
    lines = [f"# lvr eval: {results['model']}", "",
             f"Data: `{results['data']}` ({', '.join(results['formats']) or 'no items'}), {results['items']} items; "
             f"{'<think> prompting' if results['think'] else 'answer-only prompting'}, "
             f"{'greedy' if results['temperature'] == 0 else 'temperature ' + str(results['temperature'])} "
             f"decoding, at most {results['max_new_tokens']} new tokens.", ""]
    lines += _provenance_lines(results.get("provenance"))
    lines += ["Scoring: **accuracy** is lenient (the option letter the reply names); **strict** is the official "
              "LongVideo-Reason scorer, an exact match of the first `<answer>` span with the gold letter, the one "
              "the paper's numbers use. Brackets are 95% Wilson score intervals; n is the number of items scored.", ""]
    if results["failed"]:
        lines += [f"**{results['failed']} input(s) failed** (see `errors.jsonl`) and are not in the accuracy.", ""]
    cols = _sweep_fields(by)
    head = ["frames", "sampled", "n", "accuracy %", "95% CI", "strict %", "strict 95% CI", "well-formed %",
            "format %", "unparsed"] + [v for _, vals in cols for v in vals]
    lines += ["## Accuracy vs frames", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, res in by.items():
        o, s = res["overall"], res.get("frames_sampled")
        sampled = "-" if not s else str(s["min"]) if s["min"] == s["max"] else f"{s['min']}-{s['max']}"
        cells = [f, sampled, str(o["total"]), pct(o["accuracy"]), pct_ci(o["ci95"]), pct(o.get("accuracy_strict")),
                 pct_ci(o.get("ci95_strict")), pct(res.get("well_formed", {}).get("accuracy")),
                 pct(res.get("format", {}).get("accuracy")), str(res["unparsed"])]
        cells += [pct(res[f"by_{name}"][v]["accuracy"]) if v in res.get(f"by_{name}", {}) else "-"
                  for name, vals in cols for v in vals]
        lines.append("| " + " | ".join(cells) + " |")
    if plot is not None:
        lines += ["", f"![accuracy vs frames]({plot.name})"]
    if by:
        top = max(by, key=int)
        lines += [""] + _baseline_lines(results, top)
        for f in _fields_of(by[top]):
            lines += ["", f"## By {f.replace('_', ' ')} ({top} frames)", "",
                      f"| {f} | correct | total | accuracy % | 95% CI | strict % | strict 95% CI |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {v} | {s['correct']} | {s['total']} | {pct(s['accuracy'])} | {pct_ci(s['ci95'])} | "
                      f"{pct(s.get('accuracy_strict'))} | {pct_ci(s.get('ci95_strict'))} |"
                      for v, s in by[top][f"by_{f}"].items()]
            mean = by[top].get("mean_over_groups", {}).get(f)
            if mean and mean["groups"] > 1:
                lines.append(f"| mean of the {mean['groups']} groups | | | {pct(mean['accuracy'])} | | "
                             f"{pct(mean['accuracy_strict'])} | |")
        lines += _subtitle_lines(results, top)
    return "\n".join(lines) + "\n"


def _subtitle_lines(results: dict, top: str) -> list[str]:
    """VideoMME without and with subtitles at `top` frames, overall and per duration."""
    subs = results.get("with_subtitles", {}).get(top)
    if not subs:
        return []
    plain = results["by_frames"][top]
    lines = ["", f"## Without and with subtitles ({top} frames)", "",
             "The same items asked twice: with the video only, and with the subtitle lines on screen at the "
             "sampled frames before the question (VideoMME's w_subtitle protocol).", "",
             "| group | n | without % | 95% CI | with % | 95% CI |", "|---|---|---|---|---|---|"]
    pairs = [("overall", plain["overall"], subs["overall"])]
    pairs += [(f"duration {v}", plain.get("by_duration", {}).get(v), s) for v, s in subs.get("by_duration", {}).items()]
    for name, a, b in pairs:
        a = a or {"accuracy": None, "ci95": None}
        lines.append(f"| {name} | {b['total']} | {pct(a['accuracy'])} | {pct_ci(a['ci95'])} | {pct(b['accuracy'])} | "
                     f"{pct_ci(b['ci95'])} |")
    return lines


def plot_accuracy_vs_frames(by_frames: dict[int, dict], out_path: Path) -> Path:
    """Overall accuracy with its 95% interval, and its per-category (or per-duration) lines,
    against frames (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = sorted(by_frames)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, vals in _sweep_fields({str(f): v for f, v in by_frames.items()})[:1]:
        for v in vals:
            pts = [(f, by_frames[f][f"by_{name}"][v]["accuracy"]) for f in frames
                   if v in by_frames[f].get(f"by_{name}", {})]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=".", alpha=0.7, label=v)
    acc = [100 * (by_frames[f]["overall"]["accuracy"] or 0) for f in frames]
    cis = [by_frames[f]["overall"].get("ci95") or [0, 0] for f in frames]
    err = [[a - 100 * c[0] for a, c in zip(acc, cis)], [100 * c[1] - a for a, c in zip(acc, cis)]]
    ax.errorbar(frames, acc, yerr=err, marker="o", color="black", linewidth=2, capsize=3, label="overall (95% CI)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(frames, [str(f) for f in frames])
    ax.set_xlabel("frames")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy vs frames")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)
