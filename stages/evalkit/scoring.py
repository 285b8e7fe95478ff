"""Scoring a reply to a multiple-choice item, two ways, and the prediction row that records it.

- strict: the official LongVideo-Reason scorer (`accuracy_reward` string path of
  NVlabs/Long-RL `longvideo-reason/eval.py`, the paper's numbers): the FIRST `<answer>...</answer>`
  on one line (its regex has no DOTALL), or the text after "Therefore the final answer is: "
  inside it when the reply says that phrase, stripped, else the whole reply stripped; then an
  exact, case-sensitive string comparison with the gold letter: "B" == "B", "B. red" != "B",
  "b" != "B". Its symbolic `math_verify` step is left out: on a one-letter gold it adds nothing.
- lenient (`extract_prediction`, lvr's own): the letter the reply names, read from its last
  `<answer>` block (an unclosed last one too) or from the text outside `<think>`; replies that
  name no option or several are wrong, never guessed.

A reply is well-formed when the lenient parse finds a letter, and in format when `format_reward`
(stages/algo/rewards.py: exactly one `<think>` block then one non-empty `<answer>` block) is 1.
"""

from __future__ import annotations

import re

from stages.algo.rewards import extract_answer, extract_choice, format_reward
from stages.evalkit.items import EvalItem

BLIND_FRAMES = 0  # the frame count of a blind prediction row (no video): its own (key, frames) slot
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
_TAG_RE = re.compile(r"</?(?:think|answer)>")
_OFFICIAL_PHRASE = "Therefore the final answer is:"
_OFFICIAL_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>")
_OFFICIAL_PHRASE_RE = re.compile(r"<answer>Therefore the final answer is: (.*?)</answer>")


def extract_prediction(text: str, options: dict[str, str]) -> str | None:
    """The option letter a response names (lenient): from its last `<answer>` block, else from
    the text outside `<think>` blocks; None when it names none or several."""
    body = extract_answer(text)
    if body is None and "<answer>" in text:  # cut off by max_new_tokens inside the answer
        body = text.rsplit("<answer>", 1)[1]
    if body is None:
        body = _TAG_RE.sub(" ", _THINK_RE.sub(" ", text))
    return extract_choice(body, options) if body.strip() else None


def official_answer(text: str) -> str:
    """The answer string the official LongVideo-Reason scorer reads from a reply (see the module
    docstring): first one-line `<answer>` span, stripped, else the whole reply stripped."""
    regex = _OFFICIAL_PHRASE_RE if _OFFICIAL_PHRASE in text else _OFFICIAL_ANSWER_RE
    m = regex.search(text)
    return m.group(1).strip() if m else text.strip()


def strict_correct(text: str, answer: str) -> bool:
    """The official score: `official_answer(text)` equals the gold `answer` exactly."""
    return official_answer(text) == answer.strip()


def row_correct(row: dict, scoring: str) -> bool:
    """Whether a prediction row is right under `scoring` ("lenient" or "strict"); rows written
    before both were stored carry only `correct` (lenient), their strict score is recomputed."""
    if scoring == "lenient":
        return bool(row.get("correct_lenient", row["correct"]))
    if scoring == "strict":
        if "correct_strict" in row:
            return bool(row["correct_strict"])
        return strict_correct(row["prediction"], row["answer"])
    raise ValueError(f"scoring {scoring!r}: expected lenient or strict")


def row_format(row: dict) -> bool:
    """Whether the reply of a prediction row is in `<think>..</think><answer>..</answer>` format."""
    return bool(row["format"]) if "format" in row else format_reward(row["prediction"]) == 1.0


# The fields of a prediction row besides its groups (a group of `[eval.fields]` may not take one).
PREDICTION_FIELDS = ("key", "frames", "blind", "question", "options", "video", "frames_sampled", "first_s", "last_s",
                     "fps", "max_pixels", "prediction", "extracted", "answer", "correct", "correct_lenient",
                     "correct_strict", "format", "finished", "response_tokens", "group_by", "subtitles",
                     "subtitle_lines")


def prediction_row(item: EvalItem, frames: int, text: str, finished: bool, tokens: int,
                   timestamps_s: list[float] | None = None, fps: float | None = None,
                   max_pixels: int | None = None, subtitle_lines: int | None = None) -> dict:
    """One line of `predictions.jsonl`: what was asked, what the model saw, what it said, and both
    scores. `frames` is the frame budget of the sweep (the resume key; `BLIND_FRAMES` without a
    video); `frames_sampled` counts the distinct frames decoded (a short video or an fps cap gives
    fewer than the budget; the repeat that pads the last temporal patch is not counted), and
    `first_s`/`last_s` are the times of the first and last of them. The item's groups follow,
    named in `group_by`; a with-subtitles reading adds `subtitles` and `subtitle_lines`, the
    subtitle lines its prompt carried."""
    letter = extract_prediction(text, item.options)
    stamps = sorted(set(timestamps_s or []))
    row = {"key": item.key, "frames": frames, "blind": frames == BLIND_FRAMES,
           "question": item.question, "options": item.options, "video": item.video,
           "frames_sampled": len(stamps), "first_s": stamps[0] if stamps else None,
           "last_s": stamps[-1] if stamps else None, "fps": fps, "max_pixels": max_pixels,
           "prediction": text, "extracted": letter, "answer": item.answer,
           "correct": letter == item.answer,  # lenient, the name older rows and readers use
           "correct_lenient": letter == item.answer, "correct_strict": strict_correct(text, item.answer),
           "format": format_reward(text) == 1.0, "finished": finished, "response_tokens": tokens,
           "group_by": list(item.groups)}
    if item.subtitled:
        row |= {"subtitles": True, "subtitle_lines": subtitle_lines}
    return row | item.groups
