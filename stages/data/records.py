"""JSON Lines records: tolerant reading, exactly-once appending, and the LongVideo-Reason format.

Every output of lvr is JSON Lines, one record per line, loadable by
`datasets.load_dataset("json", ...)`. Appends are per item and flushed, so a stage killed
mid-way loses at most the line being written; `JsonlAppender` repairs such a torn last
line when it reopens the file, and `done_keys` tells a resumed stage what is finished.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

CATEGORIES = ("temporal", "goal", "spatial", "plot")


class RecordError(ValueError):
    """A record that does not fit its format: the message names the field."""


def iter_jsonl(path, on_error: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield `(line number, record)` for every parseable object line of `path`.

    A malformed line is reported to `on_error(lineno, reason)` (or raises `RecordError` when
    no handler is given) and skipped; blank lines are skipped silently.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            except ValueError as e:
                reason = f"{path}:{lineno}: malformed JSON line ({str(e).splitlines()[0][:120]})"
                if on_error is None:
                    raise RecordError(reason) from None
                on_error(lineno, reason)
                continue
            yield lineno, rec


def read_jsonl(path, on_error=None) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path, on_error)]


def repair_torn_tail(path: Path) -> int:
    """Cut a last line that has no newline (a write killed mid-way); return bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        pos = size
        while pos > 0:
            step = min(4096, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = pos - step + nl + 1
                break
            pos -= step
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
        return size - keep


class JsonlAppender:
    """Append one JSON record per line, flushed per record; repairs a torn tail on open."""

    def __init__(self, path, fsync: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._fsync = fsync

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n")
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def done_keys(path, key: str) -> set:
    """Keys of the records already in `path` (after repairing a torn tail)."""
    path = Path(path)
    if not path.exists():
        return set()
    repair_torn_tail(path)
    return {rec.get(key) for _, rec in iter_jsonl(path, on_error=lambda *_: None)}


# -- LongVideo-Reason records ------------------------------------------------------------------
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\.\):]\s+(.*\S)\s*$")


def split_problem(problem: str) -> tuple[str, dict[str, str]]:
    """Split a LongVideo-Reason `problem` into the question and its `A. ...` option lines."""
    question, options = [], {}
    for line in problem.splitlines():
        m = _OPTION_LINE.match(line)
        if m and (not options or ord(m.group(1)) == ord(max(options)) + 1) and (options or m.group(1) == "A"):
            options[m.group(1)] = m.group(2)
        elif options:
            options[max(options)] += " " + line.strip()
        else:
            question.append(line)
    return "\n".join(question).strip(), options


def format_problem(question: str, options: dict[str, str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def normalise_lvr(rec: dict) -> dict:
    """Return a LongVideo-Reason record with `question`, `options`, `category` filled in from
    the released fields; raise `RecordError` naming a missing or bad field."""
    for f in ("problem", "videos", "answer"):
        if f not in rec:
            raise RecordError(f"missing field {f!r}")
    out = dict(rec)
    if "options" not in out or "question" not in out:
        q, opts = split_problem(rec["problem"])
        out.setdefault("question", q)
        out.setdefault("options", opts)
    category = out.get("category") or out.get("problem_type")
    if category is not None and category not in CATEGORIES:
        raise RecordError(f"problem_type {category!r} is not one of {', '.join(CATEGORIES)}")
    out["category"] = category
    videos = out["videos"]
    if isinstance(videos, str):
        out["videos"] = [videos]
    elif not isinstance(videos, list) or not videos:
        raise RecordError("field 'videos' must be a non-empty list of paths")
    if out["options"] and str(out["answer"]).strip().upper()[:1] not in out["options"]:
        raise RecordError(f"answer {out['answer']!r} is not one of the options {', '.join(out['options'])}")
    out.setdefault("problem_id", out.get("id"))
    return out


def answer_target(reasoning: str, answer: str) -> str:
    """The CoT-SFT target: `<think>{reasoning}</think><answer>{answer}</answer>`."""
    return f"<think>{reasoning.strip()}</think><answer>{answer.strip()}</answer>"


def write_jsonl(path, records: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
