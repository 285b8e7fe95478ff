"""Benchmark layouts `lvr eval` reads as published: LongVideoBench (lvb_val.json and its parquet),
MLVU dev (json/<N>_<task>.json + video/<N>_<task>/), VideoMME with subtitles (data/ + subtitle/),
any layout through `[eval.fields]`; videos found by name below `data.video_dir`; each layout's
own groupings in the results."""

import json
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lvr_cli.recipes import RecipeError, load_recipe
from stages import eval as ev
from stages.data.records import RecordError
from stages.data.video_index import AmbiguousVideoError, find_video
from stages.evalkit import report, subtitles
from stages.evalkit.formats import READERS
from stages.evalkit.formats.base import FORMATS, answer_letter
from stages.evalkit.scoring import PREDICTION_FIELDS, prediction_row

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


def write_video(path: Path, frames: int = 8, size: int = 56, fps: int = 2, codec: str = "libx264") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(frames):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((size, size, 3), 20 * i % 256, np.uint8), format="rgb24")))
        c.mux(s.encode(None))
    return path


def data(input_path, video_dir=None, fmt="auto", limit=None):
    return SimpleNamespace(input=str(input_path), video_dir=str(video_dir) if video_dir else None, limit=limit,
                           format=fmt)


def load(d, **kw):
    errors = []
    items = ev.load_items(d, lambda where, why: errors.append((where, why)), **kw)
    return items, errors


# -- answers and videos -----------------------------------------------------------------------------
@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("b", "B"), ("<answer>C</answer>", "C"), ("(D)", "D"), ("blue", "C"),  # MLVU writes the text
    (0, "A"), (3, "D"),  # LongVideoBench's correct_choice: a 0-based index
])
def test_answer_letter_reads_every_way_a_layout_writes_the_answer(answer, letter):
    assert answer_letter(answer, OPTIONS) == letter


def test_answer_letter_refuses_what_names_no_option():
    for bad, why in [(4, "answer index 4 is out of range"), ("E", "does not name one of the options"),
                     ("purple", "does not name one of the options"), (None, "expected a letter")]:
        with pytest.raises(RecordError, match=why):
            answer_letter(bad, OPTIONS)
    assert answer_letter("a2", {"A": "x", "B": "y", "C": "z"}, names=["a0", "a1", "a2"]) == "C"  # TVQA's a0..a4


def test_a_bare_name_is_found_once_below_video_dir_and_a_repeated_one_refused(tmp_path):
    a = write_video(tmp_path / "longvideo_eval_subset3" / "x.webm", codec="libvpx")
    assert find_video(tmp_path, "longvila_videos/x.webm") == a.resolve()  # the path the records name is absent
    assert find_video(tmp_path, "nope.mp4") == tmp_path / "nope.mp4"  # not found: decoding names it
    assert find_video(tmp_path, "fFjv93ACGo8.mp4", stem="x") == a.resolve()  # VideoMME's id, any suffix
    write_video(tmp_path / "other" / "y.mp4")
    write_video(tmp_path / "more" / "y.mp4")
    from stages.data.video_index import video_index
    video_index.cache_clear()
    with pytest.raises(AmbiguousVideoError, match=r"video 'y.mp4' is ambiguous under .*more/y.mp4, .*other/y.mp4"):
        find_video(tmp_path, "y.mp4")
    assert find_video(tmp_path, "y.mp4", folder_hint="other") == (tmp_path / "other" / "y.mp4").resolve()


# -- LongVideoBench ------------------------------------------------------------------------------------
LVB = [  # lvb_val.json: a JSON array; video_path relative to videos/, correct_choice 0-based
    {"video_id": "86CxyhFV9MI", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
     "subtitle_path": "86CxyhFV9MI_en.json", "duration": 23.6, "duration_group": 15,
     "starting_timestamp_for_subtitles": 0, "question": "What is the man holding when the screen turns green?",
     "candidates": ["a cup", "a phone", "a book"], "correct_choice": 1, "question_category": "S2E"},
    {"video_id": "Tz2pDF7gQ1k", "id": "Tz2pDF7gQ1k_2", "video_path": "Tz2pDF7gQ1k.mp4",
     "subtitle_path": "Tz2pDF7gQ1k_en.json", "duration": 480.0, "duration_group": 600,
     "starting_timestamp_for_subtitles": 0, "question": "Which object appears first?",
     "candidates": ["a dog", "a car", "a tree", "a lamp", "a hat"], "correct_choice": 4, "question_category": "TOS"},
]


def test_longvideobench_val_json_and_its_parquet_read_into_the_same_items(tmp_path):
    for v in LVB:
        write_video(tmp_path / "LongVideoBench" / "videos" / v["video_path"])
    (tmp_path / "LongVideoBench" / "lvb_val.json").write_text(json.dumps(LVB, indent=2))
    slots = [{k: v for k, v in r.items() if k != "candidates"}
             | {f"option{i}": (r["candidates"][i] if i < len(r["candidates"]) else "N/A") for i in range(5)}
             for r in LVB]
    pq.write_table(pa.Table.from_pylist(slots), tmp_path / "validation.parquet")
    root = tmp_path / "LongVideoBench"
    items, errors = load(data(root / "lvb_val.json", root))
    parquet, _ = load(data(tmp_path / "validation.parquet", root))
    assert errors == [] and items == parquet and [it.format for it in items] == ["longvideobench"] * 2
    first, second = items
    assert (first.key, first.answer, first.options) == ("86CxyhFV9MI_0", "B", {"A": "a cup", "B": "a phone",
                                                                                "C": "a book"})
    assert second.answer == "E" and len(second.options) == 5
    assert first.video == str((root / "videos" / "86CxyhFV9MI.mp4").resolve())  # found below video_dir
    assert first.groups == {"duration_group": "15", "question_category": "S2E"}
    # lvb_test_wo_gt.json has no correct_choice: each item refused, not scored
    (tmp_path / "lvb_test_wo_gt.json").write_text(json.dumps([{k: v for k, v in LVB[0].items()
                                                               if k != "correct_choice"}]))
    items, errors = load(data(tmp_path / "lvb_test_wo_gt.json", root))
    assert items == [] and "no correct_choice: a file without ground truth" in errors[0][1]
    assert errors[0][0] == f"{tmp_path / 'lvb_test_wo_gt.json'}:1"


# -- MLVU ------------------------------------------------------------------------------------------------
PLOT = [{"video": "movie101_66.mp4", "duration": 246, "question": "What color is the main male character?",
         "candidates": ["Yellow", "Red", "Green", "Blue"], "answer": "Yellow", "question_type": "plotQA"},
        {"video": "movie101_67.mp4", "duration": 120, "question": "Who leaves first?",
         "candidates": ["The girl", "The dog"], "answer": "The dog", "question_type": "plotQA"}]
NEEDLE = [{"video": "needle_32.mp4", "duration": 467.98, "question": "What does the hand do?",
           "candidates": ["Waves", "Points", "Claps", "Knocks"], "answer": "Claps", "question_type": "findNeedle"},
          {"video": "movie101_66.mp4", "duration": 246, "question": "Which number appears?",
           "candidates": ["7", "12", "33", "99"], "answer": "33", "question_type": "findNeedle"}]
SUMMARY = [{"video": "subPlot_1.mp4", "duration": 500, "question": "Please summarize this video.",
            "answer": "A man walks a dog.", "question_type": "summary"}]


@pytest.fixture(scope="module")
def mlvu(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("MLVU")
    for name, task, recs in [("1_plotQA", "plotQA", PLOT), ("2_needle", "findNeedle", NEEDLE),
                             ("9_summary", "summary", SUMMARY)]:
        (root / "json").mkdir(exist_ok=True)
        (root / "json" / f"{name}.json").write_text(json.dumps(recs, indent=2))
        for r in recs:
            write_video(root / "video" / name / r["video"])  # movie101_66.mp4 is in two task folders
    return root


def test_mlvu_dev_reads_every_task_file_with_text_answers(mlvu):
    items, errors = load(data(mlvu / "json" / "*.json", mlvu / "video"))
    assert [(it.answer, it.groups["question_type"]) for it in items] == [
        ("A", "plotQA"), ("B", "plotQA"), ("C", "findNeedle"), ("C", "findNeedle")]
    assert items[0].key == f"{mlvu / 'json' / '1_plotQA.json'}:2" and items[0].format == "mlvu"
    # the same file name in two task folders: each question gets its own task's copy
    assert Path(items[0].video).parent.name == "1_plotQA" and Path(items[3].video).parent.name == "2_needle"
    assert len(errors) == 1 and "no candidates: an open-ended MLVU task" in errors[0][1]


def test_mlvu_evaluated_end_to_end_per_task_type(mlvu, tmp_path):
    (tmp_path / "e.toml").write_text(f'stage = "eval"\n[data]\ninput = "{mlvu / "json" / "*.json"}"\n'
                                     f'video_dir = "{mlvu / "video"}"\nformat = "mlvu"\n[video]\nmax_frames = 4\n'
                                     'max_pixels = 3136\n[generation]\nmax_new_tokens = 4\n')
    run = _Run(tmp_path / "run")
    summary = ev.run(load_recipe(tmp_path / "e.toml"), run)
    rows = [json.loads(x) for x in (run.path / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_type"] for r in rows] == ["plotQA", "plotQA", "findNeedle", "findNeedle"]
    at = json.loads((run.path / "results.json").read_text())["by_frames"]["4"]
    assert {v: s["total"] for v, s in at["by_question_type"].items()} == {"findNeedle": 2, "plotQA": 2}
    accs = [s["accuracy"] for s in at["by_question_type"].values()]
    assert at["mean_over_groups"]["question_type"]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert summary["failed"] == 1 and [why for _, why in run.errors] == [
        "RecordError: no candidates: an open-ended MLVU task; lvr eval scores multiple choice only"]
    assert "## By question type (4 frames)" in (run.path / "report.md").read_text()


# -- [eval.fields] --------------------------------------------------------------------------------------
TVQA = [{"qid": 7, "q": "Where is Sheldon?", "a0": "kitchen", "a1": "office", "a2": "car", "a3": "hall",
         "a4": "bar", "answer": "a2", "vid_name": "s01e02_seg01.mp4", "show_name": "bbt"},
        {"qid": 8, "q": "Who knocks?", "a0": "Penny", "a1": "Leonard", "a2": "Raj", "a3": "Amy", "a4": "Bernadette",
         "answer": "a0", "vid_name": "s01e03_seg02.mp4", "show_name": "friends"}]


def _recipe(tmp_path, text: str):
    p = tmp_path / "r.toml"
    p.write_text('stage = "eval"\n' + text)
    return load_recipe(p)


def test_eval_fields_map_a_layout_lvr_does_not_know(tmp_path):
    (tmp_path / "tvqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TVQA))
    recipe = _recipe(tmp_path, f'[data]\ninput = "{tmp_path / "tvqa.jsonl"}"\n[eval.fields]\nquestion = "q"\n'
                               'options = ["a0", "a1", "a2", "a3", "a4"]\nanswer = "answer"\nvideo = "vid_name"\n'
                               'key = "qid"\ngroups = ["show_name"]\n')
    items, errors = load(recipe.data, fields=recipe.eval.fields)
    assert errors == [] and [(it.key, it.answer, it.format) for it in items] == [("7", "C", "fields"), ("8", "A", "fields")]
    assert items[0].options["C"] == "car" and items[0].groups == {"show_name": "bbt"}
    assert items[0].video == str(tmp_path / "s01e02_seg01.mp4")
    row = prediction_row(items[0], 8, "<answer>C</answer>", True, 3)
    assert row["show_name"] == "bbt" and row["group_by"] == ["show_name"] and row["correct"] is True
    by = report.aggregate([row, prediction_row(items[1], 8, "<answer>B</answer>", True, 3)])[8]
    assert {v: s["correct"] for v, s in by["by_show_name"].items()} == {"bbt": 1, "friends": 0}

    # options inside the question, a nested field, an index answer; a missing field names itself
    nested = [{"meta": {"text": "Which colour?\nA. red\nB. green"}, "gold": 1, "clip": ["v.mp4"]}, {"meta": {}}]
    (tmp_path / "nested.json").write_text(json.dumps(nested))
    spec = SimpleNamespace(question="meta.text", options=None, answer="gold", video="clip", key=None, groups=[])
    items, errors = load(data(tmp_path / "nested.json"), fields=spec)
    assert [(it.question, it.answer, it.options) for it in items] == [("Which colour?", "B", {"A": "red", "B": "green"})]
    assert errors == [(f"{tmp_path / 'nested.json'}:1", "RecordError: missing field 'meta.text' (eval.fields)")]


@pytest.mark.parametrize("text, message", [
    ('[data]\ninput = "x.jsonl"\nformat = "fields"\n', "data.format: 'fields' reads a layout through"),
    ('[data]\ninput = "x.jsonl"\nformat = "videomme"\n[eval.fields]\nquestion = "q"\nanswer = "a"\nvideo = "v"\n',
     "eval.fields: maps a layout lvr does not know; data.format 'videomme' reads its own"),
    ('[data]\ninput = "x.jsonl"\n[eval.fields]\nquestion = "q"\nanswer = "a"\nvideo = "v"\ngroups = ["answer"]\n',
     "eval.fields.groups: answer would overwrite a prediction row's own field"),
    ('[data]\ninput = "x.jsonl"\n[eval.fields]\nquestion = "q"\nanswer = "a"\n', "eval.fields.video: required key is missing"),
])
def test_a_field_mapping_that_cannot_work_is_refused_with_its_key(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        _recipe(tmp_path, text)


def test_every_format_has_a_reader_and_rows_name_their_fields():
    assert set(READERS) == set(FORMATS)
    from lvr_cli.schema import EvalDataSection
    assert EvalDataSection.model_fields["format"].annotation.__args__ == ("auto", *FORMATS)
    item = ev.EvalItem("k", "q", OPTIONS, "A", "v.mp4", {"g": "1"}, subtitled=True)
    assert set(prediction_row(item, 4, "A", True, 1, [0.0], 1.0, 3136, 2)) == set(PREDICTION_FIELDS) | {"g"}


# -- VideoMME with subtitles ---------------------------------------------------------------------------
SRT = """1
00:00:00,000 --> 00:00:01,200
<font color="white" size=".72c">Welcome back to the kitchen.</font>

2
00:00:01,200 --> 00:00:02,000
<font color="white" size=".72c">Today we bake</font>
<font color="white" size=".72c">a cake.</font>

3
00:00:02,500 --> 00:00:02,900
<font color="white" size=".72c">(between two frames: never shown)</font>

4
00:00:03,000 --> 00:00:09,000
<font color="white" size=".72c">First, the eggs.</font>
"""


def test_srt_cues_at_the_sampled_frames_in_time_order(tmp_path):
    (tmp_path / "a.srt").write_text(SRT)
    cues = subtitles.read_srt(str(tmp_path / "a.srt"))
    assert [c.text for c in cues] == ["Welcome back to the kitchen.", "Today we bake a cake.",
                                      "(between two frames: never shown)", "First, the eggs."]
    assert (cues[1].start_s, cues[1].end_s) == (1.2, 2.0)
    # frames at 0.5, 1.5, 3.5 s: cue 1 [0, 1.2), cue 2 [1.2, 2.0), cue 4; start <= t < end
    assert subtitles.lines_at(cues, [3.5, 0.5, 1.5, 3.5]) == ["Welcome back to the kitchen.", "Today we bake a cake.",
                                                             "First, the eggs."]
    assert subtitles.lines_at(cues, [1.2]) == ["Today we bake a cake."]
    assert subtitles.subtitle_block(["a", "b"]) == "This video's subtitles are listed below:\na\nb"
    assert subtitles.subtitle_block(None) == "This video's subtitles are listed below:\nNo subtitles available"
    (tmp_path / "bad.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nok\n\n2\n0:0:x --> 00:00:02,000\nno\n")
    with pytest.raises(RecordError, match=r"bad.srt:6: subtitle times '0:0:x --> 00:00:02,000' are not"):
        subtitles.read_srt(str(tmp_path / "bad.srt"))


VIDEOMME = [
    {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
     "videoID": "fFjv93ACGo8", "question_id": "001-1", "task_type": "Counting Problem",
     "question": "How many eggs?", "options": ["A. 0.", "B. 1.", "C. 2.", "D. 3."], "answer": "C"},
    {"video_id": "002", "duration": "long", "domain": "Sports", "sub_category": "Football",
     "videoID": "xyz_123", "question_id": "002-3", "task_type": "Action Reasoning",
     "question": "Who scores?", "options": ["A. The keeper", "B. Nobody", "C. The striker", "D. A fan"], "answer": "B"},
]


class _Run:
    """What `stages.eval.run` asks of a run directory, in process."""

    def __init__(self, path: Path):
        self.path, self.errors = path, []
        path.mkdir(parents=True, exist_ok=True)

    def error(self, key, reason, **extra):
        self.errors.append((key, reason))

    def file(self, name):
        return self.path / name

    @contextmanager
    def progress(self, description, total):
        yield SimpleNamespace(advance=lambda n=1: None)


@pytest.fixture(scope="module")
def videomme(tmp_path_factory) -> Path:
    """The Video-MME archive layout: data/<videoID>.mp4 (one .mkv), subtitle/<videoID>.srt (one video has none)."""
    root = tmp_path_factory.mktemp("videomme")
    write_video(root / "data" / "fFjv93ACGo8.mp4", frames=20)
    write_video(root / "data" / "xyz_123.mkv", frames=20)
    (root / "subtitle").mkdir()
    (root / "subtitle" / "fFjv93ACGo8.srt").write_text(SRT)
    pq.write_table(pa.Table.from_pylist(VIDEOMME), root / "test-00000-of-00001.parquet")
    return root


def test_videomme_with_subtitles_asks_each_item_twice_and_reports_both_per_duration(videomme, tmp_path):
    (tmp_path / "e.toml").write_text(f'stage = "eval"\n[data]\ninput = "{videomme / "test-00000-of-00001.parquet"}"\n'
                                     f'video_dir = "{videomme}"\nformat = "videomme"\n[eval]\nsubtitles = true\n'
                                     '[video]\nmax_frames = 4\nmax_pixels = 3136\n[prompt]\nthink = false\n'
                                     '[generation]\nmax_new_tokens = 4\n')
    recipe = load_recipe(tmp_path / "e.toml")
    items, errors = load(recipe.data, fields=recipe.eval.fields, subtitles=recipe.eval.subtitles)
    assert errors == [] and [it.key for it in items] == ["001-1", "002-3", "001-1 +subtitles", "002-3 +subtitles"]
    assert items[0].subtitles == str(videomme / "subtitle" / "fFjv93ACGo8.srt") and items[1].subtitles is None
    assert items[1].video == str((videomme / "data" / "xyz_123.mkv").resolve())  # the id, another suffix

    # the prompt: the lines on screen at the sampled frames, before the question
    from stages.models.adapter import load_adapter
    from tests.helpers import make_runtime
    from lvr_cli.sections import PromptSection, VideoSection
    rt = make_runtime(load_adapter("tiny:qwen2.5-vl"), video=VideoSection(max_frames=4, max_pixels=3136),
                      prompt=PromptSection(think=False))
    s, n = subtitles.item_sample(rt, items[2], 4)
    times = sorted(set(s.video.timestamps_s))  # 4 of 20 frames at 2 fps: 10 s of video
    want = subtitles.lines_at(subtitles.read_srt(items[2].subtitles), times)
    assert n == len(want) >= 1
    text = rt.adapter.tokenizer.decode(s.prompt.input_ids)
    block = subtitles.subtitle_block(want) + "\nHow many eggs?"
    assert block in text and "(between two frames" not in text
    plain, none = subtitles.item_sample(rt, items[0], 4)
    assert none is None and "subtitles" not in rt.adapter.tokenizer.decode(plain.prompt.input_ids)
    _, zero = subtitles.item_sample(rt, items[3], 4)
    assert zero == 0

    run = _Run(tmp_path / "run")
    summary = ev.run(recipe, run)
    rows = [json.loads(x) for x in (run.path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["key"], r.get("subtitles"), r.get("subtitle_lines")) for r in rows] == [
        ("001-1", None, None), ("002-3", None, None), ("001-1 +subtitles", True, n), ("002-3 +subtitles", True, 0)]
    results = json.loads((run.path / "results.json").read_text())
    assert results["items"] == 2 and results["by_frames"]["4"]["overall"]["total"] == 2
    subs = results["with_subtitles"]["4"]
    assert subs["overall"]["total"] == 2 and list(subs["by_duration"]) == ["short", "long"]
    assert subs["overall"]["correct"] == sum(r["correct"] for r in rows[2:])
    assert summary["accuracy_with_subtitles"] == subs["overall"]["accuracy"] and summary["items"] == 2
    md = (run.path / "report.md").read_text()
    assert "## Without and with subtitles (4 frames)" in md and "| duration long | 1 |" in md


# -- the groupings of each benchmark ------------------------------------------------------------------
def _row(correct: bool, **groups):
    return {"frames": 8, "correct": correct, "extracted": "A", "prediction": "<answer>A</answer>",
            "answer": "A" if correct else "B", **groups}


def test_groups_in_their_own_order_with_the_mean_over_groups():
    rows = [_row(True, duration_group="600", question_category="TOS"), _row(False, duration_group="15"),
            _row(True, duration_group="3600"), _row(True, duration_group="60"), _row(False, duration_group="60")]
    by = report.aggregate(rows)[8]
    assert list(by["by_duration_group"]) == ["15", "60", "600", "3600"]  # by value, not as text
    mlvu = [_row(True, question_type="plotQA"), _row(True, question_type="plotQA"), _row(False, question_type="plotQA"),
            _row(False, question_type="findNeedle")]
    at = report.aggregate(mlvu)[8]
    # MLVU's M-Avg: the mean of the task accuracies (2/3 and 0), not the pooled 2/4
    assert at["mean_over_groups"]["question_type"]["accuracy"] == pytest.approx(1 / 3)
    assert at["overall"]["accuracy"] == 0.5
    results = {"model": "m", "data": "d", "formats": ["mlvu"], "items": 4, "think": True, "temperature": 0.0,
               "max_new_tokens": 8, "failed": 0, "by_frames": {"8": at}}
    assert "| mean of the 2 groups | | | 33.3 |" in report.report_markdown(results, None)
    summary = report.summary_dict(results)
    assert summary["by_question_type_n"] == {"findNeedle": 1, "plotQA": 3}
    assert summary["mean_over_question_type"] == pytest.approx(0.3333)


def test_a_glob_that_matches_no_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(ev.EmptyEvalSetError, match=r"^data.input: .*/MLVU/json/\*.json: no file matches$"):
        ev.load_items(data(tmp_path / "MLVU" / "json" / "*.json"), lambda *_: None)


def test_shipped_benchmark_recipes_validate():
    root = Path(__file__).resolve().parents[2] / "recipes" / "qwen2_5_vl_7b"
    long = load_recipe(root / "eval_8k.toml", [])
    assert (long.video.max_frames, long.mrsp.sp_size, long.world_size(), long.mrsp.enabled) == (8192, 8, 8, True)
    # 32 LLM tokens per frame: 8,192 frames are 262,144 video tokens, 32,768 per GPU
    assert long.video.max_pixels // (28 * 28) * 8192 // 2 == 262_144
    formats = {name: load_recipe(root / f"{name}.toml", []).data.format
               for name in ("eval", "eval_videomme", "eval_videomme_subtitles", "eval_longvideobench", "eval_mlvu")}
    assert formats == {"eval": "longvideo-reason", "eval_videomme": "videomme", "eval_videomme_subtitles": "videomme",
                       "eval_longvideobench": "longvideobench", "eval_mlvu": "mlvu"}
    assert load_recipe(root / "eval_videomme_subtitles.toml", []).eval.subtitles is True
