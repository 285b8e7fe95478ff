"""LongVideo-Reason exactly as released, through every stage that reads it.

The records are written field by field as the release has them (the Hub dataset
`LongVideo-Reason/longvideo-reason`, test split, as NVlabs/Long-RL `eval/eval.py` and lmms-eval's
`longvideo_reason` task read it): `problem_id` an int, the options as `A. ...` lines inside
`problem`, `data_type`, `problem_type` the category, `videos` ONE path string under
`longvila_videos/`, `answer` wrapped in `<answer>` tags. The videos sit where the release's
archives extract them, `longvideo_eval_subset<N>/`, as mp4, webm and mkv. The same records go
in as JSON Lines and as a JSON array. Rows shaped like the release's malformed ones (no option
lines; generator scratchpad in the option block) are reported with the reason and left out.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lvr_cli.recipes import load_recipe
from lvr_cli.schema import FilterRecipe
from lvr_cli.rundir import RunDir
from stages import eval as ev
from stages import filter as filt
from stages.algo.rewards import combined_reward
from stages.data.records import answer_target, iter_records, read_records
from stages.evalkit.scoring import official_answer
from tests.unit.test_eval_formats import write_video

OPTIONS = "A. A red square crosses the screen.\nB. The screen turns green.\nC. A blue circle appears.\nD. Nothing moves."
CLIPS = [("longvideo_eval_subset0", "clip0.mp4", "libx264"), ("longvideo_eval_subset1", "clip1.webm", "libvpx"),
         ("longvideo_eval_subset2", "clip2.mkv", "libx264")]


def released(pid: int, video: str, answer: str, category: str, problem: str | None = None) -> dict:
    """One record in the release's shape and field order."""
    return {"problem_id": pid, "problem": problem if problem is not None else f"What happens after 0:00:02?\n{OPTIONS}",
            "data_type": "video", "problem_type": category, "reasoning": "The screen turns green at 0:00:02.",
            "videos": f"longvila_videos/{video}", "answer": f"<answer>{answer}</answer>"}


GOOD = [released(0, "clip0.mp4", "B", "temporal"), released(1, "clip1.webm", "C", "goal"),
        released(2, "clip2.mkv", "A", "plot"), released(3, "clip0.mp4", "D", "spatial")]
# the release's malformed rows: no option lines (problem_id 379, 857); scratchpad where the
# options should be (147, 743, 825): a lone "C." line, or an "A." paragraph before A-D
MALFORMED = [released(379, "clip1.webm", "C", "plot", "Who is the man interacting with the car?\n\n"),
             released(743, "clip2.mkv", "C", "goal",
                      "What was the primary factor?\nC. But the user wants a question that requires multiple steps."),
             released(147, "clip0.mp4", "B", "temporal",
                      "Why does it turn green?\nA. But this requires the test-taker to weigh the cues.\n" + OPTIONS)]
RECORDS = GOOD[:2] + MALFORMED[:1] + GOOD[2:3] + MALFORMED[1:] + GOOD[3:]  # file order
REASONS = {379: "no 'A. ...' option lines, but the answer 'C' names an option",
           743: "no 'A. ...' option lines, but the answer 'C' names an option",
           147: "breaks the A, B, C order after A"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """`test.jsonl`, the same records as `test.json` (a JSON array, one element over several
    lines), and `videos/longvideo_eval_subset<N>/` as the archives extract."""
    root = tmp_path_factory.mktemp("release")
    for folder, name, codec in CLIPS:
        write_video(root / "videos" / folder / name, codec=codec)
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (root / "test.json").write_text(json.dumps(RECORDS, indent=2))
    return root


def _lines(path: Path) -> dict[int, int]:
    """problem_id -> line where its record starts."""
    return {rec["problem_id"]: line for line, rec in iter_records(path)}


@pytest.mark.parametrize("name", ["test.jsonl", "test.json"])
def test_training_stages_read_the_release_and_report_its_malformed_rows(release, name):
    """What `lvr sft` and `lvr rl` read (`read_records`) and then ask the runtime for."""
    from stages.models.adapter import load_adapter
    from tests.helpers import make_runtime
    from lvr_cli.sections import VideoSection

    errors = []
    records = read_records(release / name, on_error=lambda line, why: errors.append((line, why)))
    assert [r["problem_id"] for r in records] == [0, 1, 2, 3]
    lines = _lines(release / name)
    assert [line for line, _ in errors] == [lines[379], lines[743], lines[147]]
    for (line, why), bad in zip(errors, MALFORMED):
        assert why.startswith(f"{release / name}:{line}: RecordError: ") and REASONS[bad["problem_id"]] in why
    first = records[0]
    assert (first["question"], first["category"], first["answer"]) == ("What happens after 0:00:02?", "temporal", "B")
    assert first["options"]["B"] == "The screen turns green." and first["videos"] == ["longvila_videos/clip0.mp4"]
    # sft's target and rl's reward see a bare letter, not the release's tags
    assert answer_target(first["reasoning"], first["answer"]).endswith("<answer>B</answer>")
    for rec in records:
        right = combined_reward(f"<think>x</think><answer>{rec['answer']}</answer>", rec["answer"],
                                options=rec["options"])
        assert right["accuracy"] == 1.0
    # the runtime finds each video in its longvideo_eval_subset<N>/ folder (mp4, webm, mkv)
    rt = make_runtime(load_adapter("tiny:qwen2.5-vl"), video=VideoSection(max_frames=4, max_pixels=56 * 56))
    for rec in records:
        s = rt.sample(rec, release / "videos")
        assert len(set(s.video.timestamps_s)) == 4 and s.key == str(rec["problem_id"])
        prompt = rt.adapter.tokenizer.decode(s.prompt.input_ids)
        assert OPTIONS.splitlines()[1] in prompt and "<answer>" in prompt


def test_lvr_filter_runs_on_the_release(release, tmp_path):
    """`lvr filter` end to end (in process, tiny model) on the JSON array: every good record
    scored, the malformed ones in errors.jsonl, and rl/sft outputs re-readable."""
    recipe = FilterRecipe.model_validate({
        "stage": "filter", "data": {"input": str(release / "test.json"), "video_dir": str(release / "videos")},
        "video": {"max_frames": 4, "max_pixels": 56 * 56}, "filter": {"samples": 2, "max_new_tokens": 6},
        "output": {"dir": str(tmp_path / "run")}})
    run = RunDir(Path(recipe.output.dir), recipe).open()
    summary = run.finish(filt.run(recipe, run))
    assert summary["items"] == 4 and summary["scored"] == 4 and summary["failed"] == 3
    errors = [json.loads(x) for x in run.file("errors.jsonl").read_text().splitlines()]
    lines = _lines(release / "test.json")
    assert sorted(e["key"] for e in errors) == sorted(f"{release / 'test.json'}:{lines[p]}" for p in (379, 743, 147))
    out = [json.loads(x) for x in (run.file("rl.jsonl").read_text() + run.file("sft.jsonl").read_text()).splitlines()]
    assert sorted(r["problem_id"] for r in out) == [0, 1, 2, 3] and {r["answer"] for r in out} <= set("ABCD")
    assert len(read_records(run.file("sft.jsonl"), on_error=lambda *e: pytest.fail(str(e)))) == len(out) - len(
        read_records(run.file("rl.jsonl"), on_error=lambda *e: pytest.fail(str(e))))


def test_eval_items_are_the_same_from_jsonl_and_from_a_json_array(release):
    errors = []
    data = SimpleNamespace(video_dir=str(release / "videos"), limit=None, format="auto")
    from_jsonl = ev.load_items(SimpleNamespace(**vars(data), input=str(release / "test.jsonl")),
                               lambda *e: errors.append(e))
    from_array = ev.load_items(SimpleNamespace(**vars(data), input=str(release / "test.json")),
                               lambda *e: errors.append(e))
    assert from_jsonl == from_array and [it.key for it in from_jsonl] == ["0", "1", "2", "3"]
    assert [it.answer for it in from_jsonl] == ["B", "C", "A", "D"]
    assert from_jsonl[1].video == str(release / "videos" / "longvideo_eval_subset1" / "clip1.webm")
    assert [it.groups["category"] for it in from_jsonl] == ["temporal", "goal", "plot", "spatial"]
    assert len(errors) == 6 and all("RecordError" in why for _, why in errors)


def test_lvr_eval_end_to_end_on_the_released_layout(release, tmp_path, lvr):
    out = tmp_path / "run"
    recipe = tmp_path / "eval.toml"
    recipe.write_text(f"""stage = "eval"
[data]
input = "{release / 'test.json'}"
video_dir = "{release / 'videos'}"
format = "longvideo-reason"
[video]
max_frames = 4
max_pixels = 3136
[generation]
max_new_tokens = 8
batch_per_rank = 4
[output]
dir = "{out}"
""")
    r = lvr("eval", recipe)
    assert r.returncode == 1 and "3 input(s) failed" in r.stderr, r.stderr  # exit 1: the malformed rows
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["key"] for p in preds] == ["0", "1", "2", "3"]
    for p, rec in zip(preds, GOOD):
        assert p["answer"] == rec["answer"][len("<answer>"):-len("</answer>")] and p["category"] == rec["problem_type"]
        assert Path(p["video"]).parent.name.startswith("longvideo_eval_subset") and p["frames_sampled"] == 4
        assert p["correct_strict"] == (official_answer(p["prediction"]) == p["answer"])
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    lines = _lines(release / "test.json")
    assert [e["key"] for e in errors] == [f"{release / 'test.json'}:{lines[p]}" for p in (379, 743, 147)]
    for e, bad in zip(errors, MALFORMED):
        assert REASONS[bad["problem_id"]] in e["reason"]
    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 4 and results["failed"] == 3 and results["formats"] == ["longvideo-reason"]
    assert set(results["by_frames"]["4"]["by_category"]) == {"temporal", "goal", "plot", "spatial"}
    assert load_recipe(recipe).data.format == "longvideo-reason"
