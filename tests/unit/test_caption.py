"""lvr caption: clip segmentation, frame sampling, failures, resume, input forms."""

import json
from pathlib import Path

import numpy as np
import pytest

import stages.caption as caption
from lvr_cli.recipes import RecipeError
from lvr_cli.schema import CaptionRecipe, SynthSpec
from lvr_cli.rundir import RunDir
from stages.backends.base import GenResult
from stages.data.records import read_jsonl
from stages.data.synth import generate
from stages.data.synth_render import write_mp4

SYNTH = SynthSpec(videos=3, seconds=7, fps=2, width=56, height=56, object_size_px=28, event_seconds=2,
                  eval_fraction=0.34, clip_seconds=3)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three 7 s synthetic videos, a 1 s video and a corrupt file, in one folder."""
    root = tmp_path_factory.mktemp("caption_data")
    generate(SYNTH, root, seed=0)
    folder = root / "videos"
    write_mp4(folder / "short.mp4", np.full((2, 56, 84, 3), 200, np.uint8), 2.0)
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    return root


class FakeVLM:
    """Answers each clip request with what it was shown; fails the keys in `fail`; a Ctrl-C
    on its `interrupt_at`-th call (1-based), as a killed run would stop."""

    def __init__(self, fail=(), interrupt_at=0):
        self.fail, self.keys, self.calls, self.interrupt_at = set(fail), [], 0, interrupt_at

    def generate(self, requests):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        out = []
        for r in requests:
            self.keys.append(r.key)
            video = r.messages[0]["content"][0]
            h, w = video["frames"][0].shape[:2]
            text = f"<think>looking</think>{len(video['frames'])} frames {h}x{w} at {video['fps']:.2f} fps"
            out.append(GenResult(r.key, None, "HTTP 500: boom") if r.key in self.fail else GenResult(r.key, text))
        return out

    def close(self):
        pass


def recipe(data_input, out, **caption_spec):
    return CaptionRecipe.model_validate({
        "data": {"input": str(data_input)}, "output": {"dir": str(out)},
        "caption": {"clip_seconds": 3.0, "frames_per_clip": 4, "min_last_clip_s": 0.5, **caption_spec},
        "video": {"max_pixels": 56 * 56},
    })


def run_stage(r, retry_failed=False):
    run = RunDir(Path(r.output.dir), r).open(retry_failed=retry_failed)
    summary = caption.run(r, run)
    run.finish(summary)
    return summary, run


@pytest.fixture
def fake(monkeypatch):
    holder = {"backend": FakeVLM()}
    monkeypatch.setattr(caption, "make_backend", lambda cfg: holder["backend"])
    return holder


def test_clips_frames_and_corrupt_video(videos, tmp_path, fake):
    summary, run = run_stage(recipe(videos / "videos", tmp_path / "out"))
    assert summary == {"videos": 5, "already_done": 0, "captioned": 4, "done": 4, "failed": 1, "clips": 3 * 3 + 1}
    records = {r["video"]: r for r in read_jsonl(run.file("captions.jsonl"))}
    assert sorted(records) == ["short.mp4", "synth-s0-0000.mp4", "synth-s0-0001.mp4", "synth-s0-0002.mp4"]

    ref = {r["video"]: r for r in read_jsonl(videos / "captions_ref.jsonl")}
    for name in ref:  # the same clip bounds as the synthetic reference: last partial clip 6-7 s kept
        got = [(c["index"], c["start_s"], c["end_s"]) for c in records[name]["clips"]]
        assert got == [(c["index"], c["start_s"], c["end_s"]) for c in ref[name]["clips"]]
        assert got == [(0, 0.0, 3.0), (1, 3.0, 6.0), (2, 6.0, 7.0)]
        assert records[name]["duration_s"] == 7.0 and records[name]["fps"] == 2.0
        assert records[name]["video_id"] == name.removesuffix(".mp4")
        # 6 native frames in a full clip -> 4 sampled; the 1 s tail has 2; think block stripped
        assert [c["caption"] for c in records[name]["clips"]] == [
            "4 frames 56x56 at 1.33 fps", "4 frames 56x56 at 1.33 fps", "2 frames 56x56 at 2.00 fps"]

    # shorter than one clip: a single clip over the whole video; 56x84 fit to 56*56 pixels on the 28-grid
    assert records["short.mp4"]["clips"] == [
        {"index": 0, "start_s": 0.0, "end_s": 1.0, "caption": "2 frames 28x56 at 2.00 fps"}]

    errors = read_jsonl(run.file("errors.jsonl"))
    assert [e["key"] for e in errors] == ["broken.mp4"]
    assert "broken.mp4" in errors[0]["reason"] and "\n" not in errors[0]["reason"]


def test_short_last_clip_joins_previous(videos, tmp_path, fake):
    summary, run = run_stage(recipe(videos / "videos" / "synth-s0-000[1]*", tmp_path / "out", min_last_clip_s=1.5))
    (record,) = read_jsonl(run.file("captions.jsonl"))
    assert [(c["start_s"], c["end_s"]) for c in record["clips"]] == [(0.0, 3.0), (3.0, 7.0)]
    assert record["video"] == str(videos / "videos" / "synth-s0-0001.mp4")  # a glob keeps the matched path
    assert record["clips"][1]["caption"].startswith("4 frames")


def test_failed_clip_is_not_written_and_retried_on_resume(videos, tmp_path, fake):
    fake["backend"] = FakeVLM(fail={"synth-s0-0001.mp4#1"})
    summary, run = run_stage(recipe(videos / "videos", tmp_path / "out"))
    assert summary["captioned"] == 3 and summary["failed"] == 2  # the failed clip's video and broken.mp4
    errors = {e["key"]: e["reason"] for e in read_jsonl(run.file("errors.jsonl"))}
    assert errors["synth-s0-0001.mp4"] == "clip 1 [3.0-6.0 s]: HTTP 500: boom"
    assert "synth-s0-0001.mp4" not in {r["video"] for r in read_jsonl(run.file("captions.jsonl"))}

    (tmp_path / "out" / "summary.json").unlink()  # an interrupted run: resumable
    fake["backend"] = FakeVLM()
    summary, run = run_stage(recipe(videos / "videos", tmp_path / "out"))
    assert run.resumed and summary["already_done"] == 3 and summary["captioned"] == 1
    assert {k.split("#")[0] for k in fake["backend"].keys} == {"synth-s0-0001.mp4"}
    assert summary["failed"] == 1  # broken.mp4, tried again
    keys = [r["video"] for r in read_jsonl(run.file("captions.jsonl"))]
    assert len(keys) == len(set(keys)) == 4


def errors_of(out) -> list[tuple[str, str]]:
    return [(e["key"], e["reason"]) for e in read_jsonl(out / "errors.jsonl")]


def test_errors_after_interrupted_reruns_list_what_failed_now_once(videos, tmp_path, fake):
    """Videos in order: broken (fails to probe), short, synth 0, 1, 2 (one backend call each)."""
    out, r = tmp_path / "out", recipe(videos / "videos", tmp_path / "out")
    fake["backend"] = FakeVLM(fail={"synth-s0-0001.mp4#1"}, interrupt_at=4)  # stops at synth 2
    with pytest.raises(KeyboardInterrupt):
        run_stage(r)
    assert [k for k, _ in errors_of(out)] == ["broken.mp4", "synth-s0-0001.mp4"]
    broken = errors_of(out)[0]

    fake["backend"] = FakeVLM(fail={"synth-s0-0001.mp4#1"}, interrupt_at=2)  # both fail again, then stops
    with pytest.raises(KeyboardInterrupt):
        run_stage(r)
    assert errors_of(out) == [broken, ("synth-s0-0001.mp4", "clip 1 [3.0-6.0 s]: HTTP 500: boom")]
    with open(out / "errors.jsonl", "a") as f:
        f.write('{"key": "synth-s0-0002.mp4", "rea')  # a failure torn by a SIGKILL mid-write

    fake["backend"] = FakeVLM()
    summary, run = run_stage(r)
    assert summary == {"videos": 5, "already_done": 2, "captioned": 2, "done": 4, "failed": 1, "clips": 6}
    assert errors_of(out) == [broken]  # synth 1 succeeded on this run; broken.mp4 is listed once
    keys = [x["video"] for x in read_jsonl(run.file("captions.jsonl"))]
    assert sorted(keys) == ["short.mp4", "synth-s0-0000.mp4", "synth-s0-0001.mp4", "synth-s0-0002.mp4"]


def test_retry_failed_redoes_only_the_failed_videos_of_a_finished_run(videos, tmp_path, fake):
    out, r = tmp_path / "out", recipe(videos / "videos", tmp_path / "out")
    fake["backend"] = FakeVLM(fail={"synth-s0-0001.mp4#1", "synth-s0-0002.mp4#0"})
    summary, _ = run_stage(r)
    assert summary["failed"] == 3 and summary["done"] == 2
    with pytest.raises(RecipeError, match="holds a finished run"):
        run_stage(r)
    before = read_jsonl(out / "captions.jsonl")

    fake["backend"] = FakeVLM(fail={"synth-s0-0002.mp4#2"})  # synth 1 now succeeds, synth 2 fails elsewhere
    summary, run = run_stage(r, retry_failed=True)
    assert {k.split("#")[0] for k in fake["backend"].keys} == {"synth-s0-0001.mp4", "synth-s0-0002.mp4"}
    assert run.resumed and summary == {"videos": 5, "already_done": 2, "captioned": 1, "done": 3, "failed": 2,
                                       "clips": 3}
    assert [k for k, _ in errors_of(out)] == ["broken.mp4", "synth-s0-0002.mp4"]
    assert errors_of(out)[1][1] == "clip 2 [6.0-7.0 s]: HTTP 500: boom"
    after = read_jsonl(out / "captions.jsonl")
    assert after[:2] == before and [x["video"] for x in after[2:]] == ["synth-s0-0001.mp4"]


def test_jsonl_list_with_video_dir_and_limit(videos, tmp_path, fake):
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join([
        json.dumps({"videos": ["synth-s0-0000.mp4"], "problem_id": "x"}),
        json.dumps({"video": "synth-s0-0001.mp4", "video_id": "custom-id"}),
        "{not json",
        json.dumps({"question": "no video here"}),
        json.dumps({"path": "synth-s0-0000.mp4"}),  # the same key again: captioned once
        json.dumps({"path": "short.mp4"}),
    ]) + "\n")
    r = CaptionRecipe.model_validate({
        "data": {"input": str(listing), "video_dir": str(videos / "videos"), "limit": 2},
        "output": {"dir": str(tmp_path / "out")}, "caption": {"clip_seconds": 3.0, "frames_per_clip": 2},
        "video": {"max_pixels": 56 * 56}})
    summary, run = run_stage(r)
    records = read_jsonl(run.file("captions.jsonl"))
    assert [(x["video"], x["video_id"]) for x in records] == [("synth-s0-0000.mp4", "synth-s0-0000"),
                                                             ("synth-s0-0001.mp4", "custom-id")]
    assert summary["failed"] == 2 and summary["videos"] == 2
    reasons = [e["reason"] for e in read_jsonl(run.file("errors.jsonl"))]
    assert "malformed JSON line" in reasons[0] and "names no video" in reasons[1]


def test_demo_recipe_with_tiny_vlm(videos, tmp_path, lvr):
    """The real CLI and the real transformers backend (a random tiny Qwen2.5-VL)."""
    out = tmp_path / "run"
    proc = lvr("caption", "recipes/demo/caption.toml", f'data.input="{videos / "videos"}/s*.mp4"', "data.limit=2",
               "caption.clip_seconds=3.0", "caption.frames_per_clip=3", "backend.max_tokens=6",
               f'output.dir="{out}"')
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["captioned"] == 2 and summary["clips"] == 1 + 3 and summary["failed"] == 0
    records = read_jsonl(out / "captions.jsonl")
    assert [Path(r["video"]).name for r in records] == ["short.mp4", "synth-s0-0000.mp4"]
    assert all(isinstance(c["caption"], str) and c["caption"] for r in records for c in r["clips"])
