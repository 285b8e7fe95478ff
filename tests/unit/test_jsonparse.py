"""parse_json_reply on the shapes reasoning models actually reply in."""

from __future__ import annotations

import pytest

from stages.backends.jsonparse import ReplyParseError, balanced_spans, parse_json_reply, strip_think


def test_no_json_is_an_error():
    with pytest.raises(ReplyParseError) as info:
        parse_json_reply("I cannot answer that question about the video.")
    assert str(info.value) == "no JSON object found"


def test_empty_reply_is_an_error():
    with pytest.raises(ReplyParseError, match="^empty reply$"):
        parse_json_reply("  \n")


def test_fenced_json_after_think_block():
    text = (
        "<think>The user wants {\"question\": draft}. Let me think... [maybe]</think>\n"
        "Here is the result:\n```json\n{\"question\": \"What happens first?\", \"answer\": \"B\"}\n```\n"
    )
    assert parse_json_reply(text) == {"question": "What happens first?", "answer": "B"}


def test_unterminated_think_still_finds_the_answer():
    text = '<think>Planning the questions, the first draft is weak.\n{"answer": "C", "reason": "ok"}'
    assert parse_json_reply(text) == {"answer": "C", "reason": "ok"}
    assert strip_think("<think>abc") == "abc"


def test_stray_closing_think_drops_the_reasoning_before_it():
    text = 'thinking with a draft {"answer": "A"} ...</think>{"answer": "D"}'
    assert strip_think(text) == '{"answer": "D"}'
    assert parse_json_reply(text) == {"answer": "D"}


def test_two_objects_last_wins():
    text = 'First try: {"answer": "A"}. On reflection: {"answer": "B", "n": 2}'
    assert parse_json_reply(text) == {"answer": "B", "n": 2}


def test_last_fenced_block_wins_over_later_prose_json():
    text = '```json\n{"v": 1}\n```\n```json\n{"v": 2}\n```\nnote: {not json}'
    assert parse_json_reply(text) == {"v": 2}


def test_trailing_commas_are_tolerated():
    text = '```json\n{"options": ["A. red", "B. blue",], "answer": "B",}\n```'
    assert parse_json_reply(text) == {"options": ["A. red", "B. blue"], "answer": "B"}


def test_comma_inside_string_before_brace_is_kept():
    assert parse_json_reply('{"text": "a,}", "x": [1,],}') == {"text": "a,}", "x": [1]}


def test_smart_quotes_are_tolerated():
    text = "Answer: {\u201cquestion\u201d: \u201cWhy?\u201d, \u201canswer\u201d: \u201cA\u201d}"
    assert parse_json_reply(text) == {"question": "Why?", "answer": "A"}


def test_braces_and_escaped_quotes_inside_strings():
    text = 'Result: {"q": "Which set {a, b] is \\"closed\\"?", "nested": {"k": [1, {"x": "}"}]}} done'
    assert parse_json_reply(text) == {"q": 'Which set {a, b] is "closed"?', "nested": {"k": [1, {"x": "}"}]}}


def test_top_level_list():
    text = 'Questions:\n[{"q": "one", "a": "A"}, {"q": "two", "a": "B"}]\nThat is all.'
    assert parse_json_reply(text) == [{"q": "one", "a": "A"}, {"q": "two", "a": "B"}]


def test_unparseable_candidate_falls_back_to_an_earlier_one():
    text = '{"answer": "A"} see [ref 3]'
    assert parse_json_reply(text) == {"answer": "A"}


def test_invalid_json_reports_the_parser_message():
    with pytest.raises(ReplyParseError) as info:
        parse_json_reply('{"answer": "A" "reason": "x"}')
    assert str(info.value).startswith("invalid JSON: Expecting ',' delimiter: line 1 column 16")


def test_stray_opener_does_not_hide_later_json():
    text = 'The set { is open. {"answer": "B"}'
    assert balanced_spans(text) == ['{"answer": "B"}']
    assert parse_json_reply(text) == {"answer": "B"}


def test_scalar_fence_is_not_an_object():
    with pytest.raises(ReplyParseError, match="^invalid JSON: expected an object or a list, got int$"):
        parse_json_reply("```json\n42\n```")
