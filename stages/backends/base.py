"""Shared types of the text-generation backends used by the data stages.

A backend turns a batch of chat requests into texts. `caption` sends a video clip
(frames) and asks a VLM to describe it; `generate-qa` sends captions and asks a reasoning
LLM for JSON question/answer triples. One bad item never sinks a batch: it comes back
with `error` set, and the stage writes it to `errors.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

class BackendError(Exception):
    """A backend that cannot be built from its configuration (one-line message)."""


@dataclass
class GenRequest:
    """One chat completion to run.

    `messages` is in OpenAI chat format: `{"role": ..., "content": ...}` where content
    is a string or a list of parts, `{"type": "text", "text": ...}` or
    `{"type": "video", "frames": [HxWx3 uint8 arrays], "fps": float}`.
    """

    key: str
    messages: list[dict[str, Any]]
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    json_schema: dict[str, Any] | None = None


@dataclass
class GenResult:
    """What came back for one request: `text`, or `error` (one line) when it failed."""

    key: str
    text: str | None
    error: str | None = None
    latency_s: float = 0.0
    attempts: int = 0
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@runtime_checkable
class Backend(Protocol):
    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """Results in the order of `requests`; a failed item gets `error`, never raises."""
        ...

    def close(self) -> None: ...


def one_line(text: str, limit: int = 200) -> str:
    """`text` squeezed onto one line and cut to `limit` characters."""
    squeezed = " ".join(str(text).split())
    return squeezed if len(squeezed) <= limit else squeezed[: limit - 3] + "..."


def release_memory() -> None:
    """Give back what a closed model held (Python garbage, the CUDA cache)."""
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def map_video_parts(messages: list[dict[str, Any]], convert) -> list[dict[str, Any]]:
    """`messages` with every `{"type": "video"}` content part replaced by the list of parts
    `convert(part)` returns; other messages and parts are kept as they are."""
    out = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            is_video = isinstance(part, dict) and part.get("type") == "video"
            parts.extend(convert(part) if is_video else [part])
        out.append({**message, "content": parts})
    return out
