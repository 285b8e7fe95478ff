"""Eval sets as `EvalItem`s: LongVideo-Reason JSONL, or the VideoMME layout as JSONL or parquet.

A record that does not fit (no options or only one, an answer that names no option, a
duplicate key) goes to `on_error(where, reason)` and is left out; an input file without a
single record is refused outright (`EmptyEvalSetError`): an empty eval set is a mistake, not
an accuracy of 0 out of 0.
"""

from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stages.algo.rewards import extract_choice
from stages.data.records import RecordError, iter_jsonl, normalise_lvr

GROUP_FIELDS = ("category", "duration", "task_type", "domain")  # reported as by_<field>
DURATIONS = ("short", "medium", "long")
_LABELLED = re.compile(r"^\s*\(?([A-Za-z])[\.\):]\s*(.*\S)?\s*$", re.DOTALL)


class EmptyEvalSetError(RecordError):
    """An eval input file with no records (empty, or only blank lines): a bad input, exit 2."""


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
    """`{"A": text, ...}` of dict options or a list (`["A. text", ...]` or bare texts in order);
    raise `RecordError` for other types, keys that are not single letters, or fewer than two."""
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
    if len(out) < 2:
        raise RecordError(f"options: only {', '.join(out)}; a multiple-choice item needs at least two")
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
    """`(where, record)` of a JSONL, JSON (a list) or parquet file; raise `EmptyEvalSetError`
    when it holds no record and no malformed line either (empty, or only blank lines)."""
    malformed = []

    def bad(where: str, why: str) -> None:
        malformed.append(where)
        on_error(where, why)

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path}:{i}", rec) for i, rec in enumerate(pq.read_table(path).to_pylist(), 1)]
    elif path.suffix == ".json":
        text = path.read_text()
        data = json.loads(text) if text.strip() else []
        rows = [(f"{path}:{i}", rec) for i, rec in enumerate(data if isinstance(data, list) else [data], 1)]
    else:
        rows = [(f"{path}:{line}", rec) for line, rec in
                iter_jsonl(path, on_error=lambda line, why: bad(f"{path}:{line}", why))]
    if not rows and not malformed:
        raise EmptyEvalSetError(f"data.input: {path} holds no records (empty, or only blank lines)")
    return rows


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
