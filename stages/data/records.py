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
# As released (NVlabs/Long-RL `eval/eval.py`, lmms-eval `longvideo_reason`): `problem_id` (int),
# `problem` (the question, then one `A. ...` line per option), `data_type` ("video"),
# `problem_type` (the category), `reasoning`, `videos` (ONE path string,
# `longvila_videos/<name>.<mp4|webm|mkv>`) and `answer` wrapped in tags, `<answer>B</answer>`.
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[\.\):]\s+(.*\S)\s*$")
_ANSWER_TAGS = re.compile(r"^\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
RELEASED_OPTIONS = 4  # every released LongVideo-Reason question offers A-D
_SPACE = re.compile(r"\s*")


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


def option_order_error(problem: str) -> str | None:
    """Why the option block of `problem` is malformed, or None: a lettered line inside it that
    is not the next letter (a repeated `A.`, a skipped one), which `split_problem` would
    otherwise glue onto the option before it."""
    last = None
    for line in problem.splitlines():
        m = _OPTION_LINE.match(line)
        if not m:
            continue
        letter = m.group(1)
        if last is None:
            last = letter if letter == "A" else None
        elif ord(letter) == ord(last) + 1:
            last = letter
        else:
            return f"problem: option line {line.strip()[:60]!r} breaks the A, B, C order after {last}"
    return None


def unwrap_answer(answer) -> str:
    """The answer as written inside the release's `<answer>...</answer>` tags (else as is), stripped."""
    text = str(answer).strip()
    m = _ANSWER_TAGS.match(text)
    return m.group(1).strip() if m else text


def format_problem(question: str, options: dict[str, str]) -> str:
    return question.strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in options.items())


def normalise_lvr(rec: dict) -> dict:
    """Return a LongVideo-Reason record with `question`, `options`, `category` filled in from
    the released fields, `videos` as a list and `answer` without its `<answer>` tags; raise
    `RecordError` naming a missing or bad field. A record in the released shape (a tagged
    answer) must offer exactly A-D: the release's malformed rows have no option lines, or
    generator scratchpad where an option should be."""
    for f in ("problem" if "question" not in rec else "question", "videos", "answer"):
        if f not in rec or rec[f] is None:
            raise RecordError(f"missing field {f!r}")
    out = dict(rec)
    released = _ANSWER_TAGS.match(str(rec["answer"])) is not None
    out["answer"] = unwrap_answer(rec["answer"])
    if "problem" in rec:
        if not isinstance(rec["problem"], str):
            raise RecordError(f"problem: expected text, got {type(rec['problem']).__name__}")
        if why := option_order_error(rec["problem"]):
            raise RecordError(why)
    if "problem" not in rec:
        out.setdefault("options", {})
    elif "options" not in out or "question" not in out:
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
    elif not isinstance(videos, list) or not videos or not all(isinstance(v, str) for v in videos):
        raise RecordError("field 'videos' must be a path or a non-empty list of paths")
    answer, options = out["answer"], out["options"]
    if not options and len(answer) == 1 and answer.isalpha():
        raise RecordError(f"problem: no 'A. ...' option lines, but the answer {answer!r} names an option")
    if options and answer.upper()[:1] not in options:
        raise RecordError(f"answer {answer!r} is not one of the options {', '.join(options)}")
    if released and len(options) != RELEASED_OPTIONS:
        raise RecordError(f"problem: {len(options)} option lines ({', '.join(options) or 'none'}); a released "
                          f"LongVideo-Reason question offers {RELEASED_OPTIONS} (A-D)")
    out.setdefault("problem_id", out.get("id"))
    return out


def iter_records(path, on_error: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, dict]]:
    """`(line, record)` of a JSON Lines file or of a JSON array (told apart by the first
    character, whatever the suffix); a malformed line or element goes to `on_error(line, reason)`
    (or raises `RecordError`). In an array, `line` is where the element starts; a syntax error
    ends the array there (nothing after it can be told apart)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from iter_jsonl(path, on_error)
        return
    text = Path(path).read_text(encoding="utf-8")
    pos = text.index("[") + 1
    decoder, line = json.JSONDecoder(), text.count("\n", 0, pos) + 1

    def bad(at: int, why: str) -> None:
        reason = f"{path}:{at}: {why}"
        if on_error is None:
            raise RecordError(reason)
        on_error(at, reason)

    while True:
        nxt = _SPACE.match(text, pos).end()
        line += text.count("\n", pos, nxt)
        pos = nxt
        if pos >= len(text):
            return bad(line, "malformed JSON array (no closing ']')")
        if text[pos] == "]":
            return
        try:
            rec, end = decoder.raw_decode(text, pos)
        except ValueError as e:
            return bad(line, f"malformed JSON array element ({str(e).splitlines()[0][:120]})")
        if isinstance(rec, dict):
            yield line, rec
        else:
            bad(line, f"malformed JSON array element (expected an object, got {type(rec).__name__})")
        pos = _SPACE.match(text, end).end()
        line += text.count("\n", nxt, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            return bad(line, f"malformed JSON array (expected ',' or ']', got {text[pos]!r})")


def read_records(path, on_error: Callable[[int, str], None]) -> list[dict]:
    """The LongVideo-Reason records of a JSONL file or JSON array (`iter_records`), each
    `normalise_lvr`ed; a malformed one goes to `on_error(line, "path:line: reason")` and is
    left out. What `lvr filter`, `lvr sft` and `lvr rl` train and score on."""
    out = []
    for line, rec in iter_records(path, on_error):
        try:
            out.append(normalise_lvr(rec))
        except RecordError as e:
            on_error(line, f"{path}:{line}: RecordError: {e}")
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
