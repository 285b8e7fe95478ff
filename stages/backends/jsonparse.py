"""Pull the JSON out of a reasoning model's reply.

Reasoning models think aloud before answering, wrap answers in code fences, and write
JSON that is almost right. In order of preference the answer is: the last ```json fenced
block, else the last balanced top-level `{...}` / `[...]` that parses. `<think>` blocks
are ignored, as is everything up to a stray `</think>` (templates that open the think
block in the prompt). Repairs tried, each only if the text does not parse as it is:
trailing commas, then typographic double quotes used as JSON quotes.
"""

from __future__ import annotations

import json
import re
from typing import Any

from stages.backends.base import one_line

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n`]*\n?(.*?)```", re.DOTALL)
_SMART_DOUBLE = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"'})
_PAIRS = {"{": "}", "[": "]"}


class ReplyParseError(ValueError):
    """A reply with no usable JSON; the message is one line saying why."""


def parse_json_reply(text: str | None) -> dict | list:
    """The JSON object or list a model's reply `text` contains."""
    if text is None or not text.strip():
        raise ReplyParseError("empty reply")
    body = strip_think(text)

    fenced = [m.group(2) for m in _FENCE.finditer(body) if m.group(1).lower() in ("json", "json5", "jsonc")]
    if not fenced:
        fenced = [m.group(2) for m in _FENCE.finditer(body) if m.group(2).lstrip()[:1] in ("{", "[")]
    candidates = list(reversed(fenced)) + list(reversed(balanced_spans(body)))
    if not candidates:
        raise ReplyParseError("no JSON object found")

    first_error: str | None = None
    for candidate in candidates:
        try:
            value = _loads_tolerant(candidate)
        except ValueError as exc:
            first_error = first_error or one_line(str(exc))
            continue
        if isinstance(value, (dict, list)):
            return value
        first_error = first_error or f"expected an object or a list, got {type(value).__name__}"
    raise ReplyParseError(f"invalid JSON: {first_error}")


def strip_think(text: str) -> str:
    """`text` without its `<think>...</think>` reasoning."""
    text = _THINK_BLOCK.sub("", text)
    lowered = text.lower()
    # An answer after a stray closing tag: the opening tag was in the prompt.
    close = lowered.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>"):]
        lowered = text.lower()
    # An opening tag never closed: keep the text, the answer may still follow the reasoning.
    open_ = lowered.find("<think>")
    if open_ >= 0:
        text = text[:open_] + text[open_ + len("<think>"):]
    return text


def balanced_spans(text: str) -> list[str]:
    """Every balanced top-level `{...}` / `[...]` in `text`, in order.

    Quotes count only inside brackets, so prose around the JSON cannot open a string;
    inside, strings and their escapes are skipped. A closer that does not match drops
    the span being scanned; an opener never closed is skipped and scanning resumes
    just after it (the JSON may follow a stray brace or a truncated draft).
    """
    spans: list[str] = []
    pos = 0
    while pos < len(text):
        stack: list[str] = []
        start = 0
        in_string = False
        escaped = False
        for i in range(pos, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
                continue
            if ch in _PAIRS:
                if not stack:
                    start = i
                stack.append(_PAIRS[ch])
            elif not stack:
                continue
            elif ch == '"':
                in_string = True
            elif ch in ("}", "]"):
                if ch != stack[-1]:
                    stack.clear()
                    continue
                stack.pop()
                if not stack:
                    spans.append(text[start : i + 1])
        if not stack:
            break
        pos = start + 1
    return spans


def _loads_tolerant(candidate: str) -> Any:
    candidate = candidate.strip()
    try:
        return json.loads(candidate, strict=False)
    except ValueError as exc:
        first = exc
    repaired = _drop_trailing_commas(candidate)
    for attempt in (repaired, _drop_trailing_commas(candidate.translate(_SMART_DOUBLE))):
        try:
            return json.loads(attempt, strict=False)
        except ValueError:
            pass
    raise first


def _drop_trailing_commas(text: str) -> str:
    """`text` without commas that directly precede a `}` or `]` (strings left alone)."""
    out: list[str] = []
    in_string = False
    escaped = False
    pending_comma: int | None = None
    for ch in text:
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == ",":
            pending_comma = len(out)
        elif ch in "}]" and pending_comma is not None:
            del out[pending_comma]
            pending_comma = None
        elif not ch.isspace():
            pending_comma = None
        if ch == '"':
            in_string = True
        out.append(ch)
    return "".join(out)
