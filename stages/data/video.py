"""Video input: probe frame times, sample frames by time, decode (decord, PyAV fallback),
resize, cut into clips.

Frames are chosen by presentation time, never by `time * average fps`: `probe` reads every
frame's timestamp from the container's packets (nothing is decoded), and a frame "at t" is
the one on screen at t (the last frame starting at or before t). A variable-frame-rate file
(a phone recording, a screen capture) therefore gets the frames and times it shows; for a
constant-rate file this picks the same frames as index arithmetic did.

Decoding uses decord for the containers it indexes exactly (`DECORD_FORMATS`) when it opens
the file and counts the same frames; otherwise PyAV (AV1, which decord's FFmpeg cannot
decode; MPEG-TS; AVI), which decodes each frame at most once: it seeks to the keyframe before
a wanted frame when that skips frames, decodes forward and stops after the last wanted frame.

Every failure to read a video raises `VideoDecodeError`, whose message names the file and
the reason on one line, so a stage can record it in `errors.jsonl` and carry on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# Containers (FFmpeg demuxer names) whose frames decord returns at the right index. Measured with
# sparse reads of 300-frame files: from MPEG-TS, MPEG-PS (.mpg) and AVI with B-frames it returned
# frames up to 40 positions away (its seek lands elsewhere), so those go to PyAV.
DECORD_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "flv"})

# Frame times are exact to the stream's time-base tick (one float rounding); a requested time
# this close before a frame's start counts as on it, so rounding never moves a pick back a frame.
TIME_TOLERANCE_S = 1e-9


class VideoDecodeError(Exception):
    """A video that cannot be read: the message is `<path>: <reason>`."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, eq=False)
class VideoInfo:
    """What `probe` learns from a video's packets, without decoding it."""

    path: str
    container: str  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    num_frames: int
    fps: float  # average: num_frames / duration_s (the nominal rate of a constant-rate file)
    width: int
    height: int
    duration_s: float  # end of the last frame (its start plus its packet duration)
    frame_times_s: np.ndarray  # [num_frames] float64, start of each frame, from the first, ascending
    stream_pts: np.ndarray | None  # [num_frames] int64 in the stream's time base; None: frames known by order only
    keyframe: np.ndarray  # [num_frames] bool: a decoder can start at this frame

    def frame_at(self, t_s: float) -> int:
        """Index of the frame on screen at `t_s` seconds."""
        return frame_at(self.frame_times_s, t_s)

    def sample(self, max_frames: int, fps: float | None = None, start_s: float = 0.0,
               end_s: float | None = None) -> list[int]:
        """Indices of the frames on screen at evenly spaced times of [start_s, end_s) (see `pick_frames`)."""
        return pick_frames(self.frame_times_s, self.duration_s, max_frames, fps, start_s, end_s)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoDecodeError(path, "no such file")
    if path.is_dir():
        raise VideoDecodeError(path, "is a directory, not a video")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _video_stream(container, path: Path):
    """The stream a player would show (ffmpeg's best video stream: not a cover picture), as decord picks."""
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    return container.streams.best("video")


# -- probe: frame times from packets ---------------------------------------------------------------
def probe(path) -> VideoInfo:
    """Return every frame's time, the duration, average fps and size of a video, read from its
    packets without decoding; raise `VideoDecodeError`."""
    import av

    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stamps, durations, keys = [], [], []
            for packet in container.demux(stream):
                if packet.size == 0:  # the empty packet that flushes the decoder at the end
                    continue
                stamps.append(packet.pts if packet.pts is not None else packet.dts)
                durations.append(packet.duration or 0)
                keys.append(packet.is_keyframe)
            time_base = stream.time_base or Fraction(1, av.time_base)
            rate = stream.average_rate or stream.guessed_rate
            context = stream.codec_context
            head = (str(path), container.format.name)
            size, reorders = (int(context.width), int(context.height)), bool(context.has_b_frames)
    except VideoDecodeError:
        raise
    except Exception as e:
        raise VideoDecodeError(path, f"not a readable video ({_first_line(e)})") from None
    if not stamps:
        raise VideoDecodeError(path, "zero-length video (no frames)")
    keys = np.asarray(keys, dtype=bool)
    if any(s is None for s in stamps):  # a raw elementary stream: frames only have an order and a rate
        if not rate or rate <= 0:
            raise VideoDecodeError(path, f"no timestamps and no frame rate ({rate})")
        n = len(stamps)
        return VideoInfo(*head, n, float(rate), *size, n / float(rate), np.arange(n) / float(rate), None, keys)
    stamps = np.asarray(stamps, dtype=np.int64)
    order = np.argsort(stamps, kind="stable")  # decode -> presentation order
    pts = stamps[order]
    # the last frame lasts its packet's duration, else as long as the one before it, else 1 / rate
    last_ticks = durations[order[-1]] or (int(pts[-1] - pts[-2]) if len(pts) > 1 else 0)
    if not last_ticks and rate:
        last_ticks = round(1 / (rate * time_base))
    duration = Fraction(int(pts[-1] - pts[0]) + last_ticks) * time_base
    if duration <= 0:
        raise VideoDecodeError(path, f"invalid duration {float(duration)} s")
    # one rounding per time: ticks * numerator is exact, the division rounds once
    times = (pts - pts[0]).astype(np.float64) * time_base.numerator / time_base.denominator
    # B-frames yet stamps never falling in decode order (AVI): the stamps count frames but do not name
    # them, so its decoded frames are placed by order, never by pts (stream_pts None)
    named = not (reorders and bool(np.all(np.diff(stamps) >= 0)))
    return VideoInfo(*head, len(pts), float(len(pts) / duration), *size, float(duration), times,
                     pts if named else None, keys[order])


# -- sampling by time ------------------------------------------------------------------------------
def frame_at(frame_times_s, t_s: float) -> int:
    """Index of the frame on screen at `t_s`: the last one starting at or before it (0 before the first)."""
    return max(0, int(np.searchsorted(frame_times_s, t_s + TIME_TOLERANCE_S, side="right")) - 1)


def pick_frames(frame_times_s, duration_s: float, max_frames: int, fps: float | None = None,
                start_s: float = 0.0, end_s: float | None = None) -> list[int]:
    """Return the indices of the frames on screen at evenly spaced times of [start_s, end_s).

    The times are the centres of equal segments of the span the window's frames cover (from
    the start of the one on screen at `start_s` to the end of the last one starting before
    `end_s`): one per `1 / fps` seconds when `fps` is given, else one per frame, capped by
    `max_frames` and by the number of those frames. On a constant-rate file this is the index
    arithmetic `first + (i + 0.5) * frames / want`; where the rate varies, a frame held on
    screen longer than the spacing is picked at each time it is shown.
    """
    times = np.asarray(frame_times_s, dtype=np.float64)
    lo, hi = max(0.0, start_s), duration_s if end_s is None else min(end_s, duration_s)
    if hi <= lo or len(times) == 0:
        return []
    first = frame_at(times, lo)
    stop = int(np.searchsorted(times, hi - TIME_TOLERANCE_S, side="left"))  # frames starting before hi
    if stop <= first:
        return []
    t0, t1 = times[first], (times[stop] if stop < len(times) else duration_s)
    want = stop - first if fps is None else max(1, round((t1 - t0) * fps))
    want = min(want, max_frames, stop - first)
    at = t0 + (np.arange(want) + 0.5) * ((t1 - t0) / want)
    return [max(0, int(i) - 1) for i in np.searchsorted(times, at + TIME_TOLERANCE_S, side="right")]


def sample_indices(num_frames: int, native_fps: float, max_frames: int,
                   fps: float | None = None, start_s: float = 0.0, end_s: float | None = None) -> list[int]:
    """`pick_frames` for a constant-rate video of `num_frames` at `native_fps`."""
    times = np.arange(num_frames, dtype=np.float64) / native_fps
    return pick_frames(times, num_frames / native_fps, max_frames, fps, start_s, end_s)


# -- decoding --------------------------------------------------------------------------------------
def read_frames(path, indices: list[int], info: VideoInfo | None = None) -> np.ndarray:
    """Return the frames at `indices` (positions in `probe`'s time order) as uint8 `[T, H, W, 3]`;
    raise `VideoDecodeError`. `info` saves a second probe when the caller has one."""
    path = Path(path)
    _check_file(path)
    if not indices:
        raise VideoDecodeError(path, "no frames selected")
    info = info or probe(path)
    if max(indices) >= info.num_frames:
        raise VideoDecodeError(path, f"truncated: frame {max(indices)} of {info.num_frames} requested")
    frames = _read_frames_decord(path, indices, info.num_frames) if info.container in DECORD_FORMATS else None
    return frames if frames is not None else _read_frames_av(path, indices, info)


def _read_frames_decord(path: Path, indices: list[int], num_frames: int) -> np.ndarray | None:
    """The frames, or None when decord cannot open the file (e.g. AV1: its FFmpeg has no decoder) or
    counts other frames than the packets (then its frame i need not be `probe`'s frame i)."""
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except Exception:  # decord raises its own DECORDError and RuntimeError
        return None
    if len(reader) != num_frames:
        return None
    try:
        return reader.get_batch(indices).asnumpy()
    except Exception as e:  # a stream that breaks mid-way
        raise VideoDecodeError(path, f"decode failed ({_first_line(e)})") from None


def _decoded_from(container, stream, info: VideoInfo, keyframe_index: int | None):
    """Yield `(index, frame)` in time order, after seeking to the keyframe `keyframe_index`
    (None: on from where the demuxer is)."""
    if keyframe_index is not None:
        container.seek(int(info.stream_pts[keyframe_index]), stream=stream)  # backward: lands on or before it
    index = (keyframe_index or 0) - 1
    for packet in container.demux(stream):
        for frame in packet.decode():
            if info.stream_pts is None or frame.pts is None:
                index += 1  # frames known by order only (counted from the start: never sought)
            else:
                index = max(0, int(np.searchsorted(info.stream_pts, frame.pts, side="right")) - 1)
            yield index, frame


def _starts_for(keyframes: np.ndarray, target: int, last: int) -> list[int | None]:
    """Where to decode `target` from: `[None]` to decode on from the frame `last`, else the keyframes
    to seek to, nearest first, then the first frame (a demuxer such as MPEG-TS's may seek past it)."""
    j = int(np.searchsorted(keyframes, target, side="right"))
    if last < target and (int(keyframes[j - 1]) if j else 0) <= last + 1:
        return [None]  # no keyframe between here and the target: seeking would skip nothing
    return list(dict.fromkeys(keyframes[max(0, j - 2):j][::-1].tolist() + [0]))


def _read_frames_av(path: Path, indices: list[int], info: VideoInfo) -> np.ndarray:
    """The frames at `indices`, decoded by PyAV in one forward pass that seeks over the frames
    nobody wants and stops after the last wanted one."""
    import av

    wanted = sorted(set(indices))
    pending, got = set(wanted), {}
    keyframes = np.flatnonzero(info.keyframe)
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            frames, last = _decoded_from(container, stream, info, None), -1  # last: the decoder's position
            for target in wanted:
                starts = [None] if info.stream_pts is None else _starts_for(keyframes, target, last)
                for start in starts:
                    if start is not None:
                        frames = _decoded_from(container, stream, info, start)
                    for index, frame in frames:
                        last = index
                        if index in pending:
                            got[index] = frame.to_ndarray(format="rgb24")
                        if index >= target:
                            break
                    if target in got:
                        break
    except VideoDecodeError:
        raise
    except Exception as e:  # a stream that breaks mid-way
        raise VideoDecodeError(path, f"decode failed ({_first_line(e)})") from None
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
    """Decode, sample (by time) and resize one video or a time window of it for a model's patch
    grid; `timestamps_s` are the chosen frames' own times."""
    info = probe(path)
    idx = info.sample(max_frames, fps, start_s, end_s)
    if not idx:
        raise VideoDecodeError(path, f"no frames in [{start_s}, {end_s}) s")
    raw = read_frames(path, idx, info)
    h, w = fit_size(raw.shape[1], raw.shape[2], factor, max_pixels)
    frames = resize_frames(raw, h, w)
    times = [float(info.frame_times_s[i]) for i in idx]
    span = times[-1] - times[0]
    fps_sampled = (len(times) - 1) / span if len(times) > 1 and span > 0 else info.fps
    return SampledVideo(str(path), frames, times, fps_sampled)
