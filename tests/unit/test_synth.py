"""The synthetic long-video generator: formats, ground truth against pixels, determinism."""

import json
from collections import Counter
from pathlib import Path
from lvr_cli.schema import SynthSpec

import numpy as np
import pytest

from stages.data import synth, synth_questions
from stages.data.records import CATEGORIES
from stages.data.synth_render import PALETTE, QUADRANTS


def make_cfg(**overrides) -> SynthSpec:
    base = dict(videos=4, seconds=24.0, fps=2.0, width=56, height=56, object_size_px=28, event_seconds=8.0,
                eval_fraction=0.25)
    return SynthSpec(**{**base, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def records(out: Path) -> list[dict]:
    return read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(make_cfg(), out, seed=7)
    return out


def background_at(frame: np.ndarray) -> np.ndarray:
    """Median colour of a ring 2 pixels inside the frame edge: the button never reaches it and
    the agent covers at most a quarter of it."""
    ring = np.concatenate([frame[2, 2:-2], frame[-3, 2:-2], frame[2:-2, 2], frame[2:-2, -3]])
    return np.median(ring, axis=0)


def test_records_have_the_longvideo_reason_fields_and_valid_options(dataset):
    recs = records(dataset)
    assert len(recs) == 4 * 4
    for r in recs:
        assert set(r["options"]) == set("ABCD") and len(set(r["options"].values())) == 4
        assert r["answer"] in r["options"]
        assert r["problem_type"] == r["category"]
        assert r["videos"] == [f"videos/{r['video_id']}.mp4"] and (dataset / r["videos"][0]).is_file()
        assert r["problem"].splitlines()[0] == r["question"]
        assert r["problem"].splitlines()[1:] == [f"{k}. {v}" for k, v in r["options"].items()]
        answer_text = r["options"][r["answer"]].rstrip(".").lower()
        assert answer_text.split()[-1] in r["reasoning"] and r["reasoning"].endswith(f"The answer is {r['answer']}.")
        assert r["evidence"] and r["source_clips"]
    assert len({r["problem_id"] for r in recs}) == len(recs)
    assert Counter(r["category"] for r in recs) == {c: 4 for c in CATEGORIES}
    assert {r["category"] for r in read_jsonl(dataset / "eval.jsonl")} == set(CATEGORIES)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    synth.generate(make_cfg(), again, seed=7)
    synth.generate(make_cfg(), other, seed=8)
    for name in ("train.jsonl", "eval.jsonl", "captions_ref.jsonl"):
        assert (again / name).read_bytes() == (dataset / name).read_bytes()
        assert (other / name).read_bytes() != (dataset / name).read_bytes()
    videos = sorted(p.name for p in (dataset / "videos").iterdir())
    assert len(videos) == 4 and videos == sorted(p.name for p in (again / "videos").iterdir())
    for name in videos:
        assert (again / "videos" / name).read_bytes() == (dataset / "videos" / name).read_bytes()


def test_decord_reads_back_every_frame_at_the_configured_fps(dataset):
    import decord

    for caption in read_jsonl(dataset / "captions_ref.jsonl"):
        reader = decord.VideoReader(str(dataset / "videos" / caption["video"]))
        assert len(reader) == round(24.0 * 2.0) and reader.get_avg_fps() == pytest.approx(2.0)
        assert reader[0].shape == (56, 56, 3)


def test_decoded_background_at_the_evidence_shows_the_answer_colour(dataset):
    import decord

    checked = 0
    for r in records(dataset):
        if r["category"] not in ("temporal", "plot"):
            continue
        colour = r["options"][r["answer"]].removeprefix("The screen turns ").rstrip(".")
        frames = decord.VideoReader(str(dataset / r["videos"][0]))
        seen = []
        for span in r["evidence"]:
            mid = round((span["start_s"] + span["end_s"]) / 2 * 2.0)
            seen.append(background_at(frames[mid].asnumpy()))
        # Evidence is in time order: the answer is the scene before the anchor for "before"
        # questions, otherwise the scene after it (the consequence for plot questions).
        answer_bg, anchor_bg = seen if "right before" in r["question"] else seen[::-1]
        assert np.all(np.abs(answer_bg - PALETTE[colour]) <= 40), (r["problem_id"], colour, seen)
        assert not np.all(np.abs(anchor_bg - PALETTE[colour]) <= 40), (r["problem_id"], colour, seen)
        checked += 1
    assert checked == 8


def test_rendered_agent_is_where_spatial_and_goal_answers_say():
    cfg = make_cfg(videos=6, seconds=32.0)
    checked = {"spatial": 0, "goal": 0}
    for index in range(cfg.videos):
        script = synth.build_script(cfg, 3, index)
        clips = synth.clip_captions(script, cfg.clip_seconds)
        frames = synth.render_video_frames(script)
        assert frames.shape == (64, 56, 56, 3) and frames.dtype == np.uint8
        for r in synth_questions.make_questions(script, cfg, clips, np.random.default_rng(index)):
            if r["category"] not in ("spatial", "goal"):
                continue
            quadrant = r["options"][r["answer"]].removeprefix("the ").removesuffix(" corner")
            for span in r["evidence"]:
                k = int(np.ceil(span["start_s"] * cfg.fps))
                ys, xs = np.nonzero(np.all(frames[k] == 0, axis=-1))  # the agent is the only black shape
                found = ("top" if ys.mean() < 28 else "bottom") + "-" + ("left" if xs.mean() < 28 else "right")
                assert found == quadrant, (r["problem_id"], span, found)
                checked[r["category"]] += 1
    assert min(checked.values()) >= cfg.videos, checked  # every video's answers were looked at


def test_answer_letters_are_balanced_without_writing_videos(tmp_path):
    for order in ("fixed", "shuffled"):
        out = tmp_path / order
        summary = synth.generate(make_cfg(videos=100, option_order=order), out, seed=1, write_videos=False)
        assert not (out / "videos").exists() and summary["videos"] == {"train": 75, "eval": 25}
        recs = records(out)
        assert len(recs) == 400
        for category in (None, *CATEGORIES):
            letters = Counter(r["answer"] for r in recs if category in (None, r["category"]))
            total = sum(letters.values())
            assert all(0.10 <= letters[x] / total <= 0.40 for x in "ABCD"), (order, category, letters)


def test_fixed_option_order_repeats_one_list_per_question_type(tmp_path):
    synth.generate(make_cfg(videos=12), tmp_path / "fixed", seed=2, write_videos=False)
    synth.generate(make_cfg(videos=12, option_order="shuffled"), tmp_path / "shuffled", seed=2, write_videos=False)
    fixed, shuffled = records(tmp_path / "fixed"), records(tmp_path / "shuffled")
    for category in CATEGORIES:
        lists = {tuple(r["options"].items()) for r in fixed if r["category"] == category}
        assert lists == {tuple(zip("ABCD", synth_questions.OPTION_LISTS[category]))}
        assert len({tuple(r["options"].items()) for r in shuffled if r["category"] == category}) > 1
    assert fixed[0]["options"]["A"] == "red" or fixed[0]["category"] != "temporal"
    assert {tuple(r["options"].values()) for r in fixed if r["category"] == "spatial"} == {QUADRANTS}


def test_split_is_by_video(dataset):
    train, evals = read_jsonl(dataset / "train.jsonl"), read_jsonl(dataset / "eval.jsonl")
    train_videos, eval_videos = {r["video_id"] for r in train}, {r["video_id"] for r in evals}
    assert len(train_videos) == 3 and len(eval_videos) == 1 and not train_videos & eval_videos
    assert synth.eval_videos(2, 0.01, seed=0) and len(synth.eval_videos(2, 0.99, seed=0)) == 1


def test_captions_cover_the_video_with_a_last_partial_clip(tmp_path):
    synth.generate(make_cfg(videos=2, seconds=25.0), tmp_path, seed=0, write_videos=False)
    for video in read_jsonl(tmp_path / "captions_ref.jsonl"):
        assert video["duration_s"] == 25.0 and video["fps"] == 2.0
        spans = [(c["start_s"], c["end_s"]) for c in video["clips"]]
        assert spans == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
        assert [c["index"] for c in video["clips"]] == [0, 1, 2]
        assert video["clips"][0]["caption"].startswith("00:00-")
        assert "00:24-00:25: the screen is" in video["clips"][2]["caption"]  # the partial fourth scene


def test_more_questions_per_category_are_distinct(tmp_path):
    synth.generate(make_cfg(videos=3, seconds=48.0, questions_per_category=3), tmp_path, seed=4, write_videos=False)
    recs = records(tmp_path)
    counts = Counter(r["category"] for r in recs)
    assert counts == {"temporal": 9, "spatial": 9, "goal": 3, "plot": 3}  # one goal, one button per video
    assert len({(r["video_id"], r["question"]) for r in recs}) == len(recs)


def test_hard_setting_uses_small_shapes_distractors_and_shuffled_options():
    cfg = make_cfg(object_size_px=14, event_seconds=4.0, distractors=3, option_order="shuffled")
    script = synth.build_script(cfg, 0, 0)
    assert len(script.distractors) == 3 and script.agent_shape not in {d.shape for d in script.distractors}
    frames = synth.render_video_frames(script)
    black = np.all(frames == 0, axis=-1).sum(axis=(1, 2))
    assert black.max() < 4 * 14 * 14  # four shapes of one patch each at most


def test_too_short_a_video_is_refused():
    with pytest.raises(ValueError, match="3 complete scenes"):
        synth.generate(make_cfg(seconds=16.0), Path("/nonexistent"), seed=0)


def test_perception_answers_are_what_the_frames_show_longest():
    """The demo's question set: the colour filling the most frames answers temporal and plot,
    the quadrant where the agent sits still in the most frames answers goal and spatial."""
    cfg = make_cfg(videos=8, seconds=44.0, question_set="perception")  # 5 scenes and a partial one
    answers = Counter()
    for index in range(cfg.videos):
        script = synth.build_script(cfg, 5, index)
        assert script.press_scene <= 1
        frames = synth.render_video_frames(script)
        colours = Counter()
        for frame in frames:
            bg = background_at(frame)
            colours.update(name for name, rgb in PALETTE.items() if np.all(np.abs(bg - rgb) <= 40))
        still = Counter()
        for prev, frame in zip(frames, frames[1:]):
            ys, xs = np.nonzero(np.all(frame == 0, axis=-1))
            centred = len(ys) and abs(ys.mean() - 27.5) < 4 and abs(xs.mean() - 27.5) < 4  # on the button
            if len(ys) and not centred and np.array_equal(np.all(prev == 0, axis=-1), np.all(frame == 0, axis=-1)):
                still[("top" if ys.mean() < 28 else "bottom") + "-" + ("left" if xs.mean() < 28 else "right")] += 1
        (colour, n), (_, runner_up) = colours.most_common(2)
        assert n > runner_up
        quadrant = still.most_common(1)[0][0]
        qs = synth_questions.make_questions(script, cfg, synth.clip_captions(script, cfg.clip_seconds),
                                  np.random.default_rng(index))
        assert [r["category"] for r in qs] == list(CATEGORIES)
        for r in qs:
            text = r["options"][r["answer"]]
            want = {"temporal": colour, "plot": f"The screen turns {colour}.",
                    "goal": f"the {quadrant} corner", "spatial": quadrant}[r["category"]]
            assert text == want, (r["problem_id"], text, want)
            assert text.split()[-1].rstrip(".") in r["reasoning"]
            answers[r["answer"]] += 1
    assert len(answers) >= 3  # not one letter for everything
    with pytest.raises(ValueError, match="perception' needs 5 complete scenes"):
        synth.generate(make_cfg(seconds=32.0, question_set="perception"), "unused", seed=0, write_videos=False)
