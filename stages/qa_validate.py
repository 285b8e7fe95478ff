"""Validation of generate-qa replies: items, options, answers, reasoning, near-duplicates.

Every check raises `QAInvalid` with a one-line message naming the item and the field, which
generate-qa appends to its retry prompt and, after `qa.max_attempts`, to `errors.jsonl`.
A reply cut off mid-JSON (the model ran out of `max_tokens`) is told apart from a short but
whole reply: the tolerant parser would read one inner item out of it, so its complete items
are counted instead, and fewer than asked for is an invalid reply (`reply has 1 of 2 items`).
A whole reply with fewer items than asked (the model had no more) is kept as it is.
"""

from __future__ import annotations

import json
import re

from stages.backends.jsonparse import balanced_spans, parse_json_reply, strip_think

LETTERS = ("A", "B", "C", "D")
_ANSWER = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*(?:[.:)]|\s|$)")
_CONCLUSION = re.compile(r"answer is\W{0,3}([A-Z])\b", re.IGNORECASE)
_OPTION_PREFIX = re.compile(r"^\s*\(?[A-Da-d][.):]\s+")
_CLOSERS = {"{": "}", "[": "]"}


class QAInvalid(ValueError):
    """A reply that does not hold valid items; the message is one line naming the item and field."""


# -- replies cut off -----------------------------------------------------------------------------
def cut_off(body: str) -> bool:
    """Whether a reply (think block removed) stops mid-JSON: a code fence or a bracket left open."""
    if body.count("```") % 2:
        return True
    stack: list[str] = []
    in_string = escaped = False
    for ch in body:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
        elif not stack:
            continue  # quotes in prose around the JSON open no string
        elif ch == '"':
            in_string = True
        elif ch in "}]":
            if ch != stack[-1]:
                stack.clear()
            else:
                stack.pop()
    return bool(stack)


def complete_items(body: str) -> list[dict]:
    """The items (objects with a "question") a reply holds whole, in order."""
    items: list[dict] = []
    for span in balanced_spans(body):
        try:
            value = json.loads(span, strict=False)
        except ValueError:
            continue
        if isinstance(value, dict) and "question" not in value:
            value = value.get("questions", value.get("items"))
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict) and "question" in item:
                items.append(item)
    return items


def parse_items_reply(text: str | None, n: int):
    """The JSON of a reply asked for `n` items; raise QAInvalid when it was cut off before its `n`th."""
    body = strip_think(text or "")
    if not cut_off(body):
        return parse_json_reply(text)
    items = complete_items(body)
    if len(items) < n:
        raise QAInvalid(f"reply has {len(items)} of {n} items (cut off)")
    return {"questions": items}


# -- items ---------------------------------------------------------------------------------------
def normalise_options(raw) -> dict[str, str]:
    if isinstance(raw, list):
        if len(raw) != 4:
            raise QAInvalid(f"options: expected 4 (A-D), got {len(raw)}")
        raw = {letter: _OPTION_PREFIX.sub("", str(text)) for letter, text in zip(LETTERS, raw)}
    if not isinstance(raw, dict):
        raise QAInvalid("options: expected an object {A, B, C, D}")
    options = {str(k).strip().strip(".").upper(): " ".join(str(v).split()) if v is not None else ""
               for k, v in raw.items()}
    if len(raw) != 4 or sorted(options) != list(LETTERS):
        raise QAInvalid(f"options: expected exactly A, B, C, D, got {len(raw)}: {', '.join(map(str, raw))}")
    for letter in LETTERS:
        if not options[letter]:
            raise QAInvalid(f"options: {letter} is empty")
    if len({v.casefold() for v in options.values()}) != 4:
        raise QAInvalid("options: not distinct")
    return {letter: options[letter] for letter in LETTERS}


def normalise_answer(raw, options: dict[str, str]) -> str:
    text = " ".join(str(raw).split()) if raw is not None else ""
    m = _ANSWER.match(text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    for letter, option in options.items():
        if text.casefold() == option.casefold():
            return letter
    raise QAInvalid(f"answer {text!r} is not one of {', '.join(options)}")


def check_reasoning(reasoning, answer: str) -> str:
    """The reasoning, stripped; raise QAInvalid when empty or when it concludes another letter."""
    if not isinstance(reasoning, str) or not reasoning.strip():
        raise QAInvalid("reasoning: empty")
    for letter in _CONCLUSION.findall(reasoning):
        if letter.upper() != answer:
            raise QAInvalid(f"reasoning concludes {letter.upper()} but the answer is {answer}")
    return reasoning.strip()


def validate_reply(value, n: int, n_clips: int) -> list[dict]:
    """The first `n` items of a parsed reply, normalised; raise QAInvalid naming the first problem."""
    items = value.get("questions", value.get("items")) if isinstance(value, dict) else value
    if isinstance(value, dict) and items is None and "question" in value:
        items = [value]
    if not isinstance(items, list):
        raise QAInvalid('expected a list of items under "questions"')
    if not items:
        raise QAInvalid("no questions in the reply")
    out = []
    for i, item in enumerate(items[:n], 1):
        try:
            if not isinstance(item, dict):
                raise QAInvalid("not an object")
            question = item.get("question")
            if not isinstance(question, str) or not question.strip():
                raise QAInvalid("question: empty")
            options = normalise_options(item.get("options"))
            answer = normalise_answer(item.get("answer"), options)
            reasoning = check_reasoning(item.get("reasoning"), answer)
        except QAInvalid as exc:
            raise QAInvalid(f"item {i}: {exc}") from None
        clips = item.get("source_clips")
        if isinstance(clips, list):
            clips = sorted({c for c in clips if isinstance(c, int) and 0 <= c < n_clips})
        else:
            clips = None
        out.append({"question": " ".join(question.split()), "options": options, "answer": answer,
                    "reasoning": reasoning, "source_clips": clips})
    return out


def validate_refined(value, answer: str, options: dict[str, str]) -> str:
    """The rewritten reasoning of a refine reply; raise QAInvalid when it is unusable."""
    reasoning = value.get("reasoning") if isinstance(value, dict) else None
    reasoning = check_reasoning(reasoning, answer)
    if not _CONCLUSION.search(reasoning) and options[answer].casefold() not in reasoning.casefold():
        raise QAInvalid(f"reasoning does not reach the answer {answer}")
    return reasoning


# -- near-duplicates -------------------------------------------------------------------------------
def question_tokens(question: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", question.casefold()))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate(tokens: frozenset, kept: list[frozenset], threshold: float) -> bool:
    return any(jaccard(tokens, other) >= threshold for other in kept)
