
import pytest

from stages.data.records import (JsonlAppender, RecordError, answer_target, done_keys, normalise_lvr,
                                 read_jsonl, split_problem)


def test_appender_repairs_torn_tail_and_resumes(tmp_path):
    p = tmp_path / "out.jsonl"
    with JsonlAppender(p) as w:
        w.write({"key": "a"})
        w.write({"key": "b"})
    with open(p, "a") as f:
        f.write('{"key": "c", "tex')  # killed mid-write
    assert done_keys(p, "key") == {"a", "b"}
    with JsonlAppender(p) as w:
        w.write({"key": "c"})
    assert [r["key"] for r in read_jsonl(p)] == ["a", "b", "c"]


def test_malformed_lines_are_reported_not_fatal(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"a": 1}\nnot json\n\n[1, 2]\n{"a": 2}\n')
    errors = []
    recs = read_jsonl(p, on_error=lambda n, why: errors.append((n, why)))
    assert [r["a"] for r in recs] == [1, 2]
    assert [n for n, _ in errors] == [2, 4]
    assert "malformed JSON line" in errors[0][1] and f"{p}:2" in errors[0][1]
    with pytest.raises(RecordError, match=":2: malformed"):
        read_jsonl(p)


def test_longvideo_reason_record_is_read_as_released():
    rec = {"problem_id": 7, "problem": "What happens first?\nA. red\nB. green\nC. blue\nD. yellow",
           "problem_type": "temporal", "videos": "v.mp4", "reasoning": "r", "answer": "C"}
    out = normalise_lvr(rec)
    assert out["question"] == "What happens first?"
    assert out["options"] == {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
    assert out["category"] == "temporal" and out["videos"] == ["v.mp4"]
    with pytest.raises(RecordError, match="answer 'E' is not one of the options"):
        normalise_lvr({**rec, "answer": "E"})
    with pytest.raises(RecordError, match="problem_type 'mood'"):
        normalise_lvr({**rec, "problem_type": "mood"})
    with pytest.raises(RecordError, match="missing field 'videos'"):
        normalise_lvr({k: v for k, v in rec.items() if k != "videos"})


def test_split_problem_keeps_multiline_options_and_letters_in_question():
    q, opts = split_problem("Is A. the answer?\nLine two\nA. one\ncontinued\nB. two")
    assert q == "Is A. the answer?\nLine two"
    assert opts == {"A": "one continued", "B": "two"}
    assert answer_target(" because ", "B") == "<think>because</think><answer>B</answer>"
