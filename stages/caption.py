"""`lvr caption`: cut long videos into clips and caption every clip with a VLM -> captions.jsonl.

The first step of the LongVideo-Reason pipeline (LongVILA-R1, Sec. 3.1): each video is cut
into consecutive `caption.clip_seconds` clips (the paper: ~10 s), `caption.frames_per_clip`
frames are sampled from each clip (uniformly, or at `video.fps` capped by frames_per_clip)
and sized to `video.max_pixels` on the Qwen patch grid, and the backend is asked for one
caption per clip. One record per video goes to `captions.jsonl`:
`{video_id, video, duration_s, fps, clips: [{index, start_s, end_s, caption}]}`.

Inputs (`data.input`): a folder (its videos, recursively, paths recorded relative to it),
a glob, or a JSONL list whose records name a video in `videos` (a list), `video` or
`path`; relative paths resolve against `data.video_dir` (default: the list's folder).

Exactly once: the key of a video is its path as given. A resumed run skips keys already in
`captions.jsonl`; a video that cannot be read, or with any clip whose request failed, goes
to `errors.jsonl` and is not written, so the next run (a resume, or `--retry-failed` of a
finished run) retries it. `errors.jsonl` lists the inputs failed now, each once (see
`RunDir.settle_errors`).

Sharded (`data.shard = "i/N"`, or one shard per process under torchrun/srun): the videos
whose key hashes to shard i, in `<output dir>/shard-i-of-N`; `lvr merge` joins the shards
(see `stages/shards.py`).

Departures from the paper: the captioner is whatever `backend` names (the paper used
NVILA-8B); `video.max_frames` is not used here (frames_per_clip is the per-request budget).
"""

from __future__ import annotations

import glob as globlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.backends.base import GenRequest, one_line
from stages.backends.factory import make_backend
from stages.backends.jsonparse import strip_think
from stages.data.records import done_keys, iter_jsonl
from stages.data.video import VideoDecodeError, cut_clips, fit_size, probe, read_frames, resize_frames
from stages.shards import Share

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ts"}
# Frames are sized on the Qwen2/2.5-VL grid; a backend with another grid re-fits them.
PATCH_FACTOR = 28
# Clips decoded and sent to the backend per call: bounds memory on hour-long videos.
CLIPS_PER_CALL = 16
OUTPUT = "captions.jsonl"


@dataclass(frozen=True)
class VideoInput:
    key: str  # the path as given: the record's `video` and the resume key
    path: Path  # where it is read from
    video_id: str


def fmt_ts(seconds: float) -> str:
    """mm:ss (h:mm:ss from an hour), rounded down to the second."""
    total = int(seconds + 1e-6)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def list_videos(data, on_error) -> list[VideoInput]:
    """The videos `data.input` names, in a stable order, each key once.

    on_error(key, reason) receives list lines that name no video.
    """
    source = Path(data.input)
    found: list[VideoInput] = []
    if any(ch in data.input for ch in "*?["):
        for name in sorted(globlib.glob(data.input, recursive=True)):
            path = Path(name)
            if path.is_file():
                found.append(VideoInput(name, path, path.stem))
    elif source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
                rel = path.relative_to(source)
                found.append(VideoInput(rel.as_posix(), path, rel.with_suffix("").as_posix().replace("/", "__")))
    else:
        base = Path(data.video_dir) if data.video_dir else source.parent
        if source.suffix == ".txt":
            lines = [(i, {"video": ln.strip()}) for i, ln in enumerate(source.read_text().splitlines(), 1)
                     if ln.strip() and not ln.lstrip().startswith("#")]
        else:
            lines = iter_jsonl(source, on_error=lambda n, reason: on_error(f"{source}:{n}", reason))
        for lineno, rec in lines:
            names = rec.get("videos") or rec.get("video") or rec.get("path")
            names = [names] if isinstance(names, str) else names
            if not names or not all(isinstance(n, str) and n for n in names):
                on_error(f"{source}:{lineno}", "record names no video (expected 'videos', 'video' or 'path')")
                continue
            for name in names:
                path = Path(name) if Path(name).is_absolute() else base / name
                video_id = rec.get("video_id") if len(names) == 1 and rec.get("video_id") else Path(name).stem
                found.append(VideoInput(name, path, str(video_id)))
    seen: set[str] = set()
    unique = []
    for video in found:
        if video.key not in seen:
            seen.add(video.key)
            unique.append(video)
    return unique[: data.limit] if data.limit else unique


def caption_prompt(spec) -> str:
    return Path(spec.prompt_file).read_text().strip() if spec.prompt_file else spec.prompt


def clip_requests(video: VideoInput, info, clips, recipe, prompt: str) -> list[GenRequest]:
    """One caption request per clip, with the frames on screen at evenly spaced times of the clip
    (all clips' frames read in one pass)."""
    spec, vid = recipe.caption, recipe.video
    per_clip = [info.sample(spec.frames_per_clip, vid.fps, c.start_s, c.end_s) for c in clips]
    for clip, idx in zip(clips, per_clip):
        if not idx:
            raise VideoDecodeError(video.path, f"no frames in clip {clip.index} [{clip.start_s}, {clip.end_s}) s")
    wanted = sorted({i for idx in per_clip for i in idx})
    raw = read_frames(video.path, wanted, info)
    h, w = fit_size(raw.shape[1], raw.shape[2], PATCH_FACTOR, vid.max_pixels)
    frames = resize_frames(raw, h, w).permute(0, 2, 3, 1).numpy()
    row = {frame: k for k, frame in enumerate(wanted)}
    requests = []
    for clip, idx in zip(clips, per_clip):
        # frames taken at evenly spaced times of the clip: its sampling rate is frames per clip second
        fps = len(idx) / (clip.end_s - clip.start_s) if clip.end_s > clip.start_s else info.fps
        text = prompt.replace("{start}", fmt_ts(clip.start_s)).replace("{end}", fmt_ts(clip.end_s))
        content = [{"type": "video", "frames": [np.ascontiguousarray(frames[row[i]]) for i in idx], "fps": fps},
                   {"type": "text", "text": text}]
        requests.append(GenRequest(f"{video.key}#{clip.index}", [{"role": "user", "content": content}],
                                   max_tokens=recipe.backend.max_tokens, temperature=recipe.backend.temperature,
                                   seed=recipe.seed))
    return requests


def caption_video(video: VideoInput, recipe, backend, prompt: str) -> tuple[dict | None, str | None]:
    """`(record, None)` when every clip got a caption, else `(None, reason)`."""
    try:
        info = probe(video.path)
    except VideoDecodeError as exc:
        return None, str(exc)
    clips = cut_clips(info.duration_s, recipe.caption.clip_seconds, recipe.caption.min_last_clip_s)
    out = []
    for start in range(0, len(clips), CLIPS_PER_CALL):
        chunk = clips[start:start + CLIPS_PER_CALL]
        try:
            requests = clip_requests(video, info, chunk, recipe, prompt)
        except VideoDecodeError as exc:
            return None, str(exc)
        for clip, result in zip(chunk, backend.generate(requests)):
            caption = strip_think(result.text).strip() if result.ok else ""
            if not caption:
                reason = result.error if not result.ok else "empty caption"
                return None, one_line(f"clip {clip.index} [{clip.start_s}-{clip.end_s} s]: {reason}", 300)
            out.append({"index": clip.index, "start_s": clip.start_s, "end_s": clip.end_s, "caption": caption})
    record = {"video_id": video.video_id, "video": video.key, "duration_s": round(info.duration_s, 3),
              "fps": round(info.fps, 3), "clips": out}
    return record, None


def caption_todo(todo: list[VideoInput], recipe, run, done: set[str]) -> tuple[int, int]:
    """`(videos captioned, clips)`: each record appended as soon as its video is done, in order."""
    prompt = caption_prompt(recipe.caption)
    backend = make_backend(recipe.backend)
    captioned = clips = 0
    try:
        with run.progress("caption", total=len(todo)) as bar:
            for video in todo:
                record, reason = caption_video(video, recipe, backend, prompt)
                if record is None:
                    run.error(video.key, reason)
                else:
                    run.append(OUTPUT, record)
                    done.add(video.key)
                    captioned += 1
                    clips += len(record["clips"])
                bar.advance()
    finally:
        backend.close()
    return captioned, clips


def run(recipe, run) -> dict:
    """Caption every video of `recipe.data.input` not yet in `captions.jsonl`; return the summary.

    `failed` counts the inputs failed now (the keys `errors.jsonl` lists at the end): every
    input not in `captions.jsonl` is tried again, earlier failures included.
    """
    done = done_keys(run.file(OUTPUT), "video")
    run.settle_errors(done.__contains__)
    share = Share(recipe.data.shard)  # all videos, or those of shard i/N (stages/shards.py)
    listed = list_videos(recipe.data, share.errors(run.error))
    if run.is_main:
        share.note(run.path, [v.key for v in listed])
    videos = [v for v in listed if share.owns(v.key)]
    todo = [v for v in videos if v.key not in done]
    try:
        captioned, clips = caption_todo(todo, recipe, run, done) if todo else (0, 0)
    except BaseException:  # Ctrl-C or a crash: errors.jsonl still settles to what the outputs hold
        run.settle_errors(done.__contains__)
        raise
    # the listing and every video not done were tried: an older failure not recorded again is gone
    failed = run.settle_errors(done.__contains__, retried=lambda key: True)
    return {"videos": len(videos), "already_done": len(videos) - len(todo), "captioned": captioned,
            "done": sum(v.key in done for v in videos), "failed": len(failed), "clips": clips}
