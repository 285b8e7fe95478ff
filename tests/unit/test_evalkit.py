"""stages/evalkit: Wilson intervals, the two scorers, the answer-letter prior, the blind prompt on
the tiny model, provenance and the report, each against hand-computed or independent values."""

import pytest
import torch

from stages.evalkit import baselines, provenance, report, scoring, stats
from stages.evalkit.items import EvalItem

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


# -- intervals -------------------------------------------------------------------------------------------
# Wilson: with p = k/n and z = 1.959964, (p + z^2/2n) / (1 + z^2/n) +- z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
# 8/10: z^2 = 3.841459; 1 + z^2/n = 1.384146; centre = (0.8 + 0.192073) / 1.384146 = 0.716740;
# half = 1.959964 * sqrt(0.016 + 0.009604) / 1.384146 = 0.226578 -> [0.490162, 0.943318].
# 0/10: centre = half = 0.192073 / 1.384146 = 0.138766 -> [0, 0.277533]; 10/10 mirrors it.
# 1/2: centre = (0.5 + 0.960365) / 2.920729 = 0.5; half = 1.959964 * sqrt(0.125 + 0.240091) / 2.920729 = 0.405469.
@pytest.mark.parametrize("k, n, lo, hi", [(8, 10, 0.490162, 0.943318), (0, 10, 0.0, 0.277533),
                                          (10, 10, 0.722467, 1.0), (1, 2, 0.094531, 0.905469),
                                          (3, 5, 0.230724, 0.882379)])
def test_wilson_interval_matches_hand_computed_values(k, n, lo, hi):
    got = stats.wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-6)
    assert (round(got[0], 4), round(got[1], 4)) == (round(lo, 4), round(hi, 4))


def test_wilson_edges_and_proportion():
    assert stats.wilson(0, 0) is None
    assert stats.wilson(0, 7)[0] == 0.0 and stats.wilson(7, 7)[1] == 1.0  # exact, not 1 - 1e-16
    assert stats.proportion(8, 10) == {"correct": 8, "total": 10, "accuracy": 0.8,
                                       "ci95": pytest.approx([0.490162, 0.943318], abs=1e-6)}
    assert stats.proportion(0, 0) == {"correct": 0, "total": 0, "accuracy": None, "ci95": None}
    # the interval narrows as 1/sqrt(n): 4x the items, about half the width
    w = lambda n: (lambda ci: ci[1] - ci[0])(stats.wilson(n // 2, n))  # noqa: E731
    assert w(400) / w(100) == pytest.approx(0.5, abs=0.01)


# -- scoring -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, strict, lenient", [
    ("<think>it turns green</think><answer>B</answer>", True, "B"),
    ("<answer> B </answer>", True, "B"),  # the span is stripped
    ("<answer>B. green</answer>", False, "B"),  # exact match only: the official scorer misses it
    ("<answer>b</answer>", False, "B"),  # case matters to it
    ("<answer>(B)</answer>", False, "B"),
    ("<answer>\nB\n</answer>", False, "B"),  # its regex has no DOTALL: no span, the whole reply != "B"
    ("B", True, "B"),  # no <answer>: the whole reply, stripped
    ("The answer is B.", False, "B"),
    ("<answer>A</answer> no wait <answer>B</answer>", False, "B"),  # official: first block; lenient: last
    ("<answer>Therefore the final answer is: B</answer>", True, "B"),
    ("<think>A or B</think>", False, None),
])
def test_strict_is_the_official_exact_match_and_lenient_reads_the_letter(reply, strict, lenient):
    assert scoring.strict_correct(reply, "B") is strict
    assert scoring.extract_prediction(reply, OPTIONS) == lenient


def test_prediction_row_records_what_was_asked_seen_and_both_scores():
    item = EvalItem("q1", "Which colour?", OPTIONS, "B", "/v/a.mp4", {"category": "temporal"})
    stamps = [1.0, 3.0, 5.0, 7.0, 9.0, 9.0]  # 5 decoded frames, the last repeated to fill a temporal patch
    row = scoring.prediction_row(item, 16, "<think>x</think><answer>B. green</answer>", True, 9, stamps, 0.5, 3136)
    assert row == {"key": "q1", "frames": 16, "blind": False, "question": "Which colour?", "options": OPTIONS,
                   "video": "/v/a.mp4", "frames_sampled": 5, "first_s": 1.0, "last_s": 9.0, "fps": 0.5,
                   "max_pixels": 3136, "prediction": "<think>x</think><answer>B. green</answer>", "extracted": "B",
                   "answer": "B", "correct": True, "correct_lenient": True, "correct_strict": False, "format": True,
                   "finished": True, "response_tokens": 9, "group_by": ["category"], "category": "temporal"}
    blind = scoring.prediction_row(item, scoring.BLIND_FRAMES, "B", True, 1)
    assert (blind["blind"], blind["frames_sampled"], blind["first_s"], blind["format"]) == (True, 0, None, False)
    # rows written before both scores were kept: lenient from `correct`, strict recomputed
    old = {"prediction": "<answer>B.</answer>", "answer": "B", "correct": True}
    assert scoring.row_correct(old, "lenient") is True and scoring.row_correct(old, "strict") is False
    with pytest.raises(ValueError, match="lenient or strict"):
        scoring.row_correct(old, "exact")


# -- the answer-letter prior ----------------------------------------------------------------------------------
def _rows(gold, predicted):
    return [{"answer": g, "extracted": p, "options": OPTIONS} for g, p in zip(gold, predicted)]


def test_letter_baselines_count_gold_and_predicted_letters():
    b = baselines.letter_baselines(_rows("BBCABBDB", ["B", "B", "B", None, "A", "B", "B", "C"]))
    assert b["letters"] == ["A", "B", "C", "D"]
    assert b["gold"] == {"A": 1, "B": 5, "C": 1, "D": 1}
    assert b["predicted"] == {"A": 1, "B": 5, "C": 1, "D": 0, "unparsed": 1}
    assert {x: s["correct"] for x, s in b["always"].items()} == {"A": 1, "B": 5, "C": 1, "D": 1}
    assert b["majority"]["letter"] == "B" and b["majority"]["accuracy"] == 5 / 8
    assert b["majority"]["ci95"] == pytest.approx(list(stats.wilson(5, 8)))
    tie = baselines.letter_baselines(_rows("CA", "CA"))
    assert tie["majority"]["letter"] == "A" and tie["always"]["D"]["correct"] == 0  # D offered, never gold


# -- blind: the prompt without its video, on the tiny model ------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from stages.models.adapter import load_adapter
    from lvr_cli.sections import PromptSection
    from tests.helpers import make_runtime

    a = load_adapter("tiny:qwen2.5-vl")
    return make_runtime(a, prompt=PromptSection(system="Be brief.", think=True))


def test_blind_prompt_is_the_video_prompt_without_its_video_segment(tiny):
    from stages.mrsp.runtime import question_messages

    a = tiny.adapter
    record = EvalItem("q1", "Which colour?", OPTIONS, "B", "/v/a.mp4").record()
    grid = torch.tensor([[2, 4, 4]])
    with_video = a.prompt_ids(question_messages(record, "Be brief.", True), [(grid, [0.0, 1.0, 2.0, 3.0])])
    start, end = with_video.index(a.vision_start_id), with_video.index(a.vision_end_id)
    assert end - start - 1 == 2 * 4 * 4 // 4  # the video's pad tokens
    prompt = baselines.blind_prompt(a, record, "q1", "Be brief.", True)
    assert prompt.input_ids.tolist() == with_video[:start] + with_video[end + 1:]
    vision = {a.video_token_id, a.image_token_id, a.vision_start_id, a.vision_end_id}
    assert not vision & set(prompt.input_ids.tolist())
    L = prompt.input_ids.shape[0]
    assert prompt.rope_delta == 0 and torch.equal(prompt.position_ids, torch.arange(L).expand(3, L))
    text = a.tokenizer.decode(prompt.input_ids)
    assert "Which colour?" in text and "B. green" in text and "Be brief." in text and "<think>" in text


def test_blind_replies_equal_transformers_generate_on_the_text_prompt(tiny):
    from stages.mrsp.rollout import Sampling, default_stop_ids

    a = tiny.adapter
    items = [EvalItem(f"q{i}", f"Question {i}: which colour?", OPTIONS, "B", "/v/a.mp4") for i in range(2)]
    replies = baselines.generate_blind(tiny, items, Sampling(0.0, 1.0, 10, seed=3), [0, 1])
    for it, r in zip(items, replies):
        ids = baselines.blind_prompt(a, it.record(), it.key, tiny.system, tiny.think).input_ids[None]
        a.backbone.rope_deltas = None
        with torch.no_grad():
            ref = a.model.generate(input_ids=ids, mm_token_type_ids=a.mm_token_type_ids(ids), do_sample=False,
                                   max_new_tokens=10, eos_token_id=default_stop_ids(a),
                                   bad_words_ids=[[t] for t in tiny.engine.banned_token_ids],
                                   pad_token_id=a.tokenizer.pad_token_id)
        assert r.token_ids == ref[0, ids.shape[1]:].tolist() and r.prompt_key == it.key
    # sampled: each item its own seed, the same on a re-run
    hot = Sampling(1.0, 1.0, 10, seed=3)
    again = baselines.generate_blind(tiny, items, hot, [0, 1])
    assert [r.token_ids for r in again] == [r.token_ids for r in baselines.generate_blind(tiny, items, hot, [0, 1])]


# -- provenance ---------------------------------------------------------------------------------------------------
def test_model_identity_reads_the_hub_revision_from_the_local_cache(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Org--Model"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    got = provenance.model_identity("Org/Model", cache_dir=tmp_path / "hub")
    assert got == {"path": "Org/Model", "source": "hub", "name": "Org/Model", "revision": sha}
    assert provenance.model_identity("Org/Other", cache_dir=tmp_path / "hub")["revision"] is None
    (tmp_path / "runs" / "sft-a" / "final").mkdir(parents=True)
    assert provenance.model_identity(str(tmp_path / "runs" / "sft-a" / "final")) == {
        "path": str(tmp_path / "runs" / "sft-a" / "final"), "source": "local", "name": "sft-a/final", "revision": None}
    assert provenance.model_identity(str(tmp_path / "runs"))["name"] == "runs"


# -- the report ----------------------------------------------------------------------------------------------------
def _row(key, gold, reply, frames=16, category="temporal"):
    extracted = scoring.extract_prediction(reply, OPTIONS)
    return {"key": key, "frames": frames, "prediction": reply, "extracted": extracted, "answer": gold,
            "correct": extracted == gold, "correct_strict": scoring.strict_correct(reply, gold),
            "format": reply.startswith("<think>"), "options": OPTIONS, "frames_sampled": 10, "category": category}


def test_results_summary_and_report_carry_intervals_baselines_and_blind():
    replies = ["<think>.</think><answer>B</answer>"] * 6 + ["<answer>B.</answer>"] * 2 + ["no idea"] * 2
    gold = "BBBBBBBBCA"
    rows = [_row(f"q{i}", g, r, category="goal" if i >= 5 else "temporal") for i, (g, r) in enumerate(zip(gold, replies))]
    blind = [_row(f"q{i}", g, "<answer>B</answer>" if i < 4 else "<answer>C</answer>", frames=0)
             for i, g in enumerate(gold)]
    by = report.aggregate(rows)[16]
    o = by["overall"]
    assert (o["correct"], o["correct_strict"], o["total"]) == (8, 6, 10)
    assert o["ci95"] == pytest.approx([0.490162, 0.943318], abs=1e-6)
    assert (by["well_formed"]["correct"], by["format"]["correct"], by["unparsed"]) == (8, 6, 2)
    assert by["frames_sampled"] == {"min": 10, "max": 10, "mean": 10.0}
    assert by["by_category"]["goal"]["total"] == 5 and by["letters"]["majority"]["correct"] == 8
    res = {"model": "m", "data": "d.jsonl", "formats": ["longvideo-reason"], "items": 10, "failed": 0,
           "frames": [16], "think": True, "temperature": 0.0, "max_new_tokens": 8, "by_frames": {"16": by},
           "blind": report.blind_results(rows + blind, rows, 16)}
    b = res["blind"]
    assert b["overall"]["correct"] == 5 and b["paired"]["lenient"]["n"] == 10  # q0-q3 and q8
    # right with video only: q4-q7 (gold B, blind C); right blind only: q8 (gold C, unparsed with video)
    assert (b["paired"]["lenient"]["only_a"], b["paired"]["lenient"]["only_b"]) == (4, 1)
    assert b["paired"]["lenient"]["mcnemar_p"] == 2 * (1 + 5) / 2 ** 5
    assert b["paired"]["lenient"]["difference"] == pytest.approx(0.3)
    s = report.summary_dict(res)
    assert s["accuracy"] == 0.8 and s["accuracy_ci95"] == "[0.4902, 0.9433]" and s["n"] == 10
    assert s["accuracy_strict"] == 0.6 and s["accuracy_strict_ci95"] == "[0.3127, 0.8318]"
    assert (s["majority_letter"], s["accuracy_majority"], s["accuracy_blind"]) == ("B", 0.8, 0.5)
    assert s["by_category_n"] == {"temporal": 5, "goal": 5} and s["well_formed"] == 0.8 and s["format"] == 0.6
    assert all(not isinstance(v, (list, tuple)) for v in s.values())
    md = report.report_markdown(res, None)
    assert "| 16 | 10 | 10 | 80.0 | [49.0, 94.3] | 60.0 | [31.3, 83.2] | 80.0 | 60.0 | 2 | 100.0 | 60.0 |" in md
    assert "| always the majority gold letter (B) | 80.0 | [49.0, 94.3] |" in md
    assert "| blind: same model and prompt, no video (lenient) | 50.0 | [23.7, 76.3] |" in md
    assert "| always C | 10.0 | [1.8, 40.4] |" in md and "| unparsed | - | 2 | 0 |" in md
    assert "Video minus blind (lenient, 10 items): +30.0 points" in md and "McNemar exact p = 0.375" in md
    assert "| goal | 3 | 5 | 60.0 | [23.1, 88.2] | 20.0 | [3.6, 62.4] |" in md  # q5 only is strict-right
