"""VideoMME's with-subtitles protocol: the subtitle lines on screen at the sampled frames, put
before the question.

As lmms-eval's `videomme_w_subtitle` task does it (`videomme_doc_to_text_subtitle`): read the
video's `.srt`, keep each cue that some sampled frame falls in (start <= t < end), take the
text inside its `<font ...>` tag (VideoMME's cues carry one; any markup is dropped here), and
write "This video's subtitles are listed below:" then the kept lines, one per line, before
the question; a video without an `.srt` gets "No subtitles available". lmms-eval picks its
frames by index over the whole video; lvr uses the times of the frames it actually sampled
(`Sample.video.timestamps_s`), so the subtitles always match what the model saw. Its cues
come out in set order; here in time order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from stages.data.records import RecordError

SUBTITLE_HEADER = "This video's subtitles are listed below:"
NO_SUBTITLES = "No subtitles available"
_TIME = re.compile(r"(\d+):(\d{2}):(\d{2})[,.](\d{1,3})")
_MARKUP = re.compile(r"<[^>]+>")


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


def _seconds(stamp: str) -> float:
    m = _TIME.fullmatch(stamp.strip())
    if m is None:
        raise ValueError(stamp)
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


@lru_cache(maxsize=64)
def read_srt(path: str) -> tuple[Cue, ...]:
    """The cues of an `.srt` file, in file order; raise `RecordError` naming the file and the
    line of a cue whose times cannot be read."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise RecordError(f"{path}: cannot read the subtitles ({e.strerror})") from None
    cues, block = [], []
    for number, text in enumerate([*lines, ""], 1):
        if text.strip():
            block.append((number, text))
            continue
        at = next((i for i, (_, x) in enumerate(block) if "-->" in x), None)
        if at is not None:
            where, timing = block[at]
            start, _, end = timing.partition("-->")
            try:
                times = _seconds(start), _seconds((end.split() or [""])[0])
            except ValueError:
                raise RecordError(f"{path}:{where}: subtitle times {timing.strip()!r} are not "
                                  "HH:MM:SS,mmm --> HH:MM:SS,mmm") from None
            words = " ".join(_MARKUP.sub("", x) for _, x in block[at + 1:]).split()
            if words:
                cues.append(Cue(*times, " ".join(words)))
        block = []
    return tuple(cues)


def lines_at(cues: tuple[Cue, ...], times_s: list[float]) -> list[str]:
    """The text of every cue on screen at one of `times_s` (start <= t < end), in time order."""
    times = sorted(set(times_s))
    return [c.text for c in sorted(cues, key=lambda c: c.start_s)
            if any(c.start_s <= t < c.end_s for t in times)]


def subtitle_block(lines: list[str] | None) -> str:
    """The text that goes before the question: the header, then the lines (None: the video has
    no subtitle file)."""
    return SUBTITLE_HEADER + "\n" + ("\n".join(lines) if lines is not None else NO_SUBTITLES)


def item_sample(rt, item, frames: int):
    """`(Sample, subtitle lines)` of an eval item at a frame budget: its video sampled once, and
    for a with-subtitles reading the prompt rebuilt with the lines at the sampled frames (None
    for other items). Raises `VideoDecodeError`, or `RecordError` for unreadable subtitles."""
    sample = rt.sample(item.record(), key=item.key, max_frames=frames)
    if not item.subtitled:
        return sample, None
    lines = lines_at(read_srt(item.subtitles), sample.video.timestamps_s) if item.subtitles else None
    return rt.sample_of(item.record(subtitle_block(lines)), sample.video, item.key), len(lines or [])
