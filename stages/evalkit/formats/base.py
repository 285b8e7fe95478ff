"""What every eval-set layout reads into: `EvalItem`, and the option and answer readers the
layouts share (`options_dict`, `answer_letter`), with the video lookup of `ReadContext`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from stages.algo.rewards import extract_choice
from stages.data.records import RecordError, unwrap_answer
from stages.data.video_index import find_video

# The layouts lvr reads (`data.format`; "auto" detects one per record); "fields" maps any
# other layout's field names through `[eval.fields]`.
FORMATS = ("longvideo-reason", "videomme", "longvideobench", "mlvu", "fields")
_LABELLED = re.compile(r"^\s*\(?([A-Za-z])[\.\):]\s*(.*\S)?\s*$", re.DOTALL)
NOT_AN_OPTION = (None, "", "N/A")  # LongVideoBench fills unused option slots with "N/A"


@dataclass(frozen=True)
class EvalItem:
    """One multiple-choice question on one video, whatever the source format."""

    key: str
    question: str
    options: dict[str, str]  # {"A": text, ...}
    answer: str  # the correct letter
    video: str  # path of the video file
    groups: dict[str, str] = field(default_factory=dict)  # category, or duration/domain/task_type, ...
    format: str = "longvideo-reason"
    subtitles: str | None = None  # the subtitle file its protocol reads (VideoMME's .srt), if any
    subtitled: bool = False  # the with-subtitles reading of another item (key + SUBTITLED_SUFFIX)

    def record(self, subtitle_block: str | None = None) -> dict:
        """The record `Runtime.sample` reads (question, options, video); `subtitle_block` goes
        before the question, as VideoMME's with-subtitles protocol puts it."""
        question = f"{subtitle_block}\n{self.question}" if subtitle_block is not None else self.question
        return {"problem_id": self.key, "question": question, "options": self.options, "videos": [self.video]}


@dataclass(frozen=True)
class ReadContext:
    """Where a layout's videos and subtitles are: `video_dir` (data.video_dir, or the input's
    folder), the `[eval.fields]` mapping, whether subtitles are wanted (eval.subtitles)."""

    video_dir: Path
    fields: object | None = None
    subtitles: bool = False

    def video(self, ref: str, stem: str | None = None, folder_hint: str | None = None) -> str:
        """The path of video `ref` (`find_video`: relative to video_dir, else found by name)."""
        if not isinstance(ref, str) or not ref.strip():
            raise RecordError(f"video: expected a path, got {ref!r}")
        return str(find_video(self.video_dir, ref, stem=stem, folder_hint=folder_hint))


def letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def options_dict(options) -> dict[str, str]:
    """`{"A": text, ...}` of dict options or a list (`["A. text", ...]` or bare texts in order);
    raise `RecordError` for other types, keys that are not single letters, or fewer than two."""
    if isinstance(options, dict):
        out = {str(k).strip().strip("().:[] ").upper(): str(v).strip() for k, v in options.items()}
    elif isinstance(options, (list, tuple)):
        out = {}
        for letter, text in zip(letters(len(options)), options):
            m = _LABELLED.match(str(text))
            out[letter] = (m.group(2) or "").strip() if m and m.group(1).upper() == letter else str(text).strip()
    else:
        raise RecordError(f"options: expected a list or a dict, got {type(options).__name__}")
    if not out or any(len(k) != 1 or not k.isalpha() for k in out):
        raise RecordError(f"options: keys must be single letters, got {sorted(out)}")
    if len(out) < 2:
        raise RecordError(f"options: only {', '.join(out)}; a multiple-choice item needs at least two")
    return out


def answer_letter(answer, options: dict[str, str], names: list[str] | None = None) -> str:
    """The letter of the correct option, however a layout writes it: a 0-based index (an int:
    LongVideoBench's `correct_choice`), the name of the option's field (`names`, the
    `[eval.fields]` option fields), a letter (also `<answer>B</answer>`, `(b)`), or the
    option's exact text (MLVU). Raise `RecordError` when it names no option."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(options):
            raise RecordError(f"answer index {answer} is out of range for the options {', '.join(options)}")
        return list(options)[answer]
    if not isinstance(answer, str):
        raise RecordError(f"answer: expected a letter, an option's text or a 0-based index, got {answer!r}")
    text = unwrap_answer(answer)
    if names and text in names:
        return list(options)[names.index(text)]
    if len(text) == 1 and text.upper() in options:
        return text.upper()
    same = [k for k, v in options.items() if v == text]
    if len(same) == 1:
        return same[0]
    letter = extract_choice(text, options)
    if letter is None or letter not in options:
        raise RecordError(f"answer {answer!r} does not name one of the options {', '.join(options)}")
    return letter


def require(rec: dict, *names: str) -> None:
    """Raise `RecordError` naming the first of `names` that `rec` lacks (or holds null)."""
    for f in names:
        if rec.get(f) is None:
            raise RecordError(f"missing field {f!r}")
