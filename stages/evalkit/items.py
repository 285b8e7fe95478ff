"""Eval sets as `EvalItem`s: read a file (JSONL, a JSON array, or parquet), tell each record's
layout (`data.format`, or detected per record), read it with its layout's module in
`stages/evalkit/formats/` (LongVideo-Reason, VideoMME, LongVideoBench, MLVU, or any layout
through `[eval.fields]`).

A record that does not fit (no options or only one, an answer that names no option, a
duplicate key, a video name found twice under `data.video_dir`) goes to `on_error(where,
reason)` and is left out; an input file without a single record is refused outright
(`EmptyEvalSetError`): an empty eval set is a mistake, not an accuracy of 0 out of 0.
"""

from __future__ import annotations

import glob
from dataclasses import replace
from pathlib import Path
from typing import Callable

from stages.data.records import RecordError, iter_records
from stages.evalkit.formats import READERS, UNDETECTED, detect
from stages.evalkit.formats.base import EvalItem, ReadContext, options_dict  # noqa: F401 (re-exported)

# Reported as by_<field> when the rows carry them, in this order; a layout's other groups
# (`[eval.fields]` groups) follow, named by each row's `group_by`.
GROUP_FIELDS = ("category", "duration", "task_type", "domain", "duration_group", "question_category",
                "question_type")
SUBTITLED_SUFFIX = " +subtitles"  # the key of an item's with-subtitles reading


class EmptyEvalSetError(RecordError):
    """An eval input without records (an empty file, only blank lines, a glob matching no file):
    a bad input, exit 2."""


def read_rows(path: Path, on_error: Callable[[str, str], None]) -> list[tuple[str, dict]]:
    """`(where, record)` of a JSONL file, a JSON array or a parquet file (`where` is
    `path:line`, a parquet row's number for parquet); raise `EmptyEvalSetError` when it holds
    no record and no malformed line either (empty, or only blank lines)."""
    malformed = []

    def bad(where: str, why: str) -> None:
        malformed.append(where)
        on_error(where, why)

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [(f"{path}:{i}", rec) for i, rec in enumerate(pq.read_table(path).to_pylist(), 1)]
    else:
        rows = [(f"{path}:{line}", rec) for line, rec in
                iter_records(path, on_error=lambda line, why: bad(f"{path}:{line}", why))]
    if not rows and not malformed:
        raise EmptyEvalSetError(f"data.input: {path} holds no records (empty, or only blank lines)")
    return rows


def with_subtitles(items: list[EvalItem]) -> list[EvalItem]:
    """The with-subtitles reading of every item whose layout has subtitles (VideoMME): the same
    question and video, its key + `SUBTITLED_SUFFIX`."""
    return [replace(it, key=it.key + SUBTITLED_SUFFIX, subtitled=True) for it in items if it.format == "videomme"]


def load_items(data, on_error: Callable[[str, str], None], fields=None, subtitles: bool = False) -> list[EvalItem]:
    """The items of `data.input` (a file or a glob) in file order, first `data.limit` records;
    bad records and duplicate keys go to `on_error(where, reason)` and are left out. `fields`
    (`[eval.fields]`) maps a layout lvr does not know; `subtitles` (`eval.subtitles`) adds every
    VideoMME item's with-subtitles reading after the items (`with_subtitles`)."""
    files = sorted(glob.glob(data.input)) if any(c in data.input for c in "*?[") else [data.input]
    if not files:
        raise EmptyEvalSetError(f"data.input: {data.input}: no file matches")
    rows = [row for f in files for row in read_rows(Path(f), on_error)]
    rows = rows[:data.limit] if data.limit else rows
    items, seen = [], set()
    for where, rec in rows:
        ctx = ReadContext(Path(data.video_dir) if data.video_dir else Path(where.rsplit(":", 1)[0]).parent,
                          fields, subtitles)
        fmt = "fields" if fields is not None else detect(rec) if data.format == "auto" else data.format
        try:
            if fmt is None:
                raise RecordError(UNDETECTED)
            item = READERS[fmt](rec, ctx, where)
            if item.key in seen:
                raise RecordError(f"duplicate key {item.key!r}")
        except (RecordError, KeyError, TypeError) as e:
            on_error(where, f"{type(e).__name__}: {e}")
            continue
        seen.add(item.key)
        items.append(item)
    return items + (with_subtitles(items) if subtitles else [])
