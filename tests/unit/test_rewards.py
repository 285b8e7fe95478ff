"""Rule-based rewards on tricky strings."""

import pytest

from stages.algo.rewards import (
    accuracy_reward,
    combined_reward,
    extract_answer,
    extract_choice,
    format_reward,
    normalize_text,
)

OPTIONS = {"A": "Blue cube", "B": "Red ball", "C": "Red circle", "D": "Green"}

# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "response",
    [
        "<think>the ball is red</think><answer>B</answer>",
        "  \n<think>\nstep 1\nstep 2\n</think>\n\n  <answer>\n B \n</answer>\n",
        "<think></think><answer>B</answer>",  # empty reasoning is still the format
    ],
)
def test_format_reward_accepts(response):
    assert format_reward(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "B",  # no tags
        "<answer>B</answer>",  # no think
        "<think>reason</think>",  # no answer
        "<think>reason</think>B",  # no answer tags
        "<think>reason</think><answer>B",  # unclosed answer
        "<think>reason</think><answer>B</answer> because of the ball",  # text after answer
        "Sure! <think>reason</think><answer>B</answer>",  # text before think
        "<think>reason</think> so <answer>B</answer>",  # text between blocks
        "<answer>B</answer><think>reason</think>",  # wrong order
        "<think>reason</think><answer>A</answer><answer>B</answer>",  # two answers
        "<think>a<think>b</think></think><answer>B</answer>",  # nested think
        "<think>r</think><answer><answer>B</answer></answer>",  # nested answer
        "<think>reason</think><answer> \n </answer>",  # empty answer
    ],
)
def test_format_reward_rejects(response):
    assert format_reward(response) == 0.0


def test_extract_answer_last_block_stripped():
    assert extract_answer("<answer>A</answer> no wait <answer>\n C \n</answer>") == "C"
    assert extract_answer("<think>x</think><answer>two\nlines</answer>") == "two\nlines"
    assert extract_answer("The answer is B") is None


# ----------------------------------------------------------------------------- choice


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("b", "B"),  # lower-case letter
        ("(B)", "B"),
        ("(b)", "B"),
        ("[C]", "C"),
        ("B.", "B"),
        ("B. red", "B"),
        ("B) red ball", "B"),
        ("(B) red ball", "B"),
        ("**D**", "D"),
        ("\\boxed{C}", "C"),
        ("Answer: C", "C"),
        ("answer:c", "C"),
        ("The answer is D", "D"),
        ("The answer is (b).", "B"),
        ("The correct option is B", "B"),
        ("I think the answer is B", "B"),
        ("The answer is D because the ball is green", "D"),
        ("answer is option C", "C"),
        ("B, a red ball", "B"),  # the article after the label is not a second letter
        ("The answer is B. Option A is wrong", "B"),  # "Option A is" has no cue verb
    ],
)
def test_extract_choice_letters(text, expected):
    assert extract_choice(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "A or B",  # several letters: ambiguous
        "A, C",
        "a or b",
        "A/B",
        "The answer is A or B",
        "B. Answer: C",  # two different letters in answer positions
        "a red ball",  # article, not a letter
        "The answer is a red ball",  # article after the cue
        "A red ball rolls",  # capital article at the start of a sentence
        "Answer: I think it is blue",  # the pronoun I
        "It is blue",
        "",
    ],
)
def test_extract_choice_none(text):
    assert extract_choice(text) is None


def test_extract_choice_restricted_to_option_letters():
    assert extract_choice("E", OPTIONS) is None
    assert extract_choice("E") == "E"
    # the out-of-range letter is dropped, so "A or E" is not ambiguous among A-D
    assert extract_choice("A or E", OPTIONS) == "A"


def test_extract_choice_option_text_match():
    assert extract_choice("the red circle", OPTIONS) == "C"  # article, case
    assert extract_choice("Red ball.", OPTIONS) == "B"  # punctuation
    assert extract_choice("The answer is the red circle", OPTIONS) == "C"
    assert extract_choice("a red ball", OPTIONS) == "B"
    assert extract_choice("red", OPTIONS) is None  # partial text is not a match
    assert extract_choice("the red circle") is None  # no options, no text match


def test_extract_choice_text_match_overrides_capital_article_after_cue():
    # Without options, a capital after "Answer:" is read as a label; with them, the exact
    # option text wins: "A red ball" is option B, not option A.
    assert extract_choice("Answer: A red ball") == "A"
    assert extract_choice("Answer: A red ball", OPTIONS) == "B"


def test_extract_choice_list_options_with_own_labels():
    videomme = ["A. Apples.", "B. Pears.", "C. Plums.", "D. Figs."]
    assert extract_choice("pears", videomme) == "B"
    assert extract_choice("(d)", videomme) == "D"
    assert extract_choice("pears", ["apples", "pears"]) == "B"  # lettered by position


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_choice():
    good = "<think>red and round</think><answer>(b)</answer>"
    assert accuracy_reward(good, "B") == 1.0
    assert accuracy_reward(good, "A") == 0.0
    assert accuracy_reward("<think>x</think><answer>A or B</answer>", "B") == 0.0
    # no tags: the whole response is read
    assert accuracy_reward("The answer is C", "C") == 1.0
    # the reference may be written as a labelled option or as option text
    assert accuracy_reward("<answer>C</answer>", "C. Red circle", options=OPTIONS) == 1.0
    assert accuracy_reward("<answer>C</answer>", "red circle", options=OPTIONS) == 1.0
    # the last answer block counts
    assert accuracy_reward("<answer>A</answer><answer>D</answer>", "D") == 1.0


def test_accuracy_choice_bad_reference():
    with pytest.raises(ValueError, match="does not name one option letter"):
        accuracy_reward("<answer>B</answer>", "red ball")


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("3.14", "3.1416", 1.0),  # |diff| 0.0016 <= 0.01 * 3.1416 = 0.0314
        ("3.0", "3.1416", 0.0),  # |diff| 0.1416 > 0.0314
        ("about 12 apples, maybe 13", "12", 1.0),  # first number
        ("1,234", "1234", 1.0),  # thousands comma
        ("1,234.5", "1234.5", 1.0),
        ("-5", "5", 0.0),  # sign matters
        ("\u22125", "-5.0", 1.0),  # unicode minus
        ("+7", "7", 1.0),
        ("45%", "45", 1.0),
        ("45%", "0.45", 1.0),  # percent read as a fraction too
        ("0.45", "45%", 1.0),
        ("47%", "0.45", 0.0),  # |0.47 - 0.45| = 0.02 > 0.01 (absolute, |ref| < 1)
        ("0.005", "0", 1.0),  # absolute tolerance 0.01 near zero
        ("0.02", "0", 0.0),
        ("100", "101", 1.0),  # |diff| 1 <= 0.01 * 101 = 1.01
        ("98", "101", 0.0),  # |diff| 3 > 1.01
        ("no idea", "3", 0.0),
        ("2.5e3", "2500", 1.0),
    ],
)
def test_accuracy_number(prediction, reference, expected):
    response = f"<think>counting</think><answer>{prediction}</answer>"
    assert accuracy_reward(response, reference, kind="number") == expected


def test_accuracy_number_tolerance_argument():
    # |3.14 - 3.1416| = 0.0016 > 1e-4 * 3.1416 = 0.000314
    assert accuracy_reward("<answer>3.14</answer>", "3.1416", "number", tolerance=1e-4) == 0.0
    with pytest.raises(ValueError, match="contains no number"):
        accuracy_reward("<answer>3</answer>", "three", kind="number")


def test_normalize_text():
    assert normalize_text("  The  Eiffel-Tower!\n") == "eiffel tower"
    assert normalize_text("An apple, a day.") == "apple day"
    assert normalize_text("theatre") == "theatre"  # "the" only as a whole word


def test_accuracy_text():
    assert accuracy_reward("<answer>The Eiffel Tower!</answer>", "eiffel tower", "text") == 1.0
    assert accuracy_reward("<answer>Eiffel</answer>", "eiffel tower", "text") == 0.0
    assert accuracy_reward("<answer>a   Red  BALL</answer>", "red ball.", "text") == 1.0


def test_accuracy_judge():
    calls = []

    def judge(prediction, reference):
        calls.append((prediction, reference))
        return 0.75

    response = "<think>t</think><answer>a dog</answer>"
    assert accuracy_reward(response, "dog", "judge", judge=judge) == 0.75
    assert calls == [("a dog", "dog")]
    with pytest.raises(ValueError, match="needs a judge"):
        accuracy_reward("<answer>a dog</answer>", "dog", kind="judge")
    with pytest.raises(ValueError, match="outside"):
        accuracy_reward("<answer>a dog</answer>", "dog", "judge", judge=lambda p, r: 2.0)


def test_accuracy_unknown_kind():
    with pytest.raises(ValueError, match="unknown accuracy kind 'regex'"):
        accuracy_reward("<answer>B</answer>", "B", kind="regex")


# ----------------------------------------------------------------------------- combined


def test_combined_reward():
    good = "<think>red</think>\n<answer>B</answer>"
    assert combined_reward(good, "B") == {"format": 1.0, "accuracy": 1.0, "total": 1.5}
    # right letter, no tags: 0.5 * 0 + 1.0 * 1
    assert combined_reward("B", "B") == {"format": 0.0, "accuracy": 1.0, "total": 1.0}
    # right format, wrong answer, recipe weights: 0.2 * 1 + 2.0 * 0
    assert combined_reward(good, "C", format_weight=0.2, accuracy_weight=2.0) == {
        "format": 1.0,
        "accuracy": 0.0,
        "total": 0.2,
    }
