"""`lvr eval`: answer extraction, accuracy aggregation, eval-set formats, and a real run."""

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr_cli.recipes import RecipeError, load_recipe
from stages import eval as ev
from stages.data import synth
from stages.data.records import CATEGORIES
from stages.data.video import probe
from stages.evalkit.scoring import official_answer
from stages.evalkit.stats import wilson

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize("text, letter", [
    ("<think>A looks wrong, so</think><answer>b</answer>", "B"),  # lower-case letter in the tag
    ("<think>...</think><answer>blue</answer>", "C"),  # the option text instead of a letter
    ("<answer>The screen is Blue.</answer>", None),  # text that is not exactly an option
    ("<answer>A, C</answer>", None),  # several letters: wrong, not a guess
    ("<answer>A or B</answer>", None),
    ("<answer>B</answer> ... <answer>(D)</answer>", "D"),  # the last block counts
    ("<answer></answer> B", None),  # an empty answer block is the answer
    ("The answer is D.", "D"),  # no tags: free text
    ("  c  ", "C"),  # a lone letter
    ("yellow", "D"),
    ("<think>It could be A or the answer is B</think>", None),  # reasoning only: letters inside think ignored
    ("<think>first A, then</think> so the answer is C", "C"),
    ("<think>the screen turns blue\n<answer>C", "C"),  # cut off by max_new_tokens: unclosed tags
    ("A red screen follows.", None),  # a sentence starting with an article
    ("", None),
])
def test_extract_prediction(text, letter):
    assert ev.extract_prediction(text, OPTIONS) == letter


def test_options_dict_reads_lists_labelled_or_not_and_dicts():
    assert ev.options_dict(["A. Apples.", "B. Two", "C) three", "D. four"]) == {
        "A": "Apples.", "B": "Two", "C": "three", "D": "four"}
    assert ev.options_dict(["red", "green"]) == {"A": "red", "B": "green"}
    assert ev.options_dict({"a": "x", "(B)": "y"}) == {"A": "x", "B": "y"}
    with pytest.raises(ev.RecordError, match="options"):
        ev.options_dict("A. x")


def _row(frames, correct, extracted="A", **groups):
    reply = f"<answer>{extracted}</answer>" if extracted else "no idea"
    return {"frames": frames, "correct": correct, "extracted": extracted, "prediction": reply,
            "answer": extracted if correct else "Z", **groups}


def _acc(score):
    """The lenient part of a score, as the aggregate test checks it."""
    return {k: score[k] for k in ("correct", "total", "accuracy")}


def test_aggregate_per_category_and_duration_with_counts():
    rows = [
        _row(8, True, category="temporal"), _row(8, False, category="temporal"),
        _row(8, True, category="temporal"), _row(8, False, None, category="goal"),
        _row(8, True, category="plot"),
        _row(4, False, None, category="temporal"), _row(4, True, category="plot"),
    ]
    res = ev.aggregate(rows)
    assert list(res) == [4, 8]
    at8 = res[8]
    assert _acc(at8["overall"]) == {"correct": 3, "total": 5, "accuracy": 0.6}
    assert at8["overall"]["ci95"] == pytest.approx([0.2307, 0.8824], abs=1e-4)  # Wilson, 3 of 5
    assert at8["overall"]["correct_strict"] == 3  # every reply here is an exact "<answer>X</answer>"
    assert at8["unparsed"] == 1 and at8["well_formed"]["correct"] == 4 and at8["format"]["correct"] == 0
    assert list(at8["by_category"]) == ["temporal", "goal", "plot"]  # the paper's order, absent ones left out
    assert _acc(at8["by_category"]["temporal"]) == {"correct": 2, "total": 3, "accuracy": pytest.approx(2 / 3)}
    assert _acc(at8["by_category"]["goal"]) == {"correct": 0, "total": 1, "accuracy": 0.0}
    assert at8["by_category"]["goal"]["ci95"] == pytest.approx([0.0, 0.7935], abs=1e-4)
    assert res[4]["overall"]["accuracy"] == 0.5 and res[4]["unparsed"] == 1

    mme = [_row(16, True, duration="long", task_type="OCR"), _row(16, False, duration="short", task_type="OCR"),
           _row(16, True, duration="short", task_type="Counting"), _row(16, True, duration="medium")]
    at16 = ev.aggregate(mme)[16]
    assert list(at16["by_duration"]) == ["short", "medium", "long"]
    assert _acc(at16["by_duration"]["short"]) == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert {v: _acc(s) for v, s in at16["by_task_type"].items()} == {
        "Counting": {"correct": 1, "total": 1, "accuracy": 1.0}, "OCR": {"correct": 1, "total": 2, "accuracy": 0.5}}
    assert "by_category" not in at16 and at16["overall"]["accuracy"] == 0.75


VIDEOMME = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
     "question": "How many red socks are above the fireplace?",
     "options": ["A. 0.", "B. 1.", "C. 2.", "D. 3."], "answer": "C"},
    {"video_id": "002", "duration": "long", "domain": "Sports", "sub_category": "Football",
     "videoID": "xyz_123", "question_id": "002-3", "task_type": "Action Reasoning",
     "question": "Who scores?", "options": ["A. The keeper", "B. Nobody", "C. The striker", "D. A fan"],
     "answer": "B"},
]


def _data(input_path, **kw):
    return SimpleNamespace(input=str(input_path), video_dir=kw.get("video_dir"), limit=kw.get("limit"),
                           format=kw.get("format", "auto"))


def test_videomme_parquet_and_jsonl_read_into_the_same_items(tmp_path):
    pq.write_table(pa.Table.from_pylist(VIDEOMME), tmp_path / "test.parquet")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in VIDEOMME))
    errors = []
    from_parquet = ev.load_items(_data(tmp_path / "test.parquet", video_dir="/videos"), lambda *e: errors.append(e))
    from_jsonl = ev.load_items(_data(tmp_path / "test.jsonl", video_dir="/videos"), lambda *e: errors.append(e))
    assert errors == [] and from_parquet == from_jsonl
    first = from_parquet[0]
    assert first.key == "001-1" and first.answer == "C" and first.format == "videomme"
    assert first.options == {"A": "0.", "B": "1.", "C": "2.", "D": "3."}
    assert first.video == "/videos/fFjv93ACGo8.mp4"
    assert first.groups == {"duration": "short", "domain": "Knowledge", "task_type": "Counting Problem"}
    # default video_dir: the input's folder
    assert ev.load_items(_data(tmp_path / "test.jsonl"), print)[1].video == str(tmp_path / "xyz_123.mp4")


def test_bad_records_are_reported_and_left_out(tmp_path):
    lvr = {"problem_id": "q1", "problem": "Which colour?\nA. red\nB. green", "problem_type": "temporal",
           "videos": ["videos/v.mp4"], "answer": "B"}
    lines = [json.dumps(lvr), "{not json", json.dumps({**lvr, "problem_id": "q2", "answer": "E"}),
             json.dumps(lvr), json.dumps({"foo": 1}), json.dumps({**VIDEOMME[0], "duration": "epic"}),
             json.dumps({**lvr, "problem_id": "q3", "answer": "b"})]
    (tmp_path / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    errors = []
    items = ev.load_items(_data(tmp_path / "mixed.jsonl"), lambda where, why: errors.append((where, why)))
    assert [it.key for it in items] == ["q1", "q3"]
    assert items[1].answer == "B" and items[0].groups == {"category": "temporal"}
    assert items[0].video == str(tmp_path / "videos" / "v.mp4")
    reasons = " | ".join(why for _, why in errors)
    assert len(errors) == 5
    for part in ("malformed JSON", "answer 'E' is not one of the options", "duplicate key 'q1'", "neither", "'epic'"):
        assert part in reasons
    assert errors[0][0] == f"{tmp_path / 'mixed.jsonl'}:2"
    assert len(ev.load_items(_data(tmp_path / "mixed.jsonl", limit=1), lambda *e: None)) == 1


def test_fewer_than_two_options_is_refused_with_its_reason(tmp_path):
    lvr = {"problem_id": "q1", "problem": "Which colour?\nA. red\nB. green", "videos": ["v.mp4"], "answer": "A"}
    one = {**lvr, "problem_id": "q2", "problem": "Which colour?\nA. red"}
    mme = {**VIDEOMME[0], "options": ["A. 0."], "answer": "A"}
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (lvr, one, mme)))
    errors = []
    items = ev.load_items(_data(tmp_path / "few.jsonl"), lambda where, why: errors.append((where, why)))
    assert [it.key for it in items] == ["q1"]
    assert [w for w, _ in errors] == [f"{tmp_path / 'few.jsonl'}:2", f"{tmp_path / 'few.jsonl'}:3"]
    for _, why in errors:
        assert why == "RecordError: options: only A; a multiple-choice item needs at least two"


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\t\n"), ("empty.json", ""),
                                        ("list.json", "[]")])
def test_an_eval_file_without_records_is_refused_naming_it(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ev.EmptyEvalSetError) as e:
        ev.load_items(_data(tmp_path / name), lambda *_: None)
    assert str(e.value) == f"data.input: {tmp_path / name} holds no records (empty, or only blank lines)"
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    # a file of malformed lines is not empty: its lines are reported and the run goes on
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    errors = []
    assert ev.load_items(_data(tmp_path / "bad.jsonl"), lambda *e: errors.append(e)) == [] and len(errors) == 1


def test_recipe_refuses_an_empty_frame_sweep(tmp_path):
    p = tmp_path / "e.toml"
    p.write_text('stage = "eval"\n[data]\ninput = "x.jsonl"\n')
    with pytest.raises(RecipeError, match="video.frames: an empty list"):
        load_recipe(p, ["video.frames=[]"])
    with pytest.raises(RecipeError, match="mrsp.sp_size: 2 does not divide"):
        load_recipe(p, ["mrsp.sp_size=2", "launch.nproc_per_node=3"])


# -- end to end: the real CLI on tiny synthetic data with the tiny model -------------------------------
@pytest.fixture(scope="module")
def evalset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalset")
    from lvr_cli.schema import SynthSpec

    cfg = SynthSpec(videos=2, seconds=12.0, fps=2.0, width=56, height=56, object_size_px=28, event_seconds=4.0,
                    eval_fraction=0.5)
    synth.generate(cfg, out, seed=3)
    records = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()][:4]
    (out / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    broken = {**records[0], "problem_id": "broken", "videos": ["videos/broken.mp4"]}
    (out / "eval5.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2] + [broken] + records[2:]))
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_lvr_eval_end_to_end_sweep_resume_and_a_corrupt_video(lvr, evalset, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "eval.toml"
    recipe.write_text(f"""stage = "eval"
[data]
input = "{evalset / 'eval5.jsonl'}"
[video]
frames = [8, 4]
fps = 0.5
max_pixels = 3136
[generation]
max_new_tokens = 12
batch_per_rank = 3
[output]
dir = "{out}"
""")
    first = lvr("eval", recipe)
    assert first.returncode == 1, first.stderr  # one input failed and --allow-failures was not given
    assert "1 input(s) failed" in first.stderr

    preds = _read(out / "predictions.jsonl")
    keys = {(p["key"], p["frames"]) for p in preds}
    assert len(preds) == len(keys) == 8  # 4 good items x 2 frame counts, the corrupt one in neither
    assert {p["frames"] for p in preds} == {4, 8} and "broken" not in {p["key"] for p in preds}
    source = {r["problem_id"]: r for r in _read(evalset / "eval5.jsonl")}
    for p in preds:
        assert set(p) >= {"key", "frames", "prediction", "extracted", "answer", "correct", "category"}
        rec = source[p["key"]]
        assert (p["answer"], p["category"]) == (rec["answer"], rec["problem_type"])
        assert p["extracted"] == ev.extract_prediction(p["prediction"], rec["options"])
        assert p["correct"] == p["correct_lenient"] == (p["extracted"] == p["answer"])
        assert p["correct_strict"] == (official_answer(p["prediction"]) == p["answer"])
        assert (p["question"], p["options"]) == (rec["question"], rec["options"]) and p["blind"] is False
        assert p["video"] == str(evalset / rec["videos"][0]) and (p["fps"], p["max_pixels"]) == (0.5, 3136)
        # the 0.5 fps cap, not the budget, sets how many frames were decoded
        info = probe(p["video"])
        at_cap = round(info.num_frames / info.fps * 0.5)
        assert p["frames_sampled"] == min(p["frames"], at_cap) and at_cap < 8
        step = info.num_frames / p["frames_sampled"]
        assert p["first_s"] == pytest.approx(int(0.5 * step) / info.fps)
        assert p["last_s"] == pytest.approx(int((p["frames_sampled"] - 0.5) * step) / info.fps)
    errors = _read(out / "errors.jsonl")
    assert [e["key"] for e in errors] == ["broken"]  # once, not once per frame count
    assert "broken.mp4" in errors[0]["reason"]

    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 5 and results["failed"] == 1 and results["frames"] == [4, 8]
    at8 = results["by_frames"]["8"]
    rows8 = [p for p in preds if p["frames"] == 8]
    correct8, strict8 = sum(p["correct"] for p in rows8), sum(p["correct_strict"] for p in rows8)
    assert at8["overall"] == {"correct": correct8, "total": 4, "accuracy": correct8 / 4,
                              "ci95": pytest.approx(list(wilson(correct8, 4))), "correct_strict": strict8,
                              "accuracy_strict": strict8 / 4, "ci95_strict": pytest.approx(list(wilson(strict8, 4)))}
    assert at8["frames_sampled"]["max"] < 8 and results["by_frames"]["4"]["frames_sampled"]["max"] == 4
    prov = results["provenance"]
    assert prov["model"] == {"path": "tiny:qwen2.5-vl", "source": "tiny", "name": "tiny:qwen2.5-vl", "revision": None}
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(ev.__file__).parent)
    assert prov["git_commit"] == head.stdout.strip() and prov["date"][:2] == "20" and prov["blind"] is False
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(ev.__file__).parent).stdout.strip() != ""
    assert prov["git_dirty"] is dirty
    assert prov["generation"] == {"max_new_tokens": 12, "temperature": 0.0, "batch_per_rank": 3, "top_p": 1.0,
                                  "greedy": True}
    assert prov["video"]["fps"] == 0.5 and prov["video"]["frames"] == [8, 4] and "blind" not in results
    letters = at8["letters"]
    assert sum(letters["gold"].values()) == 4 and sum(letters["predicted"].values()) == 4
    assert letters["majority"]["correct"] == max(letters["gold"].values())
    assert at8["unparsed"] == sum(p["extracted"] is None for p in rows8)
    assert sum(s["total"] for s in at8["by_category"].values()) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == at8["overall"]["accuracy"] and summary["failed"] == 1
    assert summary["items"] == 5 and summary["frames"] == 8 and set(summary["by_category"]) <= set(CATEGORIES)
    lo, hi = wilson(correct8, 4)
    assert summary["accuracy_ci95"] == f"[{lo:.4f}, {hi:.4f}]" and summary["n"] == 4
    assert summary["accuracy_strict"] == strict8 / 4 and set(summary["by_category_n"]) == set(summary["by_category"])
    assert (out / "accuracy_vs_frames.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| frames | sampled | n | accuracy % | 95% CI | strict % |" in report and "## By category (8 frames)" in report
    assert "## Baselines (8 frames, the same 4 items)" in report and "| always the majority gold letter (" in report

    # killed mid-way: two predictions lost, no summary -> the re-run does only those two
    kept = preds[:3] + preds[5:]
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in kept))
    (out / "summary.json").unlink()
    second = lvr("eval", recipe, "--allow-failures")
    assert second.returncode == 0, second.stderr
    again = _read(out / "predictions.jsonl")
    assert len(again) == 8 and len({(p["key"], p["frames"]) for p in again}) == 8
    by_key = {(p["key"], p["frames"]): p for p in again}
    for p in preds[3:5]:  # greedy decoding: the redone predictions are the same
        assert by_key[(p["key"], p["frames"])]["prediction"] == p["prediction"]
    assert json.loads((out / "summary.json").read_text())["resumed"] is True
    assert json.loads((out / "results.json").read_text())["by_frames"] == results["by_frames"]


class _Run:
    """What `stages.eval.run` asks of a run directory, in process (no RunDir, so a recipe object
    with fields the schema may not have yet can be run)."""

    def __init__(self, path: Path):
        self.path, self.errors, self.totals = path, [], []
        path.mkdir(parents=True, exist_ok=True)

    def error(self, key, reason, **extra):
        self.errors.append((key, reason))

    def file(self, name):
        return self.path / name

    @contextmanager
    def progress(self, description, total):
        self.totals.append(total)
        yield SimpleNamespace(advance=lambda n=1: None)


def test_blind_decodes_every_item_without_its_video_first_and_resumes(evalset, tmp_path):
    from stages.evalkit.baselines import generate_blind
    from stages.models.adapter import load_adapter
    from stages.mrsp.rollout import Sampling
    from lvr_cli.sections import PromptSection
    from tests.helpers import make_runtime

    (tmp_path / "e.toml").write_text(f'stage = "eval"\n[data]\ninput = "{evalset / "eval5.jsonl"}"\n'
                                     '[video]\nframes = [4]\nmax_pixels = 3136\n[prompt]\nsystem = "Be brief."\n'
                                     '[generation]\nmax_new_tokens = 8\nbatch_per_rank = 2\n')
    loaded = load_recipe(tmp_path / "e.toml", [])
    recipe = SimpleNamespace(**({k: getattr(loaded, k) for k in type(loaded).model_fields}
                                | {"eval": SimpleNamespace(blind=True, fields=None, subtitles=False)}))
    run = _Run(tmp_path / "run")
    summary = ev.run(recipe, run)
    preds = _read(run.path / "predictions.jsonl")
    keys = [r["problem_id"] for r in _read(evalset / "eval5.jsonl")]
    assert [(p["key"], p["frames"], p["blind"]) for p in preds[:5]] == [(k, 0, True) for k in keys]  # blind first
    assert [p["frames"] for p in preds[5:]] == [4] * 4 and "broken" not in {p["key"] for p in preds[5:]}
    assert all(p["frames_sampled"] == 0 and p["first_s"] is None and p["fps"] is None for p in preds[:5])
    assert run.totals == [5 + 5] and [k for k, _ in run.errors] == ["broken"]

    # the blind replies are the model's with the recipe's prompt and no video, seeded by item place
    a = load_adapter("tiny:qwen2.5-vl")
    rt = make_runtime(a, prompt=PromptSection(system="Be brief.", think=True))
    items = ev.load_items(loaded.data, lambda *_: None)
    ref = generate_blind(rt, items, Sampling(0.0, 1.0, 8, seed=0), list(range(5)))
    assert [p["prediction"] for p in preds[:5]] == [rt.response_text(r.token_ids) for r in ref]

    results = json.loads((run.path / "results.json").read_text())
    blind_ok = sum(p["correct"] for p in preds[:5] if p["key"] != "broken")  # the same 4 items as with video
    assert results["blind"]["overall"]["correct"] == blind_ok and results["blind"]["overall"]["total"] == 4
    assert results["blind"]["paired"]["lenient"]["n"] == 4 and results["provenance"]["blind"] is True
    assert summary["accuracy_blind"] == blind_ok / 4 and summary["failed"] == 1
    assert "| blind: same model and prompt, no video (lenient) |" in (run.path / "report.md").read_text()

    # killed mid-way: a blind and a video reply lost -> the re-run redoes just those, identically
    kept = preds[:2] + preds[3:-1]
    (run.path / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in kept))
    again = _Run(run.path)
    ev.run(recipe, again)
    by_key = {(p["key"], p["frames"]): p for p in _read(run.path / "predictions.jsonl")}
    assert by_key == {(p["key"], p["frames"]): p for p in preds} and again.totals == [2 + 1]


def test_lvr_eval_refuses_a_file_without_records_in_one_line_and_leaves_no_run(tmp_path, lvr):
    data, out = tmp_path / "blank.jsonl", tmp_path / "run"
    data.write_text("\n  \n")
    r = lvr("eval", "recipes/demo/eval.toml", f"data.input={json.dumps(str(data))}",
            f"output.dir={json.dumps(str(out))}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: recipes/demo/eval.toml: data.input: {data} holds no records (empty, or only blank lines)"
    assert not out.exists()  # the corrected command starts afresh
