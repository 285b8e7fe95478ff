"""MLVU, the multiple-choice tasks of its dev set.

Layout (the official JUNJIE99/MLVU release, `MLVU/json/<N>_<task>.json`, each a JSON array;
videos in `MLVU/video/<N>_<task>/`):

    {"video": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character in the video?",
     "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"}

The answer is the text of the right candidate. Reported per `question_type` (the task:
plotQA, findNeedle, ego, count, order, anomaly_reco, topic_reasoning), with the mean over
task types, MLVU's M-Avg. The open-ended tasks (sub_scene, summary) have no candidates and
are refused item by item. Point `data.input` at `MLVU/json/*.json` and `data.video_dir` at
`MLVU/video`: a video is found by name, and a name two task folders share in the folder named
like its json file (`json/2_needle.json` -> `video/2_needle/`).
"""

from __future__ import annotations

from pathlib import Path

from stages.data.records import RecordError
from stages.evalkit.formats.base import EvalItem, ReadContext, answer_letter, options_dict, require


def detect(rec: dict) -> bool:
    return "video" in rec and ("candidates" in rec or "question_type" in rec)


def item(rec: dict, ctx: ReadContext, where: str) -> EvalItem:
    """An MLVU record as an item."""
    require(rec, "video", "question", "answer")
    if rec.get("candidates") is None:
        raise RecordError("no candidates: an open-ended MLVU task; lvr eval scores multiple choice only")
    options = options_dict(rec["candidates"])
    task = rec.get("question_type")
    groups = {"question_type": str(task)} if task is not None else {}
    key = rec.get("uid") or rec.get("question_id")
    task_file = Path(where.rsplit(":", 1)[0]).stem  # json/2_needle.json's videos are in video/2_needle/
    return EvalItem(str(key) if key is not None else where, str(rec["question"]).strip(), options,
                    answer_letter(rec["answer"], options), ctx.video(rec["video"], folder_hint=task_file), groups,
                    "mlvu")
