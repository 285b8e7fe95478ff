"""Rule-based rewards for GRPO: the format reward and the accuracy reward.

The paper (LongVILA-R1, Sec. 4) rewards a rollout for its format (reasoning in
`<think>...</think>`, then the answer in `<answer>...</answer>`) and for its accuracy
(multiple-choice letter, number, free text; an LLM judge for open-ended items). This
module holds the string side of that: pure functions of strings, stdlib only. The
weights are the recipe's (`combined_reward`).

Choices made where the paper is silent:

- The format reward is all-or-nothing: exactly one `<think>` block followed by exactly one
  non-empty `<answer>` block, nothing else around them but whitespace. An empty think
  block is allowed; an empty answer is not.
- An ambiguous multiple-choice answer ("A or B") extracts to None, which scores 0: a
  rollout must not be paid for hedging.
- Numbers compare with a relative tolerance, absolute when |reference| < 1, so 0 and
  small values do not demand exact equality.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Callable, Dict, List, Optional, Tuple, Union

Options = Union[Dict[str, str], List[str], None]
Judge = Callable[[str, str], float]

ACCURACY_KINDS = ("choice", "number", "text", "judge")
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_FORMAT_RE = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ARTICLES = frozenset({"a", "an", "the"})


# ----------------------------------------------------------------------------- format


def format_reward(response: str) -> float:
    """Return 1.0 when the whole response is `<think>..</think>` then `<answer>..</answer>`.

    Leading/trailing whitespace and whitespace between the two blocks are allowed. Each
    tag must occur exactly once (so nested or repeated blocks fail), nothing may precede
    `<think>` or follow `</answer>`, and the answer must have non-whitespace content.
    """
    text = response.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _FORMAT_RE.fullmatch(text)
    if match is None or not match.group(2).strip():
        return 0.0
    return 1.0


def extract_answer(response: str) -> Optional[str]:
    """Return the stripped content of the last `<answer>...</answer>` block, or None."""
    blocks = _ANSWER_RE.findall(response)
    return blocks[-1].strip() if blocks else None


# ----------------------------------------------------------------------------- text


def normalize_text(text: str) -> str:
    """Return `text` lower-cased, without punctuation or articles, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(word for word in text.split() if word not in _ARTICLES)


# ----------------------------------------------------------------------------- choice
#
# Where a letter counts (each rule is tested in tests/unit/test_rewards.py):
#
# 1. At the start of the text, a letter that is plainly a label: alone ("B", "b", "B.",
#    "(b)", "[C]", "\boxed{B}", "**B**"), in brackets ("(B) red"), or followed by one of
#    `. ) ] : ,` ("B. red", "B) red", "b: red").
# 2. After an answer cue: "answer", "option" or "choice", optionally followed by a verb
#    (is, would be, should be, will be, must be) and/or `:`, `=`, `-` ("Answer: C",
#    "The answer is D", "the correct option is (b)"). The labels of rule 1 count there
#    too; after a cue that ends in a verb or `:`/`=`/`-`, so does an upper-case letter
#    followed by more words ("The answer is D because ..."), except the pronoun "I".
# 3. Letters joined by `,` `/` `&` "or" "and" ("A or B", "A, C") in either position are
#    all candidates; several different candidates make the answer ambiguous -> None.
# 4. A lower-case letter followed by a word is an article or a word, never a label:
#    "a red ball", "the answer is a red ball". So is an upper-case one at the start of
#    the text ("A red ball"), where sentences start with capitals.
#
# With options given, letters outside the options' letters are dropped. When no letter
# is found, the normalised text (or what follows a cue) is matched exactly against the
# normalised option texts. After a cue, an upper-case letter followed by words yields
# to such an exact match ("Answer: A red ball" -> the letter of option "Red ball").

_CLEAN_RE = re.compile(r"\\(?:boxed|text|textbf|mathrm)\{([^{}]*)\}")
_LEAD_RE = re.compile(r"[\s\"'`*_]+")
_TOKEN_RE = re.compile(r"(?P<open>[(\[])?(?P<letter>[A-Za-z])(?P<close>[)\]])?(?![A-Za-z0-9])")
_LIST_SEP_RE = re.compile(r"\s*[,/&]\s*(?:(?:or|and)\s+)?|\s+(?:or|and)\s+", re.IGNORECASE)
_DELIM_RE = re.compile(r"[.):\],]")
_END_RE = re.compile(r"[\s.!?;:,)\]\"'`*_]*$")
_CUE_RE = re.compile(
    r"\b(?:answer|option|choice)\b"
    r"(?P<verb>\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be))?"
    r"(?:\s+(?:option|choice)\b)?"
    r"\s*(?P<sep>[:=\-])?\s*",
    re.IGNORECASE,
)
_LABEL_RE = re.compile(r"^\s*[(\[]?([A-Za-z])[)\].:]\s*(.*)$", re.DOTALL)


def _option_table(options: Options) -> Dict[str, str]:
    """Return {letter: normalised option text} for dict or list options."""
    if options is None:
        return {}
    if isinstance(options, dict):
        items = []
        for key, value in options.items():
            letter = str(key).strip().strip("().:[] ").upper()
            if len(letter) != 1 or not letter.isalpha():
                raise ValueError(f"option key {key!r} is not a single letter")
            items.append((letter, str(value)))
    else:
        items = [(chr(ord("A") + i), str(value)) for i, value in enumerate(options)]
    table = {}
    for letter, value in items:
        # VideoMME-style options carry their own label: "A. Apples."
        label = _LABEL_RE.match(value)
        if label and label.group(1).upper() == letter:
            value = label.group(2)
        table[letter] = normalize_text(value)
    return table


def _read_token(text: str, pos: int) -> Optional[Tuple[str, int, str]]:
    """Return (letter, end, strength) for a letter token at text[pos:], or None.

    strength: "label" (closed by `)`/`]`, alone, or followed by a delimiter), "upper_word"
    (upper-case and followed by a word), "word" (lower-case and followed by a word).
    """
    match = _TOKEN_RE.match(text, pos)
    if match is None:
        return None
    letter, end = match.group("letter"), match.end()
    rest = text[end:]
    if match.group("close") or _END_RE.fullmatch(rest) or _DELIM_RE.match(rest):
        return letter, end, "label"
    return letter, end, "upper_word" if letter.isupper() else "word"


def _letters_at(text: str, pos: int, allow_upper_word: bool) -> Tuple[List[str], bool]:
    """Return the letters a label (or list of labels) at text[pos:] names, and if weak."""
    first = _read_token(text, pos)
    if first is None:
        return [], False
    letters, end = [first[0]], first[1]
    while True:
        sep = _LIST_SEP_RE.match(text, end)
        if sep is None:
            break
        item = _read_token(text, sep.end())
        if item is None or item[2] == "word":
            break
        letters.append(item[0])
        end = item[1]
    if len(letters) > 1 or first[2] == "label":
        return letters, False
    if first[2] == "upper_word" and allow_upper_word and first[0] != "I":
        return letters, True
    return [], False


def _match_option_text(text: str, table: Dict[str, str]) -> Optional[str]:
    """Return the one letter whose normalised option text equals normalised `text`."""
    norm = normalize_text(text)
    hits = [letter for letter, option_text in table.items() if option_text and option_text == norm]
    return hits[0] if len(hits) == 1 else None


def extract_choice(text: str, options: Options = None) -> Optional[str]:
    """Return the one option letter (upper-case) that `text` names, or None.

    text: an answer body, e.g. "B", "(b)", "B) red", "Answer: C", "The answer is D".
    options: {"A": "text", ...} or ["text", ...] (lettered A, B, ... in order; items may
    carry their own "A. " label). See the rules in the comment above. None when no letter
    is found or several different ones are (ambiguous counts as wrong).
    """
    table = _option_table(options)
    text = unicodedata.normalize("NFKC", text)
    text = _CLEAN_RE.sub(r"\1", text)
    lead = _LEAD_RE.match(text)
    text = text[lead.end():] if lead else text

    candidates, _ = _letters_at(text, 0, allow_upper_word=False)
    candidates = list(candidates)
    remainders = []
    for cue in _CUE_RE.finditer(text):
        start = _LEAD_RE.match(text, cue.end())
        pos = start.end() if start else cue.end()
        strong_cue = bool(cue.group("verb") or cue.group("sep"))
        letters, weak = _letters_at(text, pos, allow_upper_word=strong_cue)
        remainder = text[pos:]
        remainders.append(remainder)
        if weak and table:
            text_letter = _match_option_text(remainder, table)
            if text_letter is not None:
                letters = [text_letter]
        candidates.extend(letters)

    found = {letter.upper() for letter in candidates}
    if table:
        found &= set(table)
    if len(found) == 1:
        return found.pop()
    if found or not table:
        return None
    text_hits = {_match_option_text(part, table) for part in [text, *remainders]} - {None}
    return text_hits.pop() if len(text_hits) == 1 else None


# ----------------------------------------------------------------------------- numbers

_NUMBER_RE = re.compile(
    r"(?P<sign>[-+])?(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+)?(?P<pct>\s*%)?"
)


def _parse_number(text: str) -> Optional[Tuple[float, bool]]:
    """Return (value, is_percent) of the first number in `text`, or None.

    Thousands commas ("1,234"), signs (also the Unicode minus), decimals, exponents and a
    trailing percent sign are read; "45%" is (45.0, True).
    """
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    value = float(match.group("num").replace(",", "") + (match.group("exp") or ""))
    if match.group("sign") == "-":
        value = -value
    return value, bool(match.group("pct"))


def _numbers_match(pred: Tuple[float, bool], ref: Tuple[float, bool], tolerance: float) -> bool:
    """Return whether two parsed numbers agree within tolerance (percent-aware)."""
    (pred_value, pred_pct), (ref_value, ref_pct) = pred, ref
    readings = [pred_value]
    if pred_pct and not ref_pct:
        readings.append(pred_value / 100.0)  # "45%" answers a reference of 0.45
    elif ref_pct and not pred_pct:
        readings.append(pred_value * 100.0)  # 0.45 answers a reference of "45%"
    scale = abs(ref_value) if abs(ref_value) >= 1.0 else 1.0
    return any(abs(value - ref_value) <= tolerance * scale + 1e-12 for value in readings)


# ----------------------------------------------------------------------------- accuracy


def accuracy_reward(
    response: str,
    answer: str,
    kind: str = "choice",
    options: Options = None,
    tolerance: float = 1e-2,
    judge: Optional[Judge] = None,
) -> float:
    """Return 1.0 when the response's answer matches the reference `answer`, else 0.0.

    The prediction is the last `<answer>` block of `response`, or the whole response when
    there is none. kind:
    - `choice`: `extract_choice` of both sides (with `options`) name the same letter;
    - `number`: the first numbers agree within relative `tolerance` (absolute when
      |reference| < 1); commas, signs, decimals and percent are understood;
    - `text`: `normalize_text` of both sides are equal;
    - `judge`: `judge(prediction, reference)`, a float in [0, 1], is returned as is.
    Raises ValueError for an unknown kind, a missing judge, or a reference that cannot be
    read as that kind (a data error the caller should log, not a wrong rollout).
    """
    prediction = extract_answer(response)
    if prediction is None:
        prediction = response.strip()

    if kind == "choice":
        reference = extract_choice(answer, options)
        if reference is None:
            raise ValueError(f"reference answer {answer!r} does not name one option letter")
        return float(extract_choice(prediction, options) == reference)
    if kind == "number":
        reference_number = _parse_number(answer)
        if reference_number is None:
            raise ValueError(f"reference answer {answer!r} contains no number")
        predicted_number = _parse_number(prediction)
        if predicted_number is None:
            return 0.0
        return float(_numbers_match(predicted_number, reference_number, tolerance))
    if kind == "text":
        reference_text = normalize_text(answer)
        if not reference_text:
            raise ValueError(f"reference answer {answer!r} is empty after normalisation")
        return float(normalize_text(prediction) == reference_text)
    if kind == "judge":
        if judge is None:
            raise ValueError("kind='judge' needs a judge callable: judge(prediction, reference)")
        score = float(judge(prediction, answer))
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"judge returned {score}, outside [0, 1]")
        return score
    raise ValueError(
        f"unknown accuracy kind {kind!r}; expected one of {', '.join(ACCURACY_KINDS)}"
    )


def combined_reward(
    response: str,
    answer: str,
    kind: str = "choice",
    options: Options = None,
    format_weight: float = 0.5,
    accuracy_weight: float = 1.0,
    judge: Optional[Judge] = None,
) -> Dict[str, float]:
    """Return {"format", "accuracy", "total"} with total = weighted sum of the two."""
    fmt = format_reward(response)
    acc = accuracy_reward(response, answer, kind=kind, options=options, judge=judge)
    return {"format": fmt, "accuracy": acc, "total": format_weight * fmt + accuracy_weight * acc}
