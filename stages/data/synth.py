"""Synthetic long videos with scripted events: the embedded default dataset of every stage.

Each video is a script of scenes, `event_seconds` each. Every scene fills the screen with
one background colour (red, green, blue, yellow; consecutive scenes differ) and shows the
agent, a black shape, holding a start place in one quadrant, moving, then holding its end
place. Exactly one scene is a white flash and exactly one is a press scene, where a large
button of colour c sits in the centre and the agent moves onto it; the next scene is then
coloured c. In every other scene the agent ends at the same corner, its goal. Distractors
are other black shapes wandering between random waypoints.

Questions, with ground truth read from the script (one of each per video by default):
- temporal: the colour of the scene right before / after the white flash (more questions:
  the colour of the scene after the one shown at mm:ss);
- goal: which corner the agent keeps going to (at most one per video);
- spatial: the quadrant of the agent at mm:ss, a time when it holds still;
- plot: what happens after the agent touches the button (the screen turns its colour; at
  most one per video).
With large shapes, long scenes and a fixed option order (the demo), every answer is
carried by full-frame or quarter-frame evidence lasting several frames; with 14-pixel
shapes, short scenes, distractors and shuffled options it is a needle-in-a-haystack test.

Departures from LongVideo-Reason: questions and reasoning are templated from the script,
not written by a reasoning LLM from captions; captions are exact, not model output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from stages.data import synth_render as render
from stages.data.synth_render import HOLD_END_FRACTION, MOVE_END_FRACTION, PALETTE, QUADRANTS, SHAPES

COLOURS = tuple(PALETTE)
render_video_frames = render.render_video_frames


@dataclasses.dataclass(frozen=True)
class Scene:
    index: int
    start_s: float
    end_s: float  # clipped to the video: the last scene may be partial
    kind: str  # "goal" | "flash" | "press"
    background: str  # a palette colour, or "white" for the flash
    start_quadrant: str
    start_xy: tuple[float, float]
    end_xy: tuple[float, float]
    button: str | None  # button colour, press scene only
    complete: bool


@dataclasses.dataclass(frozen=True)
class Distractor:
    shape: str
    waypoints: tuple[tuple[float, float, float], ...]  # (t_s, x, y)


@dataclasses.dataclass(frozen=True)
class VideoScript:
    video_id: str
    n_frames: int
    fps: float
    duration_s: float
    width: int
    height: int
    object_size_px: int
    event_seconds: float
    agent_shape: str
    goal: str  # quadrant of the corner the agent keeps going to
    flash_scene: int
    press_scene: int
    scenes: tuple[Scene, ...]
    distractors: tuple[Distractor, ...]

    @property
    def agent(self) -> str:
        return f"the black {self.agent_shape}"


def fmt_time(seconds: float) -> str:
    """mm:ss, with hundredths only when the time is not a whole second."""
    seconds = round(seconds, 2)
    minutes, rest = divmod(seconds, 60)
    if abs(rest - round(rest)) < 1e-6:
        return f"{int(minutes):02d}:{int(round(rest)):02d}"
    return f"{int(minutes):02d}:{rest:05.2f}"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def scene_problem(cfg) -> str | None:
    """What makes `cfg`'s scene script impossible, as "field: reason", or None (the recipe
    schema refuses such a `[synth]` section up front with this message)."""
    complete = math.floor(round(cfg.fps * cfg.seconds) / cfg.fps / cfg.event_seconds + 1e-9)
    if complete < 3:
        return (f"seconds: {cfg.seconds:g} s holds {complete} complete scene(s) of event_seconds = "
                f"{cfg.event_seconds:g} s; the script needs 3 complete scenes (flash, press, consequence)")
    if cfg.question_set == "perception" and complete < 5:
        return (f"seconds: question_set 'perception' needs 5 complete scenes (the press colour must fill the "
                f"most), {cfg.seconds:g} s / {cfg.event_seconds:g} s gives {complete}")
    if cfg.event_seconds * cfg.fps < 4:
        return (f"event_seconds: {cfg.event_seconds:g} s at fps = {cfg.fps:g} is "
                f"{cfg.event_seconds * cfg.fps:g} frames; a scene needs at least 4")
    return None


def _check(cfg, seed: int) -> None:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if cfg.option_order not in ("fixed", "shuffled"):
        raise ValueError(f"option_order must be 'fixed' or 'shuffled', got {cfg.option_order!r}")
    if cfg.width % 2 or cfg.height % 2:
        raise ValueError(f"width and height must be even for yuv420p, got {cfg.width}x{cfg.height}")
    if not 1 <= cfg.object_size_px <= min(cfg.width, cfg.height):
        raise ValueError(f"object_size_px must be in [1, {min(cfg.width, cfg.height)}], got {cfg.object_size_px}")
    problem = scene_problem(cfg)
    if problem:
        raise ValueError(problem)


def build_script(cfg, seed: int, index: int) -> VideoScript:
    """The script of video `index`: depends only on (cfg, seed, index)."""
    rng = _rng(seed, 1, index)
    n_frames = round(cfg.seconds * cfg.fps)
    duration = n_frames / cfg.fps
    event = cfg.event_seconds
    n_scenes = math.ceil(duration / event - 1e-9)
    n_complete = math.floor(duration / event + 1e-9)
    size, width, height = cfg.object_size_px, cfg.width, cfg.height

    # Flash and press at uniformly random complete scenes; the press scene needs a complete
    # coloured scene after it to show its consequence.
    perception = cfg.question_set == "perception"
    pairs = [(f, p) for f in range(n_complete) for p in range(n_complete - 1) if p != f and p + 1 != f]
    if perception:  # press early: its colour then fills most of the video
        pairs = [(f, p) for f, p in pairs if p <= 1]
    flash, press = pairs[rng.integers(len(pairs))]
    goal = QUADRANTS[rng.integers(4)]
    agent_shape = SHAPES[rng.integers(len(SHAPES))]
    outcome = COLOURS[rng.integers(len(COLOURS))]  # perception: the colour after the press

    scenes, previous = [], None
    for i in range(n_scenes):
        if i == flash:
            background = "white"
        elif perception and i > press:
            background = outcome
        else:
            choices = [c for c in COLOURS if c != previous and not (perception and c == outcome)]
            background = choices[rng.integers(len(choices))]
        previous = background
        kind = "flash" if i == flash else "press" if i == press else "goal"
        starts = [q for q in QUADRANTS if q != goal] if kind != "press" else list(QUADRANTS)
        start_quadrant = starts[rng.integers(len(starts))]
        if perception:  # the three other quadrants in turn: the goal corner is held longest
            start_quadrant = [q for q in QUADRANTS if q != goal][(i + press) % 3]
        (x_lo, x_hi), (y_lo, y_hi) = render.quadrant_span(start_quadrant, size, width, height)
        start_xy = (float(rng.uniform(x_lo, x_hi)), float(rng.uniform(y_lo, y_hi)))
        end_xy = (width / 2, height / 2) if kind == "press" else render.corner_point(goal, size, width, height)
        scenes.append(
            Scene(i, i * event, min((i + 1) * event, duration), kind, background,
                  start_quadrant, start_xy, end_xy, None, i < n_complete)
        )
    # The button takes the colour of the scene it causes (which already differs from the
    # press scene's own background).
    scenes[press] = dataclasses.replace(scenes[press], button=scenes[press + 1].background)

    other_shapes = [s for s in SHAPES if s != agent_shape]
    step = event / 2
    n_way = math.ceil(duration / step) + 1
    distractors = []
    for d in range(cfg.distractors):
        xs, ys = rng.uniform(0, width, n_way), rng.uniform(0, height, n_way)
        way = tuple((round(k * step, 6), float(x), float(y)) for k, (x, y) in enumerate(zip(xs, ys)))
        distractors.append(Distractor(other_shapes[d % len(other_shapes)], way))

    return VideoScript(
        video_id=f"synth-s{seed}-{index:04d}", n_frames=n_frames, fps=float(cfg.fps), duration_s=duration,
        width=width, height=height, object_size_px=size, event_seconds=event, agent_shape=agent_shape,
        goal=goal, flash_scene=flash, press_scene=press, scenes=tuple(scenes), distractors=tuple(distractors),
    )


# ---------------------------------------------------------------- phases and captions


def scene_phases(script: VideoScript, scene: Scene) -> list[tuple[float, float, str, str]]:
    """(start_s, end_s, phase, text) of the agent's hold/move/hold phases, clipped to the video."""
    a, e = script.agent, script.event_seconds
    hold_end, move_end = scene.start_s + HOLD_END_FRACTION * e, scene.start_s + MOVE_END_FRACTION * e
    start = f"the {scene.start_quadrant} part"
    if scene.kind == "press":
        target = f"the {scene.button} button in the centre"
        moving, holding = f"{a} moves from {start} onto {target}", f"{a} touches {target}"
    else:
        target = f"the {script.goal} corner"
        moving, holding = f"{a} moves from {start} to {target}", f"{a} stays at {target}"
    phases = [
        (scene.start_s, hold_end, "start", f"{a} stays in {start}"),
        (hold_end, move_end, "move", moving),
        (move_end, scene.start_s + e, "end", holding),
    ]
    return [(s, min(t, scene.end_s), p, txt) for s, t, p, txt in phases if s < scene.end_s - 1e-9]


def _screen(scene: Scene) -> str:
    if scene.kind == "flash":
        return "the screen flashes white"
    text = f"the screen is {scene.background}"
    return text + (f" and a {scene.button} button is in the centre" if scene.button else "")


def clip_captions(script: VideoScript, clip_seconds: float) -> list[dict]:
    """Exact reference captions, one per `clip_seconds` clip, the last partial clip included."""
    n_clips = math.ceil(script.duration_s / clip_seconds - 1e-9)
    shapes = ", ".join(f"a {d.shape}" for d in script.distractors)
    others = f" Other black shapes ({shapes}) wander around." if script.distractors else ""
    clips = []
    for k in range(n_clips):
        c0, c1 = k * clip_seconds, min((k + 1) * clip_seconds, script.duration_s)
        parts = []
        for scene in script.scenes:
            s0, s1 = max(c0, scene.start_s), min(c1, scene.end_s)
            if s1 - s0 <= 1e-9:
                continue
            steps = [
                f"{fmt_time(max(p0, s0))}-{fmt_time(min(p1, s1))} {text}"
                for p0, p1, _, text in scene_phases(script, scene)
                if min(p1, s1) - max(p0, s0) > 1e-9
            ]
            parts.append(f"{fmt_time(s0)}-{fmt_time(s1)}: {_screen(scene)}; " + "; ".join(steps) + ".")
        caption = " ".join(parts) + others
        clips.append({"index": k, "start_s": round(c0, 6), "end_s": round(c1, 6), "caption": caption})
    return clips


# ---------------------------------------------------------------- the dataset


def eval_videos(n_videos: int, eval_fraction: float, seed: int) -> set[int]:
    """Indices of the videos in the eval split; at least one per side when 0 < fraction < 1."""
    n_eval = round(n_videos * eval_fraction)
    if n_videos >= 2 and 0 < eval_fraction < 1:
        n_eval = min(max(n_eval, 1), n_videos - 1)
    return {int(i) for i in _rng(seed, 0).choice(n_videos, size=n_eval, replace=False)}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(cfg, out_dir: Path, seed: int, write_videos: bool = True) -> dict:
    """Write a synthetic dataset under `out_dir`; returns counts per split and category and seconds taken.

    Files: videos/<id>.mp4, captions_ref.jsonl, train.jsonl, eval.jsonl, synth_summary.json.
    `write_videos=False` skips rendering and encoding (question statistics only).
    """
    from stages.data.synth_questions import make_questions  # it builds on this module's scripts

    started = time.perf_counter()
    _check(cfg, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if write_videos:
        (out_dir / "videos").mkdir(exist_ok=True)
    in_eval = eval_videos(cfg.videos, cfg.eval_fraction, seed)
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    captions = []
    for index in range(cfg.videos):
        script = build_script(cfg, seed, index)
        clips = clip_captions(script, cfg.clip_seconds)
        captions.append({"video": f"{script.video_id}.mp4", "video_id": script.video_id,
                         "duration_s": script.duration_s, "fps": script.fps, "clips": clips})
        records = make_questions(script, cfg, clips, _rng(seed, 2, index))
        splits["eval" if index in in_eval else "train"].extend(records)
        if write_videos:
            render.write_mp4(out_dir / "videos" / f"{script.video_id}.mp4", render_video_frames(script), cfg.fps)
    _write_jsonl(out_dir / "captions_ref.jsonl", captions)
    for name, records in splits.items():
        _write_jsonl(out_dir / f"{name}.jsonl", records)

    summary = {
        "seed": seed,
        "videos": {"train": cfg.videos - len(in_eval), "eval": len(in_eval)},
        "questions": {name: dict(Counter(r["category"] for r in recs)) for name, recs in splits.items()},
        "answers": dict(sorted(Counter(r["answer"] for recs in splits.values() for r in recs).items())),
        "frames_per_video": round(cfg.seconds * cfg.fps),
        "videos_written": write_videos,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out_dir / "synth_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
