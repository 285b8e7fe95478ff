"""LongVideoBench, the multiple-choice validation set (`lvb_val.json`).

Layout (Hub dataset `longvideobench/LongVideoBench`: `lvb_val.json`, a JSON array, read by
the official `LongVideoBenchDataset` and lmms-eval's `longvideobench_val_v`):

    {"id": "86CxyhFV9MI_0", "video_id": "86CxyhFV9MI", "video_path": "86CxyhFV9MI.mp4",
     "subtitle_path": "86CxyhFV9MI_en.json", "duration": 23.6, "duration_group": 15,
     "starting_timestamp_for_subtitles": 0, "question": "...", "candidates": ["...", "...", "..."],
     "correct_choice": 1, "question_category": "S2E", ...}

`candidates` are the options in order (2 to 5); `correct_choice` is the 0-based index of the
right one. The Hub's parquet of the same split writes the options as `option0` ... `option4`
("N/A" for unused slots); both are read. Videos live in `videos/` (`video_path`); the test
file (`lvb_test_wo_gt.json`) has no `correct_choice` and is refused item by item. Reported
per `duration_group` (15, 60, 600, 3600 s) and `question_category`, as lmms-eval does. The
interleaved-subtitle protocol (`longvideobench_val_i`) is not implemented: lvr asks the
video-only question (`_v`).
"""

from __future__ import annotations

from stages.data.records import RecordError
from stages.evalkit.formats.base import NOT_AN_OPTION, EvalItem, ReadContext, answer_letter, options_dict, require

OPTION_SLOTS = tuple(f"option{i}" for i in range(5))  # the parquet's spelling of `candidates`


def detect(rec: dict) -> bool:
    return "correct_choice" in rec or "question_category" in rec or ("candidates" in rec and "video_path" in rec)


def item(rec: dict, ctx: ReadContext, where: str) -> EvalItem:
    """A LongVideoBench record as an item."""
    require(rec, "question", "video_path")
    if "correct_choice" not in rec:
        raise RecordError("no correct_choice: a file without ground truth (lvb_test_wo_gt.json) cannot be scored")
    if rec.get("candidates") is not None:
        options = options_dict(rec["candidates"])
    else:
        options = options_dict([rec[s] for s in OPTION_SLOTS if rec.get(s) not in NOT_AN_OPTION])
    groups = {f: str(rec[f]) for f in ("duration_group", "question_category") if rec.get(f) is not None}
    key = rec.get("id")
    return EvalItem(str(key) if key is not None else where, str(rec["question"]).strip(), options,
                    answer_letter(rec["correct_choice"], options), ctx.video(rec["video_path"]), groups,
                    "longvideobench")
