"""`lvr filter`: GRPO-aware data filtering (paper Sec. 3.1).

GRPO learns nothing from a question whose G rollouts all score the same: the group-normalised
advantages are all zero. So before RL the base model answers every question N times
(`filter.samples`, temperature `filter.temperature`), and each question gets a pass rate =
passes / N, a pass being an accuracy reward of 1 under the same reward functions as `lvr rl`.
Questions the model sometimes gets right and sometimes wrong (`band_low < pass rate <
band_high`, both exclusive) go to RL; the others ("too easy", "too hard") go to CoT-SFT when
they have a reasoning chain to learn from.

Top to bottom: read the questions -> per question: decode the video, encode it once (MR-SP
embedding cache, reused by the N samples and by the next questions on the same video), one
prefill, N samples decoded together -> rewards -> one line in `scores.jsonl` -> at the end,
`rl.jsonl`, `sft.jsonl`, `filter_stats.json` and `pass_rates.png` from the inputs and scores.

Resuming: `scores.jsonl` is appended one line per question, so a killed run loses at most
the question in flight; a re-run skips the questions already scored. Every question's sampling
seed is derived from `seed` and its `problem_id`, never from its position or from what ran
before, so a resumed run (or one on another number of processes) scores exactly as an
uninterrupted one.

Sharded (`data.shard = "i/N"`): the questions whose video hashes to shard i, then split over
the data-parallel ranks as usual, in `<output dir>/shard-i-of-N`; `lvr merge` joins the
shards' scores and samples and recomputes the split from them (`stages/shards.py`).

Where it departs from the paper:
- The paper samples its base model (LongVILA) 10 times per question; here any model the
  runtime loads (Qwen2.5-VL first), N from the recipe.
- "Too easy" / "too hard" items are not thrown away: those with reasoning become the SFT set
  (the paper's 36K CoT-SFT / 68K RL split comes from the same dataset); items without
  reasoning are counted as `dropped`.
- Questions are scored in order of their video's first appearance, so questions on the same
  video reuse one embedding; output files keep the input order.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path

from stages.algo.rewards import combined_reward
from stages.data.records import (RecordError, done_keys, iter_records, normalise_lvr, read_jsonl, split_problem,
                                 write_jsonl)
from stages.data.video import VideoDecodeError
from stages.mrsp.dist import Grid, broadcast_object, even_splits, gather_objects
from stages.mrsp.rollout import Sampling
from stages.mrsp.runtime import Runtime
from stages.setup import open_grid, setup
from stages.shards import Share

SCORES, SAMPLES = "scores.jsonl", "samples.jsonl"


# -- pure parts -----------------------------------------------------------------------------
def in_band(pass_rate: float, band_low: float, band_high: float) -> bool:
    """True when the question is worth RL: `band_low < pass_rate < band_high` (exclusive)."""
    return band_low < pass_rate < band_high


def split_by_band(records: list[tuple[str, dict]], scores: dict[str, dict], band_low: float,
                  band_high: float) -> tuple[list[dict], list[dict], list[dict]]:
    """Return `(rl, sft, dropped)`: the scored `(key, record)` pairs, each record plus its
    `pass_rate`, in input order. Out-of-band records go to SFT when their `reasoning` is
    non-empty, else to dropped; records without a score appear in none."""
    rl, sft, dropped = [], [], []
    for key, rec in records:
        if key not in scores:
            continue
        out = {**rec, "pass_rate": scores[key]["pass_rate"]}
        if in_band(out["pass_rate"], band_low, band_high):
            rl.append(out)
        elif str(rec.get("reasoning") or "").strip():
            sft.append(out)
        else:
            dropped.append(out)
    return rl, sft, dropped


def item_seed(seed: int, key: str) -> int:
    """The sampling seed of one question: a function of the recipe seed and its key only."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def record_key(rec: dict, lineno: int) -> str:
    pid = rec.get("problem_id", rec.get("question_id"))
    return str(pid) if pid is not None else f"line-{lineno}"


def category_of(rec: dict) -> str | None:
    return rec.get("category") or rec.get("problem_type")


def options_of(rec: dict) -> dict | None:
    if rec.get("options"):
        return rec["options"]
    return (split_problem(rec["problem"])[1] or None) if "problem" in rec else None


def score_item(responses: list[str], rec: dict) -> tuple[dict, list[dict]]:
    """Return the score line of one question and the reward parts of each response."""
    if "answer" not in rec:
        raise RecordError("missing field 'answer'")
    parts = [combined_reward(text, str(rec["answer"]), options=options_of(rec)) for text in responses]
    passes = sum(1 for p in parts if p["accuracy"] == 1.0)
    n = len(responses)
    return {"samples": n, "passes": passes, "pass_rate": passes / n,
            "mean_format": sum(p["format"] for p in parts) / n}, parts


def pass_rate_histogram(pass_rates: list[float], samples: int) -> dict[str, int]:
    """Counts of each possible pass rate k / samples, k = 0..samples (keys rounded to 4 digits)."""
    counts = Counter(round(r, 4) for r in pass_rates)
    return {f"{k / samples:.4g}": counts.get(round(k / samples, 4), 0) for k in range(samples + 1)}


def video_order(items: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """`items` grouped by video in order of each video's first appearance (stable within a video)."""
    first: dict[str, int] = {}
    for i, (_, rec) in enumerate(items):
        first.setdefault(video_name(rec), i)
    return sorted(items, key=lambda kr: first[video_name(kr[1])])


def video_name(rec: dict) -> str:
    """The question's (first) video as the record names it: the unit a shard takes whole."""
    v = rec.get("videos", rec.get("video"))
    return str(v[0] if isinstance(v, list) and v else v)


# -- the stage ------------------------------------------------------------------------------
def run(recipe, run) -> dict:
    started = time.perf_counter()
    grid = open_grid(recipe)
    spec = recipe.filter
    video_dir = recipe.data.video_dir or str(Path(recipe.data.input).parent)

    # 1. the questions (a malformed line or a duplicate key is an error, not a stop): all of
    #    them, or the videos of shard i/N (`data.shard`, stages/shards.py) before the DP split
    share = Share(recipe.data.shard)
    listed, listing_errors = read_items(recipe.data)
    if grid.is_main:
        share.note(run.path, [key for key, _ in listed])
    items = [(key, rec) for key, rec in listed if share.owns(video_name(rec))]
    errors = [(key, why) for key, why, unit in listing_errors if share.owns(unit)]

    # 2. what an earlier run of this directory finished (rank 0 reads, everyone learns)
    done = broadcast_object(_finished_keys(run) if grid.is_main else None, grid)
    todo = video_order([kr for kr in items if kr[0] not in done])

    # 3. score the rest: the DP groups take contiguous shares, in lockstep rounds, so rank 0
    #    appends every finished question as soon as its round ends
    rt = setup(recipe, grid).rt
    shares = even_splits(len(todo), grid.dp_size)
    begin = sum(shares[:grid.dp_rank])
    mine = todo[begin:begin + shares[grid.dp_rank]]
    rounds = max(shares) if shares else 0
    if grid.is_main:  # errors.jsonl holds what is failed now: a killed run's stale lines go
        run.settle_errors(done.__contains__)
    failed_items = 0
    for key, why in errors if grid.is_main else []:
        run.error(key, why)
    last_video = None
    with run.progress("filter questions", len(todo)) as bar:
        for r in range(rounds):
            payload = None
            if r < len(mine):
                key, rec = mine[r]
                payload, last_video = _score_one(rt, recipe, video_dir, key, rec, last_video)
            for result in gather_objects(payload if grid.sp_rank == 0 else None, grid):
                if result is None:
                    continue
                bar.advance()
                if "error" in result:
                    failed_items += 1
                    run.error(result["key"], result["error"])
                    continue
                for s in result["samples"]:
                    run.sample(s)
                run.append(SCORES, result["score"])

    counters = _sum_counters(rt.counters() if grid.sp_rank == 0 else None, grid)
    failed = len(errors) + failed_items
    if not grid.is_main:
        return {"failed": failed}

    # 4. the split and its statistics, from the inputs and every score (this run's and earlier)
    rows = read_jsonl(run.file(SCORES), on_error=lambda *_: None) if run.file(SCORES).exists() else []
    scores = {rec["problem_id"]: rec for rec in rows}
    # the run tried every unscored item: what is still listed and not recorded again is stale
    run.settle_errors(lambda key: key in scores, retried=lambda key: True)
    stats = write_split(run.path, items, scores, spec)
    seconds = time.perf_counter() - started
    return {
        "items": stats["items"], "scored": stats["scored"], "scored_now": len(todo) - failed_items,
        "skipped_done": len(items) - len(todo), "rl": stats["rl"], "sft": stats["sft"], "dropped": stats["dropped"],
        "failed": failed, "mean_pass_rate": stats["mean_pass_rate"], "samples_per_item": spec.samples,
        **{k: counters.get(k, 0) for k in ("vision_encodes", "embedding_cache_hits", "prefills")},
        "items_per_s": round(len(todo) / seconds, 4) if seconds > 0 else None,
        "rl_by_category": stats["rl_by_category"], "sft_by_category": stats["sft_by_category"],
    }


def read_items(data) -> tuple[list[tuple[str, dict]], list[tuple[str, str, str]]]:
    """`(items, errors)` of `data.input`'s first `data.limit` questions: items `(key, record)` in
    input order; errors `(key, reason, unit)` for a malformed line or a duplicate problem_id, the
    unit being what decides the shard that records it (the line itself; a duplicate's first
    occurrence's video, so the shard that scores a key also settles its duplicates)."""
    src = data.input
    errors: list[tuple[str, str, str]] = []
    items: list[tuple[str, dict]] = []
    seen: dict[str, tuple[int, str]] = {}
    for lineno, rec in iter_records(src, on_error=lambda line, why: errors.append((f"{src}:{line}", why,
                                                                                    f"{src}:{line}"))):
        if data.limit and len(items) >= data.limit:
            break
        try:  # as released: options inside `problem`, a tagged answer, one video path
            rec = normalise_lvr(rec)
        except RecordError as e:
            errors.append((f"{src}:{lineno}", f"{src}:{lineno}: RecordError: {e}", f"{src}:{lineno}"))
            continue
        key = record_key(rec, lineno)
        if key in seen:
            first, video = seen[key]
            errors.append((key, f"{src}:{lineno}: duplicate problem_id (first on line {first})", video))
            continue
        seen[key] = (lineno, video_name(rec))
        items.append((key, rec))
    return items, errors


def write_split(folder: Path, items, scores: dict[str, dict], spec) -> dict:
    """Write `rl.jsonl`, `sft.jsonl`, `filter_stats.json` and `pass_rates.png` into `folder` from
    the questions and their scores (a run's, or the merge of its shards'); return the stats."""
    rl, sft, dropped = split_by_band(items, scores, spec.band_low, spec.band_high)
    write_jsonl(Path(folder) / "rl.jsonl", rl)
    write_jsonl(Path(folder) / "sft.jsonl", sft)
    stats = filter_stats(items, scores, rl, sft, dropped, spec)
    (Path(folder) / "filter_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    plot_pass_rates([scores[k]["pass_rate"] for k, _ in items if k in scores], spec, Path(folder) / "pass_rates.png")
    return stats


def _score_one(rt: Runtime, recipe, video_dir: str, key: str, rec: dict, last_video: str | None):
    """One question: `(result for rank 0, the video key now in the cache)`."""
    spec = recipe.filter
    try:
        sample = rt.sample(rec, video_dir, key=key)
        if sample.video.key != last_video:  # keep one video's embedding at a time
            rt.new_step()
        sampling = Sampling(spec.temperature, 1.0, spec.max_new_tokens, seed=item_seed(recipe.seed, key))
        group = rt.generate([sample], spec.samples, sampling)[0]
        texts = [rt.response_text(r.token_ids) for r in group]
        score, parts = score_item(texts, rec)
    except (VideoDecodeError, RecordError, KeyError, ValueError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, VideoDecodeError) else str(e)
        return {"key": key, "error": reason}, last_video
    score = {"problem_id": key, "category": category_of(rec), **score}
    samples = [{"problem_id": key, "sample": j, "response": text, "tokens": len(r.token_ids),
                "finished": r.finished, "format": p["format"], "accuracy": p["accuracy"]}
               for j, (r, text, p) in enumerate(zip(group, texts, parts))]
    return {"key": key, "score": score, "samples": samples}, sample.video.key


def filter_stats(items, scores, rl, sft, dropped, spec) -> dict:
    """Counts per category for each set, the pass-rate histogram and the mean pass rate."""
    scored = [(k, r) for k, r in items if k in scores]
    rates = [scores[k]["pass_rate"] for k, _ in scored]
    by_cat: dict[str, dict] = {}
    for k, r in scored:
        c = by_cat.setdefault(str(category_of(r)), {"scored": 0, "pass_rate_sum": 0.0})
        c["scored"] += 1
        c["pass_rate_sum"] += scores[k]["pass_rate"]

    def counts(recs):
        return dict(sorted(Counter(str(category_of(r)) for r in recs).items()))

    return {
        "samples_per_item": spec.samples, "temperature": spec.temperature,
        "band": {"low": spec.band_low, "high": spec.band_high, "exclusive": True},
        "items": len(items), "scored": len(scored), "rl": len(rl), "sft": len(sft), "dropped": len(dropped),
        "mean_pass_rate": round(sum(rates) / len(rates), 6) if rates else None,
        "all_correct": sum(1 for x in rates if x == 1.0), "all_wrong": sum(1 for x in rates if x == 0.0),
        "mean_pass_rate_by_category": {c: round(v["pass_rate_sum"] / v["scored"], 6)
                                       for c, v in sorted(by_cat.items())},
        "rl_by_category": counts(rl), "sft_by_category": counts(sft), "dropped_by_category": counts(dropped),
        "pass_rate_histogram": pass_rate_histogram(rates, spec.samples),
    }


def plot_pass_rates(pass_rates: list[float], spec, out_path: Path) -> Path:
    """Bar chart of how many questions reached each pass rate on a [0, 1] axis, the RL band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = pass_rate_histogram(pass_rates, spec.samples)
    xs = [k / spec.samples for k in range(spec.samples + 1)]
    width = 0.8 / spec.samples
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    ax.axvspan(spec.band_low, spec.band_high, color="tab:green", alpha=0.12, label="RL band (exclusive)")
    colours = ["tab:green" if in_band(x, spec.band_low, spec.band_high) else "tab:grey" for x in xs]
    # the end bars (pass rate 0 and 1) drawn whole, past the ends of a [0, 1] axis: the y axis
    # moves out of their way and the layout leaves room on the right (half a bar of the ~5 inch axes)
    ax.bar(xs, list(hist.values()), width=width, color=colours, clip_on=False)
    ax.set_xlim(0, 1)
    ax.spines["left"].set_position(("outward", width / 2 * 5 * 72 + 4))
    fig.get_layout_engine().set(rect=(0, 0, 1 - width / 2 * 5 / 6, 1))
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_xticks(xs if spec.samples <= 10 else [0, 0.25, 0.5, 0.75, 1])
    ax.set_xlabel(f"pass rate (fraction of {spec.samples} samples correct)")
    ax.set_ylabel("questions")
    ax.set_title(f"GRPO-aware filtering: {len(pass_rates)} questions")
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return Path(out_path)


# -- resume and the process grid --------------------------------------------------------------
def _finished_keys(run) -> set[str]:
    """Keys in `scores.jsonl` (torn tail repaired); `samples.jsonl` is cut to those keys, so a
    question killed between its samples and its score line is sampled again exactly once."""
    done = {str(k) for k in done_keys(run.file(SCORES), "problem_id")}
    samples = run.file(SAMPLES)
    if samples.exists():
        rows = read_jsonl(samples, on_error=lambda *_: None)
        kept = [s for s in rows if str(s.get("problem_id")) in done]
        if len(kept) != len(rows) or samples.read_bytes()[-1:] not in (b"\n", b""):
            write_jsonl(samples, kept)
    return done


def _sum_counters(counters: dict | None, grid: Grid) -> dict:
    total: Counter = Counter()
    for c in gather_objects(counters, grid):
        total.update(c or {})
    return dict(total)
