"""Find a record's video under `data.video_dir` the way released archives lay them out.

Benchmarks name videos relative to a folder they assume (`longvila_videos/<name>.mp4`,
`<videoID>.mp4`, `1_plotQA/<name>.mp4`), but their archives often extract elsewhere: the
ten LongVideo-Reason eval shards extract into `longvideo_eval_subset<N>/` folders, VideoMME
into `data/`. So a relative path that does not exist under `video_dir` is looked up by its
file name (or, for an id without an extension, its stem) in an index of every video below
`video_dir`, built once per folder by one recursive walk. A name found in two places is an
error naming both, never a silent pick.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from stages.data.records import RecordError

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".3gp"})


class AmbiguousVideoError(RecordError):
    """A video name that more than one file under `video_dir` carries."""


class VideoIndex:
    """Every video file below `root` by file name and by stem (lower-cased suffix check)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.by_name: dict[str, list[str]] = {}
        self.by_stem: dict[str, list[str]] = {}
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                p = Path(folder) / f
                if p.suffix.lower() in VIDEO_SUFFIXES:
                    self.by_name.setdefault(f, []).append(str(p))
                    self.by_stem.setdefault(p.stem, []).append(str(p))

    def find(self, name: str, by_stem: bool = False, folder_hint: str | None = None) -> str | None:
        """The one file named `name` (or with stem `name`), None when there is none; of several,
        the one whose folder's name ends with `folder_hint` (MLVU's `video/<N>_<task>/`), else
        raise `AmbiguousVideoError`."""
        hits = (self.by_stem if by_stem else self.by_name).get(name, [])
        hinted = [h for h in hits if folder_hint and Path(h).parent.name.endswith(folder_hint)]
        hits = hinted if len(hinted) == 1 else hits
        if len(hits) > 1:
            shown = ", ".join(hits[:3]) + (f" and {len(hits) - 3} more" if len(hits) > 3 else "")
            raise AmbiguousVideoError(f"video {name!r} is ambiguous under {self.root}: {shown}")
        return hits[0] if hits else None


@lru_cache(maxsize=16)
def video_index(root: str) -> VideoIndex:
    """The index of `root`, walked once per process."""
    return VideoIndex(root)


def find_video(video_dir: str | Path, ref: str | Path, stem: str | None = None,
               folder_hint: str | None = None) -> Path:
    """The file a record's video `ref` names: itself when absolute, `video_dir/ref` when it
    exists, else the one video below `video_dir` with `ref`'s file name (or, given `stem`,
    with that stem and any video suffix; `folder_hint`: see `VideoIndex.find`). Not found:
    `video_dir/ref`, whose decoding then fails naming it. Raises `AmbiguousVideoError` for a
    name found twice."""
    ref = Path(ref)
    direct = ref if ref.is_absolute() else Path(video_dir) / ref
    if ref.is_absolute() or direct.exists() or not Path(video_dir).is_dir():
        return direct
    index = video_index(str(Path(video_dir).resolve()))
    found = index.find(ref.name, folder_hint=folder_hint) or (
        index.find(stem, by_stem=True, folder_hint=folder_hint) if stem else None)
    return Path(found) if found else direct
