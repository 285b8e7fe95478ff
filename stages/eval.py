"""`lvr eval`: multiple-choice accuracy on long videos, per category (LongVideo-Reason) or
per duration and task type (VideoMME), optionally swept over the number of frames.

Top to bottom: read the eval set (LongVideo-Reason JSONL, or the VideoMME layout as JSONL
or parquet) into `EvalItem`s -> for each frame count, the data-parallel ranks take their
share of the items in batches of `generation.batch_per_rank`, sample the video, decode one
response each (greedy by default) -> extract the chosen letter -> `predictions.jsonl`,
resumable by (key, frames) -> `results.json`, `report.md`, `accuracy_vs_frames.png`.

Choices made where the paper and the benchmarks are silent:
- The prediction is the last `<answer>` block (an unclosed last one too, as a response cut
  off by `max_new_tokens` leaves it); without one, the response with its `<think>` blocks
  removed, read as free text ("The answer is B", a lone letter, the text
  of one option). A response naming no option, or several, is wrong and counted
  (`unparsed`); it is never guessed.
- An item whose video cannot be decoded (or whose record is malformed) is written to
  `errors.jsonl`, counted in `failed` and left out of the accuracy; the run goes on. A
  video that fails at one frame count is not tried again at the others.
- Within a sequence-parallel group the items of a batch are dealt out to the ranks for
  decoding and the replies all-gathered (the video encode is sharded over the group); the
  group's first rank writes them. With several data-parallel
  ranks each writes `predictions.dp<R>.jsonl`, merged into `predictions.jsonl` at the end.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stages.algo.rewards import extract_answer, extract_choice
from stages.data.records import CATEGORIES, JsonlAppender, RecordError, iter_jsonl, normalise_lvr
from stages.data.video import VideoDecodeError

GROUP_FIELDS = ("category", "duration", "task_type", "domain")  # reported as by_<field>
DURATIONS = ("short", "medium", "long")
PREDICTIONS = "predictions.jsonl"
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_LABELLED = re.compile(r"^\s*\(?([A-Za-z])[\.\):]\s*(.*\S)?\s*$", re.DOTALL)


# -- items ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalItem:
    """One multiple-choice question on one video, whatever the source format."""

    key: str
    question: str
    options: dict[str, str]  # {"A": text, ...}
    answer: str  # the correct letter
    video: str  # path of the video file
    groups: dict[str, str] = field(default_factory=dict)  # category, or duration/domain/task_type
    format: str = "longvideo-reason"

    def record(self) -> dict:
        """The record `Runtime.sample` reads (question, options, video)."""
        return {"problem_id": self.key, "question": self.question, "options": self.options,
                "videos": [self.video]}


def detect_format(rec: dict) -> str | None:
    """`videomme` or `longvideo-reason` by the record's fields (None when it fits neither)."""
    if "videoID" in rec or ("question_id" in rec and "duration" in rec):
        return "videomme"
    if "problem" in rec or "videos" in rec:
        return "longvideo-reason"
    return None


def options_dict(options) -> dict[str, str]:
    """`{"A": text, ...}` of dict options or a list (`["A. text", ...]` or bare texts in order)."""
    if isinstance(options, dict):
        out = {str(k).strip().strip("().:[] ").upper(): str(v).strip() for k, v in options.items()}
    elif isinstance(options, (list, tuple)):
        out = {}
        for i, text in enumerate(options):
            letter, m = chr(ord("A") + i), _LABELLED.match(str(text))
            out[letter] = (m.group(2) or "").strip() if m and m.group(1).upper() == letter else str(text).strip()
    else:
        raise RecordError(f"options: expected a list or a dict, got {type(options).__name__}")
    if not out or any(len(k) != 1 or not k.isalpha() for k in out):
        raise RecordError(f"options: keys must be single letters, got {sorted(out)}")
    return out


def _answer_letter(answer, options: dict[str, str]) -> str:
    letter = extract_choice(str(answer), options)
    if letter is None:
        raise RecordError(f"answer {answer!r} does not name one of the options {', '.join(options)}")
    return letter


def lvr_item(rec: dict, video_dir: Path, fallback_key: str) -> EvalItem:
    """A LongVideo-Reason record as an item; its first video resolves against `video_dir`."""
    rec = normalise_lvr(rec)
    if not rec["options"]:
        raise RecordError("problem: no 'A. ...' option lines and no options field")
    options = options_dict(rec["options"])
    video = Path(rec["videos"][0])
    key = rec.get("problem_id")
    groups = {"category": rec["category"]} if rec.get("category") else {}
    return EvalItem(str(key) if key is not None else fallback_key, rec["question"], options,
                    _answer_letter(rec["answer"], options), str(video if video.is_absolute() else video_dir / video),
                    groups, "longvideo-reason")


def videomme_item(rec: dict, video_dir: Path, fallback_key: str) -> EvalItem:
    """A VideoMME record as an item; the video is `<video_dir>/<videoID>.mp4`."""
    for f in ("videoID", "question", "options", "answer"):
        if f not in rec or rec[f] is None:
            raise RecordError(f"missing field {f!r}")
    options = options_dict(rec["options"])
    groups = {f: str(rec[f]) for f in ("duration", "domain", "task_type") if rec.get(f) is not None}
    if groups.get("duration") not in (None, *DURATIONS):
        raise RecordError(f"duration {groups['duration']!r} is not one of {', '.join(DURATIONS)}")
    key = rec.get("question_id")
    return EvalItem(str(key) if key is not None else fallback_key, str(rec["question"]).strip(), options,
                    _answer_letter(rec["answer"], options), str(video_dir / f"{rec['videoID']}.mp4"), groups,
                    "videomme")


def read_rows(path: Path, on_error: Callable[[str, str], None]) -> list[tuple[str, dict]]:
    """`(where, record)` of a JSONL, JSON (a list) or parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}:{i}", rec) for i, rec in enumerate(pq.read_table(path).to_pylist(), 1)]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return [(f"{path}:{i}", rec) for i, rec in enumerate(data if isinstance(data, list) else [data], 1)]
    return [(f"{path}:{line}", rec) for line, rec in
            iter_jsonl(path, on_error=lambda line, why: on_error(f"{path}:{line}", why))]


def load_items(data, on_error: Callable[[str, str], None]) -> list[EvalItem]:
    """The items of `data.input` (a file or a glob) in file order, first `data.limit` records;
    bad records and duplicate keys go to `on_error(where, reason)` and are left out."""
    files = sorted(glob.glob(data.input)) if any(c in data.input for c in "*?[") else [data.input]
    if not files:
        raise FileNotFoundError(f"data.input: {data.input}: no file matches")
    rows = [row for f in files for row in read_rows(Path(f), on_error)]
    rows = rows[:data.limit] if data.limit else rows
    items, seen = [], set()
    for where, rec in rows:
        video_dir = Path(data.video_dir) if data.video_dir else Path(where.rsplit(":", 1)[0]).parent
        fmt = detect_format(rec) if data.format == "auto" else data.format
        try:
            if fmt is None:
                raise RecordError("neither a LongVideo-Reason record (problem, videos) nor a VideoMME one "
                                  "(videoID, question_id)")
            item = (videomme_item if fmt == "videomme" else lvr_item)(rec, video_dir, where)
            if item.key in seen:
                raise RecordError(f"duplicate key {item.key!r}")
        except (RecordError, KeyError, TypeError) as e:
            on_error(where, f"{type(e).__name__}: {e}")
            continue
        seen.add(item.key)
        items.append(item)
    return items


# -- answers and accuracy --------------------------------------------------------------------------
def extract_prediction(text: str, options: dict[str, str]) -> str | None:
    """The option letter a response names: from its last `<answer>` block, else from the text
    outside `<think>` blocks; None when it names none or several."""
    body = extract_answer(text)
    if body is None and "<answer>" in text:  # cut off by max_new_tokens inside the answer
        body = text.rsplit("<answer>", 1)[1]
    if body is None:
        body = _TAG_RE.sub(" ", _THINK_RE.sub(" ", text))
    return extract_choice(body, options) if body.strip() else None


def _score(correct: int, total: int) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


def _order(field_name: str, values) -> list[str]:
    known = {"category": CATEGORIES, "duration": DURATIONS}.get(field_name, ())
    return [v for v in known if v in values] + sorted(v for v in values if v not in known)


def aggregate(rows: list[dict]) -> dict[int, dict]:
    """Accuracy per frame count from prediction rows (`frames`, `correct`, `extracted`, and
    any of `GROUP_FIELDS`): `{frames: {"overall": score, "unparsed": n, "by_<field>": {value:
    score}}}`, a score being `{"correct", "total", "accuracy"}`; frame counts ascending."""
    counts: dict[int, dict] = {}
    for r in rows:
        c = counts.setdefault(int(r["frames"]), {"overall": [0, 0], "unparsed": 0, "groups": {}})
        ok = int(bool(r["correct"]))
        c["overall"][0] += ok
        c["overall"][1] += 1
        c["unparsed"] += r.get("extracted") is None
        for f in GROUP_FIELDS:
            if r.get(f) is not None:
                g = c["groups"].setdefault(f, {}).setdefault(str(r[f]), [0, 0])
                g[0] += ok
                g[1] += 1
    out = {}
    for frames in sorted(counts):
        c = counts[frames]
        res = {"overall": _score(*c["overall"]), "unparsed": c["unparsed"]}
        for f in GROUP_FIELDS:
            if f in c["groups"]:
                res[f"by_{f}"] = {v: _score(*c["groups"][f][v]) for v in _order(f, c["groups"][f])}
        out[frames] = res
    return out


def prediction_row(item: EvalItem, frames: int, text: str, finished: bool, tokens: int) -> dict:
    letter = extract_prediction(text, item.options)
    return {"key": item.key, "frames": frames, "prediction": text, "extracted": letter, "answer": item.answer,
            "correct": letter == item.answer, "finished": finished, "response_tokens": tokens, **item.groups}


# -- resume and gather -----------------------------------------------------------------------------
def prediction_files(run_path: Path) -> list[Path]:
    """`predictions.jsonl` and the per-rank parts of an unfinished multi-rank run."""
    return [p for p in [run_path / PREDICTIONS, *sorted(run_path.glob("predictions.dp*.jsonl"))] if p.exists()]


def read_predictions(run_path: Path) -> dict[tuple[str, int], dict]:
    """Rows by (key, frames), first one kept; torn or malformed lines are skipped."""
    rows = {}
    for path in prediction_files(run_path):
        for _, rec in iter_jsonl(path, on_error=lambda *_: None):
            if "key" in rec and "frames" in rec:
                rows.setdefault((str(rec["key"]), int(rec["frames"])), rec)
    return rows


def merge_predictions(run_path: Path, items: list[EvalItem], frames_list: list[int]) -> list[dict]:
    """Rewrite `predictions.jsonl` as every rank's rows, once each, in sweep and item order;
    remove the per-rank parts. Returns the rows of this eval (items x frames)."""
    found = read_predictions(run_path)
    rows = [found[(it.key, f)] for f in frames_list for it in items if (it.key, f) in found]
    parts = [p for p in prediction_files(run_path) if p.name != PREDICTIONS]
    if parts or len(found) != len(rows):
        tmp = run_path / (PREDICTIONS + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.replace(run_path / PREDICTIONS)
        for p in parts:
            p.unlink()
    return rows


# -- the stage ---------------------------------------------------------------------------------------
def run(recipe, run) -> dict:
    from stages.mrsp.dist import all_reduce_sum, barrier
    from stages.mrsp.rollout import Sampling
    from stages.setup import open_grid, setup

    grid = open_grid(recipe)
    writes = grid.sp_rank == 0  # one writer per SP group: its ranks decode the same items
    bad_records = []

    def record_error(where: str, reason: str) -> None:
        bad_records.append(where)
        if grid.is_main:
            run.error(where, reason)

    items = load_items(recipe.data, record_error)
    frames_list = list(dict.fromkeys(recipe.video.frames or [recipe.video.max_frames]))
    done = set(read_predictions(run.path))
    barrier(grid)  # every rank has read the done set before anyone appends
    mine = items[grid.dp_rank::grid.dp_size]
    todo = {f: [it for it in mine if (it.key, f) not in done] for f in frames_list}
    total = sum(len(v) for v in todo.values())

    bad_videos: set[str] = set()
    if total:
        rt = setup(recipe, grid).rt
        rt.adapter.model.eval()
        gen = recipe.generation
        sampling = Sampling(gen.temperature, 1.0, gen.max_new_tokens, seed=recipe.seed * 1_009 + grid.dp_rank)
        part = run.path / (PREDICTIONS if grid.dp_size == 1 else f"predictions.dp{grid.dp_rank}.jsonl")
        writer = JsonlAppender(part) if writes else None
        with run.progress("eval", total) as bar:
            for frames in frames_list:
                for b in range(0, len(todo[frames]), gen.batch_per_rank):
                    batch = todo[frames][b:b + gen.batch_per_rank]
                    rt.new_step()
                    samples = []
                    for it in batch:
                        if it.key in bad_videos:
                            continue
                        try:
                            samples.append((it, rt.sample(it.record(), key=it.key, max_frames=frames)))
                        except VideoDecodeError as e:
                            bad_videos.add(it.key)
                            if writes:
                                run.error(it.key, f"{type(e).__name__}: {e}", frames=frames, video=it.video)
                    groups = rt.generate([s for _, s in samples], 1, sampling) if samples else []
                    for (it, _), (r,) in zip(samples, groups):
                        text = rt.response_text(r.token_ids)
                        if writer:
                            writer.write(prediction_row(it, frames, text, r.finished, len(r.token_ids)))
                    bar.advance(len(batch))
        if writer:
            writer.close()

    failed = len(bad_records) if grid.is_main else 0
    failed = int(all_reduce_sum([failed + (len(bad_videos) if writes else 0)], grid)[0])
    barrier(grid)
    if grid.is_main:
        merge_predictions(run.path, items, frames_list)
    barrier(grid)
    rows = list(read_predictions(run.path).values())
    wanted = {(it.key, f) for it in items for f in frames_list}
    by_frames = aggregate([r for r in rows if (str(r["key"]), int(r["frames"])) in wanted])
    results = results_dict(recipe, items, frames_list, by_frames, failed)
    if grid.is_main:
        (run.file("results.json")).write_text(json.dumps(results, indent=2) + "\n")
        plot = plot_accuracy_vs_frames(by_frames, run.file("accuracy_vs_frames.png")) if len(by_frames) > 1 else None
        run.file("report.md").write_text(report_markdown(results, plot))
    return summary_dict(results)


def results_dict(recipe, items: list[EvalItem], frames_list: list[int], by_frames: dict, failed: int) -> dict:
    return {
        "model": recipe.model.path, "data": recipe.data.input,
        "formats": sorted({it.format for it in items}), "items": len(items), "failed": failed,
        "frames": sorted(frames_list), "think": recipe.prompt.think,
        "temperature": recipe.generation.temperature, "max_new_tokens": recipe.generation.max_new_tokens,
        "by_frames": {str(f): v for f, v in by_frames.items()},
    }


def summary_dict(results: dict) -> dict:
    """The stage summary: accuracy and its breakdowns at the largest frame count evaluated."""
    by = results["by_frames"]
    last = by[max(by, key=int)] if by else {"overall": _score(0, 0), "unparsed": 0}
    out = {"items": results["items"], "frames": max(map(int, by)) if by else None,
           "accuracy": last["overall"]["accuracy"], "predicted": last["overall"]["total"]}
    for f in GROUP_FIELDS:
        if f"by_{f}" in last:
            out[f"by_{f}"] = {v: (round(s["accuracy"], 4) if s["accuracy"] is not None else None)
                              for v, s in last[f"by_{f}"].items()}
    if len(by) > 1:
        out["accuracy_by_frames"] = {f: v["overall"]["accuracy"] for f, v in by.items()}
    return out | {"unparsed": last["unparsed"], "failed": results["failed"]}


# -- report -------------------------------------------------------------------------------------------
def _pct(score: dict) -> str:
    return "-" if score["accuracy"] is None else f"{100 * score['accuracy']:.1f}"


def _sweep_fields(by_frames: dict) -> list[tuple[str, list[str]]]:
    """The group fields (and their values) shown as columns of the sweep table."""
    cols = []
    for f in ("category", "duration"):
        values = {v for res in by_frames.values() for v in res.get(f"by_{f}", {})}
        if values:
            cols.append((f, _order(f, values)))
    return cols


def report_markdown(results: dict, plot: Path | None) -> str:
    by = results["by_frames"]
    lines = [f"# lvr eval: {results['model']}", "",
             f"Data: `{results['data']}` ({', '.join(results['formats']) or 'no items'}), {results['items']} items; "
             f"{'<think> prompting' if results['think'] else 'answer-only prompting'}, "
             f"{'greedy' if results['temperature'] == 0 else 'temperature ' + str(results['temperature'])} "
             f"decoding, at most {results['max_new_tokens']} new tokens.", ""]
    if results["failed"]:
        lines += [f"**{results['failed']} input(s) failed** (see `errors.jsonl`) and are not in the accuracy.", ""]
    cols = _sweep_fields(by)
    head = ["frames", "predicted", "accuracy %", "unparsed"] + [v for _, vals in cols for v in vals]
    lines += ["## Accuracy vs frames", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f, res in by.items():
        cells = [f, str(res["overall"]["total"]), _pct(res["overall"]), str(res["unparsed"])]
        cells += [_pct(res[f"by_{name}"][v]) if v in res.get(f"by_{name}", {}) else "-"
                  for name, vals in cols for v in vals]
        lines.append("| " + " | ".join(cells) + " |")
    if plot is not None:
        lines += ["", f"![accuracy vs frames]({plot.name})"]
    if by:
        top = max(by, key=int)
        res = by[top]
        for f in GROUP_FIELDS:
            if f"by_{f}" not in res:
                continue
            lines += ["", f"## By {f.replace('_', ' ')} ({top} frames)", "",
                      f"| {f} | correct | total | accuracy % |", "|---|---|---|---|"]
            lines += [f"| {v} | {s['correct']} | {s['total']} | {_pct(s)} |" for v, s in res[f"by_{f}"].items()]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_frames(by_frames: dict[int, dict], out_path: Path) -> Path:
    """Overall accuracy and its per-category (or per-duration) lines against frames (PNG)."""
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
    ax.plot(frames, [100 * (by_frames[f]["overall"]["accuracy"] or 0) for f in frames], marker="o",
            color="black", linewidth=2, label="overall")
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
