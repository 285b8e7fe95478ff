"""Video-MME, with or without subtitles.

Layout (Hub dataset `lmms-lab/Video-MME`, `videomme/test-00000-of-00001.parquet`, read by
lmms-eval's `videomme` and `videomme_w_subtitle` tasks), one row per question:

    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "url": "...", "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
     "question": "How many red socks are above the fireplace?",
     "options": ["A. 0.", "B. 1.", "C. 2.", "D. 3."], "answer": "C"}

Videos are `<videoID>.mp4` (lmms-eval also accepts `.MP4` and `.mkv`), unzipped into `data/`;
subtitles `<videoID>.srt` in `subtitle/` beside it. A video is looked for at
`data.video_dir/<videoID>.mp4`, then by name or stem anywhere below `data.video_dir`; its
subtitles beside the video, in `data.video_dir/subtitle/`, or in `subtitle/` next to the
video's folder (the archive's `data/` + `subtitle/`). Reported per `duration` (short,
medium, long), `domain` and `task_type`.
"""

from __future__ import annotations

from pathlib import Path

from stages.data.records import RecordError
from stages.evalkit.formats.base import EvalItem, ReadContext, answer_letter, options_dict, require

DURATIONS = ("short", "medium", "long")


def detect(rec: dict) -> bool:
    return "videoID" in rec or ("question_id" in rec and "duration" in rec)


def subtitle_file(video: str, video_dir: Path, video_id: str) -> str | None:
    """The `.srt` of a VideoMME video, where the release puts it (see the module docstring)."""
    here = Path(video).parent
    for p in (here / f"{video_id}.srt", video_dir / "subtitle" / f"{video_id}.srt",
              here.parent / "subtitle" / f"{video_id}.srt"):
        if p.is_file():
            return str(p)
    return None


def item(rec: dict, ctx: ReadContext, where: str) -> EvalItem:
    """A VideoMME record as an item."""
    require(rec, "videoID", "question", "options", "answer")
    options = options_dict(rec["options"])
    groups = {f: str(rec[f]) for f in ("duration", "domain", "task_type") if rec.get(f) is not None}
    if groups.get("duration") not in (None, *DURATIONS):
        raise RecordError(f"duration {groups['duration']!r} is not one of {', '.join(DURATIONS)}")
    vid = str(rec["videoID"])
    video = ctx.video(f"{vid}.mp4", stem=vid)
    key = rec.get("question_id")
    return EvalItem(str(key) if key is not None else where, str(rec["question"]).strip(), options,
                    answer_letter(rec["answer"], options), video, groups, "videomme",
                    subtitles=subtitle_file(video, ctx.video_dir, vid) if ctx.subtitles else None)
