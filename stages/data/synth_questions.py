"""Questions of the synthetic videos, with ground truth and reasoning read from the script.

One module per job: `synth.py` writes scripts, videos and captions; this one turns a script
into LongVideo-Reason records in the four categories (see `synth.py`'s docstring for what
each category asks).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from stages.data.records import CATEGORIES
from stages.data.synth import COLOURS, Scene, VideoScript, fmt_time, scene_phases
from stages.data.synth_render import MOVE_END_FRACTION, QUADRANTS

LETTERS = "ABCD"


# ---------------------------------------------------------------- questions


def _span(scene: Scene) -> str:
    return f"from {fmt_time(scene.start_s)} to {fmt_time(scene.end_s)}"


def _temporal(script: VideoScript, rng: np.random.Generator, count: int) -> list[tuple]:
    flash = script.scenes[script.flash_scene]
    complete = [s for s in script.scenes if s.complete]
    candidates = []
    if flash.index >= 1:
        before = script.scenes[flash.index - 1]
        candidates.append((
            "The screen flashes white once in the video. Which colour fills the screen right before the white flash?",
            before.background,
            f"The screen flashes white {_span(flash)}. Right before it, {_span(before)}, the screen is "
            f"{before.background}. So the colour right before the white flash is {before.background}.",
            [before, flash],
        ))
    if flash.index + 1 < len(complete):
        after = script.scenes[flash.index + 1]
        candidates.append((
            "The screen flashes white once in the video. Which colour fills the screen right after the white flash?",
            after.background,
            f"The screen flashes white {_span(flash)}. Right after it, {_span(after)}, the screen is "
            f"{after.background}. So the colour right after the white flash is {after.background}.",
            [flash, after],
        ))
    order = list(rng.permutation(len(candidates)))
    chosen = [candidates[i] for i in order]
    # More temporal questions: the scene after the one showing at a time point.
    anchors = [s for s in complete[:-1] if "white" not in (s.background, script.scenes[s.index + 1].background)]
    for i in rng.permutation(len(anchors)):
        if len(chosen) >= count:
            break
        scene, nxt = anchors[i], script.scenes[anchors[i].index + 1]
        at = fmt_time(scene.start_s + script.event_seconds / 2)
        chosen.append((
            f"Which colour fills the screen in the scene right after the one shown at {at}?",
            nxt.background,
            f"At {at} the screen is {scene.background}, a scene that lasts {_span(scene)}. The next scene, "
            f"{_span(nxt)}, is {nxt.background}. So the colour of the scene right after it is {nxt.background}.",
            [scene, nxt],
        ))
    return chosen[:count]


def _goal(script: VideoScript) -> list[tuple]:
    runs = [s for s in script.scenes if s.complete and s.kind != "press"]
    arrive = MOVE_END_FRACTION * script.event_seconds
    a, corner = script.agent, f"the {script.goal} corner"
    # Cite three runs spread over the whole video, not only its start.
    cited = "; ".join(
        f"from {fmt_time(s.start_s)} it starts in the {s.start_quadrant} part and reaches {corner} at "
        f"{fmt_time(s.start_s + arrive)}"
        for s in dict.fromkeys(runs[round(i)] for i in np.linspace(0, len(runs) - 1, 3))
    )
    return [(
        f"In almost every scene {a} sets off and moves across the screen. What is it trying to reach?",
        corner,
        f"{a.capitalize()} starts from different places: {cited}. In all {len(runs)} scenes without the button "
        f"it ends at {corner} and stays there. So it keeps trying to reach {corner}.",
        [(s.start_s + arrive, s.end_s) for s in runs],
    )]


def _spatial(script: VideoScript, rng: np.random.Generator, count: int) -> list[tuple]:
    candidates = []
    for scene in script.scenes:
        if not scene.complete:
            continue
        for p0, p1, phase, _ in scene_phases(script, scene):
            if phase == "move" or (phase == "end" and scene.kind == "press"):
                continue
            # Frames in [p0, p1): at p1 the agent starts moving or the next scene begins.
            first, stop = math.ceil(p0 * script.fps - 1e-9), math.ceil(p1 * script.fps - 1e-9)
            frames = [k / script.fps for k in range(first, stop)]
            if not frames:
                continue
            whole = [t for t in frames if abs(t - round(t)) < 1e-9] or frames
            t = min(whole, key=lambda x: (abs(x - (p0 + p1) / 2), x))
            quadrant = scene.start_quadrant if phase == "start" else script.goal
            candidates.append((scene, p0, p1, t, quadrant))
    chosen = []
    for i in rng.permutation(len(candidates))[:count]:
        scene, p0, p1, t, quadrant = candidates[i]
        a, at = script.agent, fmt_time(t)
        chosen.append((
            f"At {at}, in which part of the screen is {a}?",
            quadrant,
            f"At {at} the screen is {scene.background}, and from {fmt_time(p0)} to {fmt_time(p1)} {a} holds "
            f"still in the {quadrant} part of the screen. So at {at} it is in the {quadrant} part.",
            [(p0, p1)],
        ))
    return chosen


def _plot(script: VideoScript) -> list[tuple]:
    press, after = script.scenes[script.press_scene], script.scenes[script.press_scene + 1]
    touch = press.start_s + MOVE_END_FRACTION * script.event_seconds
    a, c = script.agent, press.button
    return [(
        f"At some point {a} touches a button. What happens right after it touches the button?",
        f"The screen turns {c}.",
        f"From {fmt_time(press.start_s)} a {c} button is in the centre of the {press.background} screen; "
        f"{a} moves onto it and touches it at {fmt_time(touch)}. Right after, {_span(after)}, the whole screen "
        f"is {c}. So touching the {c} button turned the screen {c}.",
        [press, after],
    )]


def _longest(durations: dict[str, float]) -> str:
    ranked = sorted(durations.items(), key=lambda kv: -kv[1])
    if len(ranked) > 1 and ranked[0][1] - ranked[1][1] < 1e-6:
        raise ValueError(f"no single longest: {ranked[:2]}")
    return ranked[0][0]


def _perception(script: VideoScript) -> dict[str, list[tuple]]:
    """One question per category whose evidence is spread over most of the video.

    The colour the button turns the screen fills every later scene (the press is in the first
    two scenes), and the agent holds still longest at its goal corner: what a tiny model learns
    from scratch in minutes (full-frame and quarter-frame content, see NOTES.md), unlike the
    relational `reasoning` set (before/after the flash, position at mm:ss).
    """
    a, press = script.agent, script.scenes[script.press_scene]
    colour_time: dict[str, float] = Counter()
    for scene in script.scenes:
        if scene.background != "white":
            colour_time[scene.background] += scene.end_s - scene.start_s
    colour = _longest(colour_time)
    assert colour == press.button, (colour, press.button)
    held: dict[str, float] = Counter()
    for scene in script.scenes:
        for p0, p1, phase, _ in scene_phases(script, scene):
            if phase == "start":
                held[scene.start_quadrant] += p1 - p0
            elif phase == "end" and scene.kind != "press":
                held[script.goal] += p1 - p0
    quadrant = _longest(held)
    assert quadrant == script.goal, (quadrant, script.goal)
    corner = f"the {quadrant} corner"
    after = [s for s in script.scenes if s.index > press.index and s.background == colour]
    return {
        "temporal": [(
            "Which colour fills the screen for the longest time in the video?",
            colour, f"The screen is {colour} in {len(after)} scenes, longer than any other colour.",
            after,
        )],
        "goal": [(
            f"In almost every scene {a} sets off and moves across the screen. What is it trying to reach?",
            corner, f"{a.capitalize()} ends scene after scene at {corner}.",
            [(s.start_s + MOVE_END_FRACTION * script.event_seconds, s.end_s) for s in script.scenes
             if s.kind != "press"],
        )],
        "spatial": [(
            f"In which part of the screen does {a} stay still for the longest time?",
            quadrant, f"{a.capitalize()} holds still in the {quadrant} part longest, at its corner.",
            [(s.start_s + MOVE_END_FRACTION * script.event_seconds, s.end_s) for s in script.scenes
             if s.kind != "press"],
        )],
        "plot": [(
            f"At some point {a} touches a button. What happens right after it touches the button?",
            f"The screen turns {colour}.", f"{a.capitalize()} touches the {colour} button and the screen "
            f"turns {colour}.",
            [press, *after],
        )],
    }


OPTION_LISTS = {
    "temporal": list(COLOURS),
    "goal": [f"the {q} corner" for q in QUADRANTS],
    "spatial": list(QUADRANTS),
    "plot": [f"The screen turns {c}." for c in COLOURS],
}


def make_questions(script: VideoScript, cfg, clips: list[dict], rng: np.random.Generator) -> list[dict]:
    """LongVideo-Reason records for one video, ground truth read from its script."""
    q = cfg.questions_per_category
    if cfg.question_set == "perception":
        drafts = _perception(script)
    else:
        drafts = {
            "temporal": _temporal(script, rng, q),
            "goal": _goal(script)[:q],
            "spatial": _spatial(script, rng, q),
            "plot": _plot(script)[:q],
        }
    records = []
    for category in CATEGORIES:
        for k, (question, answer_text, reasoning, evidence) in enumerate(drafts[category]):
            contents = OPTION_LISTS[category]
            order = range(4) if cfg.option_order == "fixed" else rng.permutation(4)
            options = {letter: contents[i] for letter, i in zip(LETTERS, order)}
            answer = next(letter for letter, text in options.items() if text == answer_text)
            spans = [(e.start_s, e.end_s) if isinstance(e, Scene) else e for e in evidence]
            source = sorted({c["index"] for c in clips for s0, s1 in spans
                             if min(s1, c["end_s"]) - max(s0, c["start_s"]) > 1e-9})
            records.append({
                "problem_id": f"{script.video_id}-{category}-{k}",
                "problem": question + "\n" + "\n".join(f"{L}. {t}" for L, t in options.items()),
                "problem_type": category,
                "videos": [f"videos/{script.video_id}.mp4"],
                "reasoning": f"{reasoning} The answer is {answer}.",
                "answer": answer,
                "options": options,
                "category": category,
                "question": question,
                "video_id": script.video_id,
                "evidence": [{"start_s": round(s0, 6), "end_s": round(s1, 6)} for s0, s1 in spans],
                "source_clips": source,
            })
    return records


