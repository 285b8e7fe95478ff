"""Video input: probe, decode (decord, PyAV fallback), sample frames, resize, cut into clips.

Every failure to read a video raises `VideoDecodeError`, whose message names the file and
the reason on one line, so a stage can record it in `errors.jsonl` and carry on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class VideoDecodeError(Exception):
    """A video that cannot be read: the message is `<path>: <reason>`."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(path, "no such file")
    if path.is_dir():
        raise VideoDecodeError(path, "is a directory, not a video")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")


def _decord_reader(path: Path):
    import decord

    try:
        return decord.VideoReader(str(path), num_threads=1)
    except Exception as e:  # decord raises its own DECORDError and RuntimeError
        raise VideoDecodeError(path, f"not a readable video ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def probe(path) -> VideoInfo:
    """Return frame count, fps and size of a video, or raise `VideoDecodeError`."""
    path = Path(path)
    _check_file(path)
    try:
        vr = _decord_reader(path)
        n, fps = len(vr), float(vr.get_avg_fps())
        h, w = vr[0].shape[:2] if n else (0, 0)
    except VideoDecodeError:
        n, fps, w, h = _probe_av(path)
    if n <= 0:
        raise VideoDecodeError(path, "zero-length video (no frames)")
    if not fps or not math.isfinite(fps) or fps <= 0:
        raise VideoDecodeError(path, f"invalid frame rate {fps}")
    return VideoInfo(str(path), n, fps, int(w), int(h))


def _probe_av(path: Path):
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoDecodeError(path, "no video stream")
            s = c.streams.video[0]
            n = sum(1 for _ in c.decode(s))
            return n, float(s.average_rate or 0), s.codec_context.width, s.codec_context.height
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"not a readable video ({_first_line(e)})") from None


def sample_indices(num_frames: int, native_fps: float, max_frames: int,
                   fps: float | None = None, start_s: float = 0.0, end_s: float | None = None) -> list[int]:
    """Return frame indices in [start_s, end_s): at `fps` if given (capped at `max_frames`),
    else `max_frames` spread uniformly (frame centres of equal segments)."""
    first = max(0, int(math.floor(start_s * native_fps)))
    last = num_frames if end_s is None else min(num_frames, int(math.ceil(end_s * native_fps)))
    span = last - first
    if span <= 0:
        return []
    want = span if fps is None else max(1, int(round(span / native_fps * fps)))
    want = min(want, max_frames, span)
    return [first + int((i + 0.5) * span / want) for i in range(want)]


def read_frames(path, indices: list[int]) -> np.ndarray:
    """Return the frames at `indices` as uint8 `[T, H, W, 3]`; raise `VideoDecodeError`."""
    path = Path(path)
    _check_file(path)
    if not indices:
        raise VideoDecodeError(path, "no frames selected")
    try:
        vr = _decord_reader(path)
        if max(indices) >= len(vr):
            raise VideoDecodeError(path, f"truncated: frame {max(indices)} of {len(vr)} requested")
        return vr.get_batch(indices).asnumpy()
    except VideoDecodeError as e:
        if "truncated" in e.reason:
            raise
        return _read_frames_av(path, indices)
    except Exception as e:  # a stream that breaks mid-way
        raise VideoDecodeError(path, f"decode failed ({_first_line(e)})") from None


def _read_frames_av(path: Path, indices: list[int]) -> np.ndarray:
    import av

    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise VideoDecodeError(path, "no video stream")
            for i, frame in enumerate(c.decode(c.streams.video[0])):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= wanted[-1]:
                    break
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"not a readable video ({_first_line(e)})") from None
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoDecodeError(path, f"truncated: frame {missing[0]} not decodable")
    return np.stack([got[i] for i in indices])


def fit_size(height: int, width: int, factor: int, max_pixels: int, min_pixels: int = 0) -> tuple[int, int]:
    """Return (H, W) near the input's aspect ratio, multiples of `factor`, within the pixel budget
    (the Qwen processors' `smart_resize`)."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resize_frames(frames: np.ndarray, height: int, width: int):
    """Return uint8 frames `[T, 3, height, width]` (torch) from `[T, H, W, 3]` numpy, bilinear."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if x.shape[-2:] == (height, width):
        return x.contiguous()
    y = F.interpolate(x.float(), size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Clip:
    index: int
    start_s: float
    end_s: float


def cut_clips(duration_s: float, clip_seconds: float, min_last_s: float = 0.0) -> list[Clip]:
    """Return consecutive clips of `clip_seconds` covering [0, duration_s]; the last may be
    shorter, and is merged into the previous one when shorter than `min_last_s`."""
    if clip_seconds <= 0:
        raise ValueError("clip_seconds must be positive")
    if duration_s <= 0:
        return []
    n = max(1, math.ceil(duration_s / clip_seconds - 1e-9))
    bounds = [min(duration_s, i * clip_seconds) for i in range(n)] + [duration_s]
    if n > 1 and bounds[-1] - bounds[-2] < min_last_s:
        bounds.pop(-2)
    return [Clip(i, round(bounds[i], 3), round(bounds[i + 1], 3)) for i in range(len(bounds) - 1)]


@dataclass
class SampledVideo:
    """Frames of one video ready for the patchifier, with what identifies the sampling."""

    path: str
    frames: "object"  # torch uint8 [T, 3, H, W]
    timestamps_s: list[float]
    fps_sampled: float

    @property
    def key(self) -> str:
        t = self.timestamps_s
        return f"{self.path}|{len(t)}|{t[0] if t else 0:.3f}-{t[-1] if t else 0:.3f}|{tuple(self.frames.shape)}"


def load_video(path, max_frames: int, factor: int, max_pixels: int, fps: float | None = None,
               start_s: float = 0.0, end_s: float | None = None) -> SampledVideo:
    """Decode, sample and resize one video (or a time window of it) for a model's patch grid."""
    info = probe(path)
    idx = sample_indices(info.num_frames, info.fps, max_frames, fps, start_s, end_s)
    if not idx:
        raise VideoDecodeError(path, f"no frames in [{start_s}, {end_s}) s")
    raw = read_frames(path, idx)
    h, w = fit_size(raw.shape[1], raw.shape[2], factor, max_pixels)
    frames = resize_frames(raw, h, w)
    times = [i / info.fps for i in idx]
    span = (times[-1] - times[0]) if len(times) > 1 else 1.0 / info.fps
    fps_sampled = (len(times) - 1) / span if len(times) > 1 and span > 0 else info.fps
    return SampledVideo(str(path), frames, times, fps_sampled)
