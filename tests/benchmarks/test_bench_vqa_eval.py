"""The shared VQA normaliser and the 10-choose-9 VQA accuracy, on hand-checked cases."""

import pytest

from vtc.benchmarks.vqa_eval import (
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("The dog", "dog"),  # articles dropped
        ("a red apple", "red apple"),
        ("an owl", "owl"),
        ("Two", "2"),  # number words -> digits
        ("ten dogs", "10 dogs"),
        ("none", "0"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("dont know", "don't know"),  # contractions restored
        ("isnt", "isn't"),
        ("red-white", "red white"),  # punctuation not touching a space -> space
        ("red - white", "red white"),  # touching a space -> deleted
        ("yes, there is", "yes there is"),  # commas deleted
        ("what?", "what"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),
        ("man's hat", "man 's hat"),  # possessive split, as EvalAI does
        ("  Tennis\n", "tennis"),
        ("(B)", "b"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_rules():
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("t- shirt") == "t shirt"
    assert process_punctuation("1,5 and a-b") == "15 and ab"  # a digit,digit group: every mark deleted
    assert process_punctuation("end.") == "end"
    assert process_digit_article("The Three Bears") == "3 bears"


def test_leave_one_out_by_hand():
    answers = ["cat", "cat"] + ["dog"] * 8
    # "cat" left out (2 subsets): 1 other cat -> 1/3; "dog" left out (8 subsets): 2 cats -> 2/3.
    assert leave_one_out_accuracy("cat", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert leave_one_out_accuracy("cat", answers) == pytest.approx(0.6)
    # one human: 9 subsets keep it (1/3), the subset without it has 0 -> 0.3
    assert leave_one_out_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # three humans: 3 subsets with 2 others (2/3), 7 subsets with 3 (1) -> 0.9
    assert leave_one_out_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert leave_one_out_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert leave_one_out_accuracy("bird", ["cat"] * 10) == 0.0


def test_vqav2_mode():
    two_of_ten = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("Two", two_of_ten) == pytest.approx(0.6)
    assert vqa_accuracy("two people", two_of_ten) == 0.0
    # unanimous humans: the answers are not processed further, the prediction still is
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("The net", ["net"] * 8 + ["netting", "nets"]) == 1.0
    assert vqa_accuracy("nets", ["net"] * 8 + ["netting", "nets"]) == pytest.approx(0.3)


def test_textvqa_mode_normalises_answers_too():
    answers = ["two", "2", "2", "two", "2", "2", "2", "2", "2", "2"]
    assert vqa_accuracy("2", answers, mode="textvqa") == 1.0
    dakota = [
        "nous les gosses",
        "dakota",
        "clos culombu",
        "dakota digital",
        "dakota",
        "dakota",
        "dakota digital",
        "dakota digital",
        "dakota",
        "dakota",
    ]
    assert vqa_accuracy("Dakota", dakota, mode="textvqa") == 1.0  # 5 humans
    # 3 humans: 3 subsets with 2 others -> 2/3, 7 subsets with 3 -> 1: (2 + 7) / 10
    assert vqa_accuracy("Dakota Digital", dakota, mode="textvqa") == pytest.approx(0.9)
    with pytest.raises(ValueError):
        vqa_accuracy("x", ["x"], mode="nope")
