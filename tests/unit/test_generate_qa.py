"""lvr generate-qa against the ground-truth stand-in server over real HTTP."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import stages.generate_qa as gq
import stages.qa_validate as qv
from lvr_cli.schema import GenerateQARecipe, SynthSpec
from lvr_cli.rundir import RunDir
from stages.data.gt_server import PLACE_BOXES, GTServer
from stages.data.records import read_jsonl
from stages.data.synth import generate

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "recipes" / "prompts"
SYNTH = SynthSpec(videos=3, seconds=7, fps=2, width=56, height=56, object_size_px=28, event_seconds=2,
                  eval_fraction=0.34, clip_seconds=3, questions_per_category=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa_data")
    generate(SYNTH, root, seed=0)
    return root


@pytest.fixture(scope="module")
def truth(data):
    recs = read_jsonl(data / "train.jsonl") + read_jsonl(data / "eval.jsonl")
    by_key = {}
    for r in recs:
        by_key.setdefault(f"{r['video_id']}/{r['category']}", []).append(r)
    return by_key


@pytest.fixture
def server(data):
    with GTServer(data) as s:
        yield s


def backend_cfg(url, **kw):
    return {"kind": "openai", "model": "gt", "base_url": url, "max_concurrency": 4, "max_retries": 2,
            "backoff_s": 0.01, "timeout_s": 10.0, **kw}


def recipe(data, url, out, **qa):
    spec = {"questions_per_category": 2, "max_attempts": 3, "refine": True, "prompts_dir": str(PROMPTS),
            "dedup_threshold": 0.9, **qa}
    body = {"data": {"input": str(data / "captions_ref.jsonl"), "video_dir": str(data / "videos")},
            "qa": spec, "backend": backend_cfg(url), "output": {"dir": str(out)}}
    if spec.get("grounding"):
        body["grounding_backend"] = backend_cfg(url)
    return GenerateQARecipe.model_validate(body)


def run_stage(r):
    run = RunDir(Path(r.output.dir), r).open()
    summary = gq.run(r, run)
    run.finish(summary)
    return summary, run


def test_items_match_the_ground_truth_and_load_with_datasets(data, server, truth, tmp_path):
    summary, run = run_stage(recipe(data, server.url, tmp_path / "out"))
    n_items = sum(len(v) for v in truth.values())
    assert summary["failed"] == 0 and summary["items"] == n_items and summary["keys"] == 12
    assert summary["refined"] == n_items and summary["refine_kept_original"] == 0
    records = read_jsonl(run.file("qa.jsonl"))
    for key, expected in truth.items():
        got = [r for r in records if r["qa_key"] == key]
        video_id, category = key.split("/")
        assert [r["problem_id"] for r in got] == [f"{video_id}-{category}-{i}" for i in range(len(expected))]
        for r, e in zip(got, expected):
            assert (r["question"], r["options"], r["answer"]) == (e["question"], e["options"], e["answer"])
            assert r["problem"] == e["problem"] and r["problem_type"] == category == r["category"]
            assert r["videos"] == [f"{video_id}.mp4"] and r["source_clips"] == e["source_clips"]
            assert r["reasoning"] == e["reasoning"] and r["qa_key_items"] == len(expected)

    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(run.file("qa.jsonl")), split="train")
    assert ds.num_rows == n_items and ds[0]["problem_id"] == records[0]["problem_id"]
    assert set(ds.column_names) >= {"problem_id", "problem", "problem_type", "videos", "reasoning", "answer"}


def test_malformed_replies_are_retried_then_recorded(data, truth, tmp_path):
    v0, v1 = "synth-s0-0000", "synth-s0-0001"
    faults = {
        f"{v0}/temporal": ["no_json"] * 3,  # never valid -> error after 3 attempts
        f"{v0}/goal": ["think_decoy"],  # JSON in a fence after a think block with a decoy: parsed first time
        f"{v0}/spatial": ["wrong_letter"],  # answer "E": retried with the reason, then valid
        f"{v0}/plot": ["three_options"] * 3,  # 3 options every time -> error
        f"{v1}/temporal": ["http500"],  # server error: the HTTP backend retries it
        f"{v1}/goal": ["empty", "empty"],  # no questions twice, then valid
        f"refine:{v1}": ["contradict"],  # a rewrite naming another letter: original kept
    }
    with GTServer(data, faults=faults) as server:
        summary, run = run_stage(recipe(data, server.url, tmp_path / "out"))
        log = list(server.log)
        assert summary["failed"] == 2 and summary["retries"] == 2 + 1 + 2 + 2
        assert summary["refine_kept_original"] == 1
        errors = {e["key"]: e["reason"] for e in read_jsonl(run.file("errors.jsonl"))}
        assert errors == {
            f"{v0}/temporal": "no valid reply after 3 attempt(s): no JSON object found",
            f"{v0}/plot": "no valid reply after 3 attempt(s): item 1: options: expected exactly A, B, C, D, "
                          "got 3: A, B, C",
        }
        spatial = [e["prompt"] for e in log if e["key"] == f"{v0}/spatial"]
        assert len(spatial) == 2 and "rejected: item 1: answer 'E' is not one of A, B, C, D" in spatial[1]
        assert len([e for e in log if e["key"] == f"{v0}/goal"]) == 1
        assert len([e for e in log if e["key"] == f"{v1}/temporal"]) == 2  # 500, then the HTTP retry
        assert {r["qa_key"] for r in read_jsonl(run.file("qa.jsonl"))} == set(truth) - set(errors)

        # a re-run of the unfinished directory retries only the failed keys
        (tmp_path / "out" / "summary.json").unlink()
        server.faults.clear()
        server.log.clear()
        summary, run = run_stage(recipe(data, server.url, tmp_path / "out"))
        assert {e["key"] for e in server.log if e["kind"] == "qa"} == set(errors)
    assert summary["already_done"] == 10 and summary["failed"] == 0
    ids = [r["problem_id"] for r in read_jsonl(run.file("qa.jsonl"))]
    assert len(ids) == len(set(ids)) == sum(len(v) for v in truth.values())


@pytest.mark.parametrize("reply,error", [
    ([], "no questions in the reply"),
    ({"questions": [{"question": "q", "options": ["a", "b", "c"], "answer": "A", "reasoning": "r"}]},
     "item 1: options: expected 4 (A-D), got 3"),
    ({"questions": [{"question": "q", "options": {"A": "x", "B": "x", "C": "y", "D": "z"}, "answer": "A",
                     "reasoning": "r"}]}, "item 1: options: not distinct"),
    ({"questions": [{"question": "q", "options": {"A": "w", "B": " ", "C": "y", "D": "z"}, "answer": "A",
                     "reasoning": "r"}]}, "item 1: options: B is empty"),
    ([{"question": "q", "options": {"A": "w", "B": "x", "C": "y", "D": "z"}, "answer": "B", "reasoning": ""}],
     "item 1: reasoning: empty"),
    ([{"question": "q", "options": {"A": "w", "B": "x", "C": "y", "D": "z"}, "answer": "B",
       "reasoning": "So the answer is C."}], "item 1: reasoning concludes C but the answer is B"),
    ([{"question": "q", "options": {"A": "w", "B": "x", "C": "y", "D": "z"}, "answer": "B", "reasoning": "ok"},
      {"question": " ", "options": {}, "answer": "A", "reasoning": "r"}], "item 2: question: empty"),
])
def test_validation_messages(reply, error):
    with pytest.raises(qv.QAInvalid) as exc:
        qv.validate_reply(reply, n=2, n_clips=3)
    assert str(exc.value) == error


def test_validation_normalises_tolerable_forms():
    items = qv.validate_reply({"questions": [
        {"question": " Which  colour? ", "options": ["A. red", "B. green", "C) blue", "yellow"],
         "answer": "(C) blue", "reasoning": " The answer is C. ", "source_clips": [2, 7, "x", 0]},
        {"question": "Where?", "options": {"a": "left", "b": "right", "c": "top", "d": "bottom"},
         "answer": "top", "reasoning": "Seen at 00:10."},
        {"question": "third, beyond n", "options": {}, "answer": "", "reasoning": ""},
    ]}, n=2, n_clips=3)
    assert items == [
        {"question": "Which colour?", "options": {"A": "red", "B": "green", "C": "blue", "D": "yellow"},
         "answer": "C", "reasoning": "The answer is C.", "source_clips": [0, 2]},
        {"question": "Where?", "options": {"A": "left", "B": "right", "C": "top", "D": "bottom"},
         "answer": "C", "reasoning": "Seen at 00:10.", "source_clips": None},
    ]


def test_near_duplicates_are_dropped(data, truth, tmp_path):
    after = "The screen flashes white once in the video. Which colour fills the screen right after the white flash?"
    before = after.replace("after the", "before the")
    assert qv.jaccard(qv.question_tokens(after), qv.question_tokens(before)) == pytest.approx(12 / 14)
    assert qv.near_duplicate(qv.question_tokens(before), [qv.question_tokens(after)], 0.85)
    assert not qv.near_duplicate(qv.question_tokens(before), [qv.question_tokens(after)], 0.9)

    key = "synth-s0-0000/goal"  # one question; the reply repeats it upper-cased
    with GTServer(data, faults={key: ["duplicate"]}) as server:
        summary, run = run_stage(recipe(data, server.url, tmp_path / "out", questions_per_category=2))
    assert summary["deduplicated"] == 1 and summary["failed"] == 0
    got = [r for r in read_jsonl(run.file("qa.jsonl")) if r["qa_key"] == key]
    assert [(r["problem_id"], r["question"], r["qa_key_items"]) for r in got] == [
        ("synth-s0-0000-goal-0", truth[key][0]["question"], 1)]


def test_grounding_boxes_reach_the_spatial_prompt(data, server, tmp_path):
    summary, run = run_stage(recipe(data, server.url, tmp_path / "out", grounding=True, grounding_max_clips=2,
                                    categories=["spatial"], refine=False))
    assert summary["grounding_failed"] == 0 and summary["failed"] == 0
    grounds = [e for e in server.log if e["kind"] == "ground"]
    assert len(grounds) == 3 * 2  # 3 clips per video -> the first and the last
    assert all("Frame size: 56x56" in e["prompt"] for e in grounds)
    for entry in (e for e in server.log if e["kind"] == "qa"):
        video_id = entry["key"].split("/")[0]
        lines = [ln for ln in entry["prompt"].splitlines() if re.match(r"^\[\d\d:\d\d(\.\d)?\] ", ln)]
        assert [ln.split("]")[0] for ln in lines] == ["[00:01.5", "[00:06.5"]  # middles of clips 0 and 2
        for line, t_s in zip(lines, (1.5, 6.5)):
            label, box = server.truth.agent_box(video_id, t_s)
            expected = ", ".join(f"{v:.2f}" for v in box)
            assert line.endswith(f"{label}: [{expected}]") and box in PLACE_BOXES.values()


def test_kill_mid_stage_then_resume_gives_the_uninterrupted_set(data, tmp_path):
    with GTServer(data) as server:
        run_stage(recipe(data, server.url, tmp_path / "reference"))
    reference = read_jsonl(tmp_path / "reference" / "qa.jsonl")

    out = tmp_path / "killed"
    with GTServer(data, delay_s=0.1) as server:
        toml = tmp_path / "qa.toml"
        toml.write_text(f"""stage = "generate-qa"
[data]
input = "{data / 'captions_ref.jsonl'}"
[qa]
questions_per_category = 2
prompts_dir = "{PROMPTS}"
dedup_threshold = 0.9
[backend]
kind = "openai"
model = "gt"
base_url = "{server.url}"
max_concurrency = 1
backoff_s = 0.01
[output]
dir = "{out}"
""")
        cmd = [str(Path(sys.executable).with_name("lvr")), "generate-qa", str(toml)]
        env = {**os.environ, "LVR_NO_PROGRESS": "1"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        qa_file, deadline = out / "qa.jsonl", time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if qa_file.exists() and qa_file.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = read_jsonl(qa_file, on_error=lambda *_: None)  # the kill may tear the last line
        assert 1 <= len(partial) < len(reference), "the kill must land mid-stage"
        counts = Counter(r["qa_key"] for r in partial)
        complete = {r["qa_key"] for r in partial if counts[r["qa_key"]] == r["qa_key_items"]}
        assert not (out / "summary.json").exists()

        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] is True and summary["already_done"] == len(complete)
    resumed = read_jsonl(qa_file)
    ids = [r["problem_id"] for r in resumed]
    assert len(ids) == len(set(ids))  # no duplicates
    assert sorted(ids) == sorted(r["problem_id"] for r in reference)  # no gaps
    assert {r["problem_id"]: r for r in resumed} == {r["problem_id"]: r for r in reference}


def test_interrupted_key_is_redone(data, server, tmp_path):
    """A key cut short between two of its records is dropped on resume and written again whole."""
    r = recipe(data, server.url, tmp_path / "out", refine=False)
    run_stage(r)
    path = tmp_path / "out" / "qa.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    assert json.loads(lines[0])["qa_key_items"] == 2
    path.write_text(lines[0] + lines[2] + lines[3][:25])  # key 1 lost its second record; a torn tail
    (tmp_path / "out" / "summary.json").unlink()
    summary, run = run_stage(r)
    records = read_jsonl(path)
    assert json.loads(lines[2])["qa_key_items"] == 1  # goal: one question per video, a complete key
    assert summary["already_done"] == 1
    assert sorted(x["problem_id"] for x in records) == sorted(json.loads(x)["problem_id"] for x in lines)


def test_server_entry_point_prints_its_url(data):
    proc = subprocess.Popen([sys.executable, "-m", "stages.data.gt_server", "--data", str(data), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        import urllib.request

        prompt = "Video: synth-s0-0002\nCategory: goal\nWrite 1 question."
        body = {"model": "gt", "messages": [{"role": "user", "content": prompt}]}
        req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=10).read())
        text = reply["choices"][0]["message"]["content"]
        assert text.startswith("<think>") and "```json" in text
        from stages.backends.jsonparse import parse_json_reply

        (item,) = parse_json_reply(text)["questions"]
        gt = [r for r in read_jsonl(data / "train.jsonl") + read_jsonl(data / "eval.jsonl")
              if r["video_id"] == "synth-s0-0002" and r["category"] == "goal"]
        assert item["question"] == gt[0]["question"] and item["answer"] == gt[0]["answer"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
