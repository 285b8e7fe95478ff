"""`lvr eval`: multiple-choice accuracy on long videos, per each benchmark's own groups
(LongVideo-Reason: category; VideoMME: duration, task type, without and with subtitles;
LongVideoBench: duration group, question category; MLVU: task type), optionally swept over
the number of frames.

Top to bottom: read the eval set as its benchmark published it (`evalkit/formats/`: JSONL, a
JSON array or parquet; any other layout through `[eval.fields]`) into `EvalItem`s -> for each
frame count, the data-parallel ranks take their share of the items in batches of
`generation.batch_per_rank`, sample the video (and, for a with-subtitles item, put the
subtitle lines at the sampled frames before the question: `evalkit/subtitles.py`), decode one
response each (greedy by default) -> score it two ways -> `predictions.jsonl`, resumable by
(key, frames) -> `results.json`, `report.md`, `accuracy_vs_frames.png`. The reading, scoring,
statistics and report live in `stages/evalkit/`; this module decodes.

Choices made where the paper and the benchmarks are silent:
- Two scores per reply (`evalkit/scoring.py`): `accuracy_strict`, the official LongVideo-Reason
  exact match that the paper's numbers use, and `accuracy`, lvr's lenient reading: the last
  `<answer>` block (an unclosed last one too, as a response cut off by `max_new_tokens` leaves
  it); without one, the response with its `<think>` blocks removed, read as free text ("The
  answer is B", a lone letter, the text of one option). A response naming no option, or
  several, is wrong and counted (`unparsed`); it is never guessed. `accuracy` stays the lenient
  one so it means what it meant in earlier runs; both are in every results.json and report.
- Every accuracy carries its 95% Wilson interval and n; every report shows the answer-letter
  prior of the items (always A, B, ...; the majority gold letter) and, with `eval.blind`, the
  same model and prompt without the video (rows with frames 0, decoded first).
- An item whose video cannot be decoded (or whose record is malformed, e.g. fewer than two
  options) is written to `errors.jsonl`, counted in `failed` and left out of the accuracy; the
  run goes on. A video that fails at one frame count is not tried again at the others. An
  input file without records is refused (`EmptyEvalSetError`).
- `frames` in a row is the frame budget of the sweep; `frames_sampled` the frames decoded (an
  fps cap or a short video gives fewer).
- Within a sequence-parallel group the items of a batch are dealt out to the ranks for
  decoding and the replies all-gathered (the video encode is sharded over the group); the
  group's first rank writes them. With several data-parallel
  ranks each writes `predictions.dp<R>.jsonl`, merged into `predictions.jsonl` at the end.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.data.records import JsonlAppender, RecordError, iter_jsonl  # noqa: F401 (RecordError: re-exported)
from stages.data.video import VideoDecodeError
from stages.evalkit.baselines import generate_blind
# Re-exported: the names tests, the hub card and older callers import from `stages.eval`.
from stages.evalkit.items import EmptyEvalSetError, EvalItem, load_items, options_dict, read_rows  # noqa: F401
from stages.evalkit.report import (aggregate, plot_accuracy_vs_frames, report_markdown,  # noqa: F401
                                   results_dict, summary_dict)
from stages.evalkit.scoring import BLIND_FRAMES, extract_prediction, prediction_row  # noqa: F401
from stages.evalkit.subtitles import item_sample

PREDICTIONS = "predictions.jsonl"


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

    items = load_items(recipe.data, record_error, recipe.eval.fields, recipe.eval.subtitles)
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
        vid = recipe.video
        # Blind replies first: a run killed during them still has every video reply to do, so
        # `total` (video replies only) is not 0 when it resumes and they get finished.
        blind_todo = [it for it in mine if not it.subtitled and (it.key, BLIND_FRAMES) not in done
                      ] if recipe.eval.blind else []
        place = {it.key: i for i, it in enumerate(items)}
        with run.progress("eval", total + len(blind_todo)) as bar:
            for b in range(0, len(blind_todo), gen.batch_per_rank):
                batch = blind_todo[b:b + gen.batch_per_rank]
                for it, r in zip(batch, generate_blind(rt, batch, sampling, [place[it.key] for it in batch])):
                    if writer:
                        writer.write(prediction_row(it, BLIND_FRAMES, rt.response_text(r.token_ids), r.finished,
                                                    len(r.token_ids)))  # no video: no frames, fps or pixels
                bar.advance(len(batch))
            for frames in frames_list:
                for b in range(0, len(todo[frames]), gen.batch_per_rank):
                    batch = todo[frames][b:b + gen.batch_per_rank]
                    rt.new_step()
                    samples = []
                    for it in batch:
                        if it.key in bad_videos:
                            continue
                        try:
                            samples.append((it, *item_sample(rt, it, frames)))
                        except (VideoDecodeError, RecordError) as e:
                            bad_videos.add(it.key)
                            if writes:
                                run.error(it.key, f"{type(e).__name__}: {e}", frames=frames, video=it.video)
                    groups = rt.generate([s for _, s, _ in samples], 1, sampling) if samples else []
                    for (it, s, lines), (r,) in zip(samples, groups):
                        if writer:
                            writer.write(prediction_row(it, frames, rt.response_text(r.token_ids), r.finished,
                                                        len(r.token_ids), s.video.timestamps_s, vid.fps,
                                                        vid.max_pixels, lines))
                    bar.advance(len(batch))
        if writer:
            writer.close()

    failed = len(bad_records) if grid.is_main else 0
    failed = int(all_reduce_sum([failed + (len(bad_videos) if writes else 0)], grid)[0])
    barrier(grid)
    if grid.is_main:
        merge_predictions(run.path, items, ([BLIND_FRAMES] if recipe.eval.blind else []) + frames_list)
    barrier(grid)
    results = results_dict(recipe, items, frames_list, list(read_predictions(run.path).values()), failed)
    if grid.is_main:
        (run.file("results.json")).write_text(json.dumps(results, indent=2) + "\n")
        by_frames = {int(f): v for f, v in results["by_frames"].items()}
        plot = plot_accuracy_vs_frames(by_frames, run.file("accuracy_vs_frames.png")) if len(by_frames) > 1 else None
        run.file("report.md").write_text(report_markdown(results, plot))
    return summary_dict(results)
