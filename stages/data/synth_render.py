"""Pixels for synthetic videos: shapes drawn with numpy, H.264 mp4 written with PyAV.

Everything here reads a `VideoScript` (see `stages/data/synth.py`) and nothing else, so the
frames a test renders are the frames the generator encodes.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

# Background palette: four colours far apart in RGB and in luma, so yuv420p compression
# keeps each channel within a few units of its value over a flat frame.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 30),
}
FLASH_RGB = (255, 255, 255)
SHAPE_RGB = (0, 0, 0)  # agent and distractors: black contrasts every background
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")

# Within a scene the agent holds its start place, moves, then holds its end place.
HOLD_END_FRACTION = 3 / 8
MOVE_END_FRACTION = 5 / 8


def colour_rgb(name: str) -> tuple[int, int, int]:
    """RGB of a background name: a palette colour or "white" (the flash)."""
    return FLASH_RGB if name == "white" else PALETTE[name]


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape filling its box."""
    centres = np.arange(size) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (x - size / 2) ** 2 + (y - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":  # apex at the top centre, base along the bottom row
        return np.abs(x - size / 2) <= y / 2
    raise ValueError(f"unknown shape {shape!r}")


def quadrant_span(quadrant: str, size: int, width: int, height: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """((x_lo, x_hi), (y_lo, y_hi)) for a shape centre that keeps the shape inside the quadrant.

    When the shape is too large for that, the range collapses to the quadrant centre
    (the shape is then clipped by the frame, its visible part still mostly in the quadrant).
    """

    def axis(extent: int, low_side: bool) -> tuple[float, float]:
        lo, hi = min(size / 2, extent / 4), max(extent / 2 - size / 2, extent / 4)
        return (lo, hi) if low_side else (extent - hi, extent - lo)

    return axis(width, quadrant.endswith("left")), axis(height, quadrant.startswith("top"))


def corner_point(quadrant: str, size: int, width: int, height: int) -> tuple[float, float]:
    """Shape centre pushed as far into the quadrant's outer corner as the frame allows."""
    (x_lo, x_hi), (y_lo, y_hi) = quadrant_span(quadrant, size, width, height)
    return (x_lo if quadrant.endswith("left") else x_hi, y_lo if quadrant.startswith("top") else y_hi)


def button_size(script) -> int:
    """Side of the button: larger than the agent so a ring of it stays visible under it."""
    return int(min(round(1.5 * script.object_size_px), script.width, script.height))


def frame_times(script) -> np.ndarray:
    """Time in seconds of every frame: [T]."""
    return np.arange(script.n_frames) / script.fps


def scene_index(script, t: np.ndarray) -> np.ndarray:
    """Index of the scene showing at each time: [T] -> [T]."""
    return np.minimum((t / script.event_seconds + 1e-9).astype(int), len(script.scenes) - 1)


def agent_centres(script, t: np.ndarray) -> np.ndarray:
    """Agent centre (x, y) at each time: [T] -> [T, 2]."""
    scenes = script.scenes
    idx = scene_index(script, t)
    start = np.array([s.start_xy for s in scenes], dtype=float)[idx]
    end = np.array([s.end_xy for s in scenes], dtype=float)[idx]
    u = (t - np.array([s.start_s for s in scenes])[idx]) / script.event_seconds
    w = np.clip((u - HOLD_END_FRACTION) / (MOVE_END_FRACTION - HOLD_END_FRACTION), 0.0, 1.0)
    return start + (end - start) * w[:, None]


def distractor_centres(distractor, t: np.ndarray) -> np.ndarray:
    """Distractor centre (x, y) at each time, piecewise linear between waypoints: [T] -> [T, 2]."""
    way = np.asarray(distractor.waypoints, dtype=float)
    return np.stack([np.interp(t, way[:, 0], way[:, 1]), np.interp(t, way[:, 0], way[:, 2])], axis=1)


def _paste(frame: np.ndarray, mask: np.ndarray, cx: float, cy: float, rgb) -> None:
    """Draw `mask` centred at (cx, cy) into `frame` in colour `rgb`, clipped to the frame."""
    height, width = frame.shape[:2]
    size_y, size_x = mask.shape
    x0, y0 = int(round(cx - size_x / 2)), int(round(cy - size_y / 2))
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + size_x, width), min(y0 + size_y, height)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    sub = mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    frame[fy0:fy1, fx0:fx1][sub] = rgb


def render_video_frames(script) -> np.ndarray:
    """Every frame of a scripted video as uint8 RGB: [T, H, W, 3]."""
    t = frame_times(script)
    idx = scene_index(script, t)
    backgrounds = np.array([colour_rgb(s.background) for s in script.scenes], dtype=np.uint8)
    frames = np.empty((script.n_frames, script.height, script.width, 3), dtype=np.uint8)
    frames[:] = backgrounds[idx][:, None, None, :]

    size = script.object_size_px
    button = np.ones((button_size(script),) * 2, dtype=bool)
    agent_mask = shape_mask(script.agent_shape, size)
    agent_xy = agent_centres(script, t)
    others = [(shape_mask(d.shape, size), distractor_centres(d, t)) for d in script.distractors]
    for k in range(script.n_frames):
        scene = script.scenes[idx[k]]
        if scene.button is not None:
            _paste(frames[k], button, script.width / 2, script.height / 2, PALETTE[scene.button])
        for mask, xy in others:
            _paste(frames[k], mask, xy[k, 0], xy[k, 1], SHAPE_RGB)
        _paste(frames[k], agent_mask, agent_xy[k, 0], agent_xy[k, 1], SHAPE_RGB)  # agent on top
    return frames


def write_mp4(path: Path, frames: np.ndarray, fps: float, keyframe_seconds: float = 10.0) -> None:
    """Encode [T, H, W, 3] uint8 RGB frames as H.264 yuv420p mp4 at exactly `fps`.

    One encoder thread, no scene-cut keyframes and bitexact muxing: the same frames give
    the same bytes on every run and machine with the same libx264 build.
    """
    import av  # heavy import kept local

    rate = Fraction(fps).limit_denominator(100_000)
    keyint = max(1, round(fps * keyframe_seconds))
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {
            "preset": "veryfast",
            "crf": "18",
            "threads": "1",
            "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0",
        }
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
