"""Eval-set layouts, one module per benchmark: each `item(record, ctx, where) -> EvalItem`
and, for `data.format = "auto"`, `detect(record)`. `READERS` (one per name of
`base.FORMATS`) and `detect` are the registry."""

from __future__ import annotations

from stages.evalkit.formats import fields, longvideo_reason, longvideobench, mlvu, videomme

READERS = {"longvideo-reason": longvideo_reason.item, "videomme": videomme.item,
           "longvideobench": longvideobench.item, "mlvu": mlvu.item, "fields": fields.item}
DETECTED = (("videomme", videomme.detect), ("longvideobench", longvideobench.detect), ("mlvu", mlvu.detect),
            ("longvideo-reason", longvideo_reason.detect))  # in this order: LongVideo-Reason's test is the loosest
UNDETECTED = ("neither a LongVideo-Reason record (problem, videos), a VideoMME one (videoID, question_id), a "
              "LongVideoBench one (candidates, correct_choice, video_path) nor an MLVU one (video, candidates): "
              "set data.format, or map its fields with [eval.fields]")


def detect(rec: dict) -> str | None:
    """The layout of one record by its fields (None when it fits none)."""
    return next((name for name, test in DETECTED if test(rec)), None)
