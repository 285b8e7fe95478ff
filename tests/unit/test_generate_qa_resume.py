"""generate-qa across kills and reruns: errors.jsonl holds what failed now, once; --retry-failed;
replies cut off mid-list."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import stages.generate_qa as gq
import stages.qa_validate as qv
from lvr_cli.rundir import RunDir
from stages.data.gt_server import GTServer
from stages.data.records import read_jsonl
from tests.unit.test_generate_qa import PROMPTS, ROOT, data, recipe, run_stage, truth  # noqa: F401 (fixtures)

V0, V1, V2 = "synth-s0-0000", "synth-s0-0001", "synth-s0-0002"
ITEM = {"question": "Which colour?", "options": {"A": "red", "B": "green", "C": "blue", "D": "grey"},
        "answer": "B", "reasoning": "The answer is B."}


def errors_of(out) -> list[tuple[str, str]]:
    return [(e["key"], e["reason"]) for e in read_jsonl(out / "errors.jsonl")]


# -- replies cut off mid-list -------------------------------------------------------------------
def fenced(items: list[dict]) -> str:
    return "<think>Two questions.</think>\n```json\n" + json.dumps({"questions": items}, indent=1) + "\n```"


def test_a_reply_cut_off_before_its_nth_item_is_invalid():
    whole = fenced([ITEM, dict(ITEM, question="Which shape?")])
    cut = whole[:whole.index("Which shape?") + 5]
    with pytest.raises(qv.QAInvalid, match=r"^reply has 1 of 2 items \(cut off\)$"):
        qv.parse_items_reply(cut, 2)
    with pytest.raises(qv.QAInvalid, match=r"^reply has 0 of 2 items \(cut off\)$"):
        qv.parse_items_reply(whole[:whole.index("Which colour?") + 5], 2)
    assert qv.parse_items_reply(cut, 1) == {"questions": [ITEM]}  # the one item asked for is whole
    # cut after both items, in a trailing field: the tolerant parser alone would keep only the last
    tail = whole.replace("]\n}", '], "notes": "more to') .removesuffix("\n```")
    assert qv.parse_items_reply(tail, 2) == {"questions": [ITEM, dict(ITEM, question="Which shape?")]}
    # whole replies: a stray brace in the prose does not lose the items; one item when two were asked
    # for is the model having no more, not a cut-off
    assert qv.parse_items_reply("Draft {x. " + json.dumps({"questions": [ITEM, ITEM]}), 2) == {
        "questions": [ITEM, ITEM]}
    assert qv.parse_items_reply(fenced([ITEM]), 2) == {"questions": [ITEM]}
    assert qv.cut_off('{"questions": [{"question": "which [one') and not qv.cut_off('{"q": "a [b"}')


class CutServer(GTServer):
    """The stand-in server; the fault `cut` stops a reply inside its second item (max_tokens)."""

    def _qa_reply(self, video_id, category, prompt, fault):
        text = super()._qa_reply(video_id, category, prompt, None if fault == "cut" else fault)
        if fault == "cut":
            second = text.index('"question"', text.index('"question"') + 1)
            text = text[:second + 20]
        return text


def test_cut_off_replies_are_retried_then_recorded(data, truth, tmp_path):
    faults = {f"{V0}/temporal": ["cut"], f"{V1}/temporal": ["cut"] * 3}
    with CutServer(data, faults=faults) as server:
        summary, run = run_stage(recipe(data, server.url, tmp_path / "out", refine=False))
        log = list(server.log)
    assert errors_of(tmp_path / "out") == [
        (f"{V1}/temporal", "no valid reply after 3 attempt(s): reply has 1 of 2 items (cut off)")]
    assert summary["failed"] == 1 and summary["retries"] == 1 + 2 and summary["done"] == 11
    prompts = [e["prompt"] for e in log if e["key"] == f"{V0}/temporal"]
    assert len(prompts) == 2 and "rejected: reply has 1 of 2 items (cut off)" in prompts[1]
    records = read_jsonl(run.file("qa.jsonl"))
    got = [r["question"] for r in records if r["qa_key"] == f"{V0}/temporal"]
    assert got == [t["question"] for t in truth[f"{V0}/temporal"]] and len(got) == 2
    # a whole reply with fewer items than asked (goal has one per video) stays a complete key
    assert [r["qa_key_items"] for r in records if r["qa_key"] == f"{V2}/goal"] == [1]


# -- --retry-failed and keys of other granularity --------------------------------------------------
def test_retry_failed_redoes_failed_keys_and_settles_errors_of_any_granularity(data, tmp_path):
    out = tmp_path / "out"
    faults = {f"ground:{V2}": ["no_json"] * 99, f"{V0}/spatial": ["no_json"] * 3}
    with GTServer(data, faults=faults) as server:
        r = recipe(data, server.url, out, grounding=True, grounding_max_clips=2, categories=["spatial"],
                   refine=False)
        summary, _ = run_stage(r)
        assert summary["failed"] == 1 and summary["grounding_failed"] == 1 and summary["done"] == 2
        grounding = (f"{V2}/spatial/grounding", "frame at 00:01.5: no JSON object found")
        spatial_v0 = (f"{V0}/spatial", "no valid reply after 3 attempt(s): no JSON object found")
        assert sorted(errors_of(out)) == sorted([grounding, spatial_v0])
        # failures a whole video wide, as an earlier run might have recorded them
        with open(out / "errors.jsonl", "a") as f:
            for key in (V0, V1):
                f.write(json.dumps({"key": key, "reason": "video-wide failure", "rank": 0}) + "\n")
        before = read_jsonl(out / "qa.jsonl")

        server.log.clear()
        run = RunDir(out, r).open(retry_failed=True)
        summary = gq.run(r, run)
        run.finish(summary)
        asked = sorted({e["key"] for e in server.log})
    assert asked == [f"ground:{V0}", f"{V0}/spatial"]  # V0 only: V1 and V2 are done
    # V0/spatial and the video-wide V0 were retried and did not fail again; V1 is done; V2's spatial
    # items stand as written without boxes, so the grounding failure under them stands too
    assert errors_of(out) == [grounding]
    assert summary["failed"] == 0 and summary["done"] == 3 and summary["already_done"] == 2
    after = read_jsonl(out / "qa.jsonl")
    assert after[:len(before)] == before and {x["qa_key"] for x in after[len(before):]} == {f"{V0}/spatial"}


# -- real SIGKILLs ------------------------------------------------------------------------------------
def cli(tmp_path, data, url, out) -> list[str]:
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
base_url = "{url}"
max_concurrency = 1
backoff_s = 0.01
[output]
dir = "{out}"
""")
    return [str(Path(sys.executable).with_name("lvr")), "generate-qa", str(toml)]


def kill_after_a_new_line(cmd, path: Path) -> bool:
    """Start `cmd`, SIGKILL it once `path` has a line more than now; whether it was still running."""
    lines = path.read_bytes().count(b"\n") if path.exists() else 0
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "LVR_NO_PROGRESS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") > lines:
            break
        time.sleep(0.01)
    running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return running


def test_errors_after_sigkills_and_reruns_list_what_failed_now_once(data, truth, tmp_path):
    out = tmp_path / "out"
    faults = {f"{V0}/temporal": ["no_json"] * 3,  # fails on the first run only
              f"{V0}/plot": ["three_options"] * 99,  # fails on every run
              f"{V2}/goal": ["no_json"] * 99}
    with GTServer(data, faults=faults, delay_s=0.05) as server:
        cmd = cli(tmp_path, data, server.url, out)
        assert kill_after_a_new_line(cmd, out / "qa.jsonl"), "the first kill must land mid-stage"
        assert {f"{V0}/temporal", f"{V0}/plot"} <= {k for k, _ in errors_of(out)}
        assert not (out / "summary.json").exists()
        kill_after_a_new_line(cmd, out / "qa.jsonl")  # the second run retries V0's keys, then dies
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "LVR_NO_PROGRESS": "1"}, capture_output=True,
                              text=True, timeout=300)
    assert done.returncode == 1 and "2 input(s) failed" in done.stderr, done.stderr[-2000:]
    assert errors_of(out) == [
        (f"{V0}/plot", "no valid reply after 3 attempt(s): item 1: options: expected exactly A, B, C, D, got 3: A, B, C"),
        (f"{V2}/goal", "no valid reply after 3 attempt(s): no JSON object found")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed"] and summary["failed"] == 2 and summary["done"] == 10 and summary["keys"] == 12
    records = read_jsonl(out / "qa.jsonl")
    ids = [x["problem_id"] for x in records]
    expected = {f"{key.replace('/', '-')}-{i}": t for key, items in truth.items()
                if key not in (f"{V0}/plot", f"{V2}/goal") for i, t in enumerate(items)}
    assert len(ids) == len(set(ids)) and set(ids) == set(expected)  # no duplicates, no gaps
    assert all(x["question"] == expected[x["problem_id"]]["question"] for x in records)
