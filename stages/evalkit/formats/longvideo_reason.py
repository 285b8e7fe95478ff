"""LongVideo-Reason (the eval set of "Scaling RL to Long Videos"), as released.

Layout (Hub dataset `LongVideo-Reason/longvideo-reason`, test split; read by NVlabs/Long-RL
`eval/eval.py` and lmms-eval's `longvideo_reason` task), one JSON object per line:

    {"problem_id": 0, "problem": "What ...?\nA. ...\nB. ...\nC. ...\nD. ...", "data_type": "video",
     "problem_type": "goal", "reasoning": "...", "videos": "longvila_videos/I_Q3ajyOrcI.mp4",
     "answer": "<answer>B</answer>"}

The options are the `A. ...` lines of `problem`; `problem_type` is the category (temporal,
goal, spatial, plot); the answer is a letter in `<answer>` tags. The videos (ten tarballs of
`LongVideo-Reason/longvideo_eval_videos`, mp4, webm and mkv) extract into
`longvideo_eval_subset<N>/` folders, not the `longvila_videos/` the records name: a name not
found at `data.video_dir/<videos>` is found anywhere below `data.video_dir`
(`stages/data/video_index.py`). Rows the release ships malformed (no option lines; generator
scratchpad in the option block) fail `normalise_lvr` and are reported, not scored.
"""

from __future__ import annotations

from stages.data.records import RecordError, normalise_lvr
from stages.evalkit.formats.base import EvalItem, ReadContext, answer_letter, options_dict


def detect(rec: dict) -> bool:
    return "problem" in rec or "videos" in rec


def item(rec: dict, ctx: ReadContext, where: str) -> EvalItem:
    """A LongVideo-Reason record as an item; its first video found under `ctx.video_dir`."""
    rec = normalise_lvr(rec)
    if not rec["options"]:
        raise RecordError("problem: no 'A. ...' option lines and no options field")
    options = options_dict(rec["options"])
    key = rec.get("problem_id")
    groups = {"category": rec["category"]} if rec.get("category") else {}
    return EvalItem(str(key) if key is not None else where, rec["question"], options,
                    answer_letter(rec["answer"], options), ctx.video(rec["videos"][0]), groups, "longvideo-reason")
