"""GRPO-aware filtering: the band, pass rates from real samples, MR-SP reuse, resume, bad input."""

import json
from collections import Counter
from pathlib import Path

import pytest

from lvr_cli.schema import FilterRecipe
from lvr_cli.rundir import RunDir
from stages import filter as filt
from stages.algo import rewards
from stages.data import synth

N = 3


# -- the band and the scoring, as pure functions ------------------------------------------------
@pytest.mark.parametrize("rate,low,high,expected", [
    (0.0, 0.0, 1.0, False),  # never right: too hard
    (1.0, 0.0, 1.0, False),  # always right: too easy
    (0.1, 0.0, 1.0, True),
    (0.9, 0.0, 1.0, True),
    (0.2, 0.2, 0.8, False),  # both limits exclusive
    (0.8, 0.2, 0.8, False),
    (0.5, 0.2, 0.8, True),
    (0.1, 0.2, 0.8, False),
])
def test_in_band_is_exclusive(rate, low, high, expected):
    assert filt.in_band(rate, low, high) is expected


def test_split_by_band_routes_every_scored_record_once():
    records = [("a", {"problem_id": "a", "reasoning": "r"}), ("b", {"problem_id": "b", "reasoning": "r"}),
               ("c", {"problem_id": "c", "reasoning": "r"}), ("d", {"problem_id": "d", "reasoning": "  "}),
               ("e", {"problem_id": "e", "reasoning": "r"}), ("f", {"problem_id": "f"})]
    scores = {"a": {"pass_rate": 0.0}, "b": {"pass_rate": 1 / 3}, "c": {"pass_rate": 1.0},
              "d": {"pass_rate": 1.0}, "f": {"pass_rate": 0.5}}  # e: not scored (failed)
    rl, sft, dropped = filt.split_by_band(records, scores, 0.0, 1.0)
    assert [r["problem_id"] for r in rl] == ["b", "f"]  # in band, with or without reasoning
    assert [r["problem_id"] for r in sft] == ["a", "c"]
    assert [r["problem_id"] for r in dropped] == ["d"]  # out of band, blank reasoning
    assert sft[0] == {"problem_id": "a", "reasoning": "r", "pass_rate": 0.0}
    assert "pass_rate" not in records[0][1]  # inputs untouched


def test_score_item_uses_the_rl_rewards():
    rec = {"problem": "Which colour?\nA. red\nB. green\nC. blue\nD. yellow", "answer": "B"}
    responses = ["<think>green fills it</think><answer>B</answer>",  # pass, formatted
                 "The answer is B.",  # pass, unformatted
                 "<think>x</think><answer>A</answer>",  # formatted, wrong
                 "<answer>green</answer>"]  # the option text counts as B
    score, parts = filt.score_item(responses, rec)
    assert [p["accuracy"] for p in parts] == [1.0, 1.0, 0.0, 1.0]
    assert score == {"samples": 4, "passes": 3, "pass_rate": 0.75, "mean_format": 0.5}


def test_item_seed_depends_on_seed_and_key_only():
    assert filt.item_seed(0, "q1") == filt.item_seed(0, "q1")
    assert len({filt.item_seed(0, "q1"), filt.item_seed(1, "q1"), filt.item_seed(0, "q2")}) == 3


def test_histogram_has_every_possible_pass_rate():
    assert filt.pass_rate_histogram([0.0, 1 / 3, 1 / 3, 1.0], 3) == {"0": 1, "0.3333": 2, "0.6667": 0, "1": 1}


# -- the stage on a tiny synthetic dataset -------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 good questions on 2 videos (interleaved), a malformed line, a missing and a corrupt video."""
    out = tmp_path_factory.mktemp("filter_data")
    from lvr_cli.schema import SynthSpec

    cfg = SynthSpec(videos=3, seconds=12.0, fps=2.0, width=56, height=56, object_size_px=28, event_seconds=4.0,
                    eval_fraction=0.34)
    synth.generate(cfg, out, seed=3)
    recs = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    by_video: dict[str, list] = {}
    for r in recs:
        by_video.setdefault(r["videos"][0], []).append(r)
    (v0, v1) = list(by_video.values())[:2]
    good = [v0[0], v1[0], v0[1], v1[1]]
    missing = {**v0[2], "problem_id": "missing-video", "videos": ["videos/nope.mp4"]}
    (out / "videos" / "corrupt.mp4").write_bytes(b"not a video at all" * 50)
    corrupt = {**v1[2], "problem_id": "corrupt-video", "videos": ["videos/corrupt.mp4"]}
    lines = [json.dumps(good[0]), json.dumps(good[1]), '{"problem_id": "torn", "problem": ',
             json.dumps(missing), json.dumps(good[2]), json.dumps(corrupt), json.dumps(good[3])]
    (out / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return out


def make_recipe(data: Path, out: Path, **filter_over) -> FilterRecipe:
    return FilterRecipe.model_validate({
        "stage": "filter", "seed": 5, "data": {"input": str(data / "qa.jsonl")},
        "video": {"max_frames": 8, "max_pixels": 56 * 56},
        "filter": {"samples": N, "temperature": 1.0, "max_new_tokens": 8, **filter_over},
        "output": {"dir": str(out)}})


def parity_accuracy(monkeypatch):
    """A stand-in for a model that is sometimes right: the real rewards, with accuracy 1 for a
    sample of even length, so the pass rates vary and come from the real samples."""
    def reward(response, answer, **kw):
        parts = rewards.combined_reward(response, answer, **kw)
        return {**parts, "accuracy": float(len(response) % 2 == 0)}

    monkeypatch.setattr(filt, "combined_reward", reward)


def run_filter(recipe: FilterRecipe) -> tuple[dict, RunDir]:
    run = RunDir(Path(recipe.output.dir), recipe).open()
    return run.finish(filt.run(recipe, run)), run


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        parity_accuracy(mp)
        return run_filter(make_recipe(data, tmp_path_factory.mktemp("filter_run") / "run"))


def test_pass_rates_come_from_the_samples(uninterrupted):
    summary, run = uninterrupted
    scores, samples = read(run.file("scores.jsonl")), read(run.file("samples.jsonl"))
    assert len(scores) == 4 and len(samples) == 4 * N
    for s in scores:
        mine = [x for x in samples if x["problem_id"] == s["problem_id"]]
        assert sorted(x["sample"] for x in mine) == list(range(N))
        for x in mine:
            assert x["accuracy"] == float(len(x["response"]) % 2 == 0)
            assert x["format"] == rewards.format_reward(x["response"])
        assert s["samples"] == N
        assert s["passes"] == sum(x["accuracy"] for x in mine)
        assert s["pass_rate"] == s["passes"] / N
        assert s["mean_format"] == sum(x["format"] for x in mine) / N
    rates = Counter(s["pass_rate"] for s in scores)
    assert summary["mean_pass_rate"] == pytest.approx(sum(s["pass_rate"] for s in scores) / 4, abs=1e-6)
    assert sum(rates.values()) == 4 and len(rates) > 1  # the samples differ from question to question


def test_split_and_stats(uninterrupted, data):
    summary, run = uninterrupted
    scores = {s["problem_id"]: s for s in read(run.file("scores.jsonl"))}
    rl, sft = read(run.file("rl.jsonl")), read(run.file("sft.jsonl"))
    assert rl and sft, "the test data should exercise both sets"
    assert all(0 < r["pass_rate"] < 1 for r in rl) and all(r["pass_rate"] in (0.0, 1.0) for r in sft)
    assert sorted(r["problem_id"] for r in rl + sft) == sorted(scores)
    inputs = {r["problem_id"]: r for r in (json.loads(x) for x in (data / "qa.jsonl").read_text().splitlines()
                                           if x.endswith("}"))}
    for r in rl + sft:  # the original record plus its pass rate
        assert r == {**inputs[r["problem_id"]], "pass_rate": scores[r["problem_id"]]["pass_rate"]}
    stats = json.loads(run.file("filter_stats.json").read_text())
    assert stats["rl_by_category"] == dict(Counter(r["category"] for r in rl))
    assert stats["sft_by_category"] == dict(Counter(r["category"] for r in sft))
    assert sum(stats["pass_rate_histogram"].values()) == 4
    assert (summary["items"], summary["scored"], summary["rl"], summary["sft"]) == (6, 4, len(rl), len(sft))
    assert run.file("pass_rates.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_are_recorded_and_counted(uninterrupted):
    summary, run = uninterrupted
    errors = {e["key"]: e["reason"] for e in read(run.file("errors.jsonl"))}
    assert summary["failed"] == 3 and len(errors) == 3
    assert "malformed JSON line" in errors[next(k for k in errors if k.endswith("qa.jsonl:3"))]
    assert "nope.mp4" in errors["missing-video"]
    assert "corrupt.mp4" in errors["corrupt-video"]


def test_mrsp_encodes_each_video_once(uninterrupted):
    summary, _ = uninterrupted
    # 4 questions on 2 videos, interleaved in the input: one encode per video, one prefill per question
    assert (summary["vision_encodes"], summary["embedding_cache_hits"], summary["prefills"]) == (2, 2, 4)


def test_vanilla_encodes_per_sample(data, tmp_path):
    recipe = make_recipe(data, tmp_path / "run").model_copy(
        update={"mrsp": FilterRecipe.model_fields["mrsp"].default.model_copy(update={"enabled": False})})
    summary, _ = run_filter(recipe)
    assert (summary["vision_encodes"], summary["prefills"], summary["scored"]) == (4 * N, 4 * N, 4)


def test_nothing_scorable_still_finishes(tmp_path):
    (tmp_path / "qa.jsonl").write_text('{"problem_id": \n' + json.dumps(
        {"problem_id": "q", "problem": "Q?\nA. x\nB. y", "videos": ["nope.mp4"], "answer": "A"}) + "\n")
    summary, run = run_filter(make_recipe(tmp_path, tmp_path / "run"))
    assert (summary["items"], summary["scored"], summary["failed"], summary["mean_pass_rate"]) == (1, 0, 2, None)
    assert run.file("rl.jsonl").read_text() == run.file("sft.jsonl").read_text() == ""


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted(data, tmp_path, monkeypatch, uninterrupted):
    parity_accuracy(monkeypatch)
    recipe = make_recipe(data, tmp_path / "run")
    run = RunDir(Path(recipe.output.dir), recipe).open()
    append, scored = run.append, []

    def dies_on_third_score(name, record):  # killed after the 3rd question's samples, before its score
        if name == "scores.jsonl":
            if len(scored) == 2:
                raise Killed
            scored.append(record)
        append(name, record)

    run.append = dies_on_third_score
    with pytest.raises(Killed):
        filt.run(recipe, run)
    run.close()
    with open(run.file("scores.jsonl"), "a") as f:  # and a torn last line
        f.write('{"problem_id": "synth-s3-00')
    assert len(read(run.file("samples.jsonl"))) == 3 * N

    summary, run = run_filter(recipe)
    assert summary["resumed"] and summary["skipped_done"] == 2 and summary["scored_now"] == 2
    _, ref = uninterrupted
    for name in ("scores.jsonl", "samples.jsonl"):
        got, want = read(run.file(name)), read(ref.file(name))
        assert len(got) == len(want)  # no duplicates, no gaps
        key = (lambda r: (r["problem_id"], r.get("sample", -1)))
        assert sorted(got, key=key) == sorted(want, key=key)
    for name in ("rl.jsonl", "sft.jsonl", "filter_stats.json"):
        assert run.file(name).read_text() == ref.file(name).read_text()
    assert len(read(run.file("errors.jsonl"))) == 3  # recorded once across both runs
    assert summary["failed"] == 3


def test_outputs_load_with_datasets(uninterrupted):
    from datasets import load_dataset

    _, run = uninterrupted
    for name, rows in (("scores.jsonl", 4), ("samples.jsonl", 4 * N), ("rl.jsonl", None), ("sft.jsonl", None)):
        ds = load_dataset("json", data_files=str(run.file(name)), split="train")
        assert ds.num_rows == (rows if rows is not None else len(read(run.file(name))))
    sft = load_dataset("json", data_files=str(run.file("sft.jsonl")), split="train")
    assert {"problem_id", "problem", "answer", "reasoning", "pass_rate"} <= set(sft.column_names)
