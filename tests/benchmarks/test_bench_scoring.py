"""Scorers on hand-written predictions whose right answers were worked out by hand."""

import json
import math

import pytest

from vtc.benchmarks import get_benchmark
from vtc.benchmarks import mmbench, mme, mmmu, pope, scienceqa, seedbench

from bench_cases import CASES


def records(name, predictions, fixtures_dir):
    directory, split, _ = CASES[name]
    rows = get_benchmark(name).load(str(fixtures_dir / directory), split, None).remove_columns("image").to_list()
    assert len(rows) == len(predictions)
    return [row | {"prediction": p} for row, p in zip(rows, predictions)]


def rec(family, answer, prediction, **meta):
    return {
        "id": f"{family}-{len(meta)}",
        "image_id": "",
        "question": "",
        "answers": [answer],
        "family": family,
        "meta": json.dumps(meta),
        "prediction": prediction,
    }


def test_headline_metric_first(fixtures_dir):
    headline = {
        "gqa": "accuracy",
        "pope": "f1_mean",
        "mme": "total",
        "scienceqa": "accuracy",
        "textvqa": "accuracy",
        "textvqa_ocr": "accuracy",
        "vqav2": "accuracy",
        "mmbench": "accuracy",
        "seedbench": "accuracy",
        "mmmu": "accuracy",
    }
    for name, (_, _, count) in CASES.items():
        metrics = get_benchmark(name).score(records(name, ["yes"] * count, fixtures_dir))
        assert next(iter(metrics)) == headline[name], name


# ------------------------------------------------------------------------------------------------ GQA


def test_gqa_exact_match_ignores_case_and_punctuation_only(fixtures_dir):
    # answers: yes (verify), man (query), right (choose), t-shirt (query)
    got = get_benchmark("gqa").score(records("gqa", ["Yes.", "The man", " Right ", "T-Shirt"], fixtures_dir))
    # "The man" is wrong: lmms-eval's exact match drops neither articles nor number words
    assert got == {"accuracy": 75.0, "accuracy/choose": 100.0, "accuracy/query": 50.0, "accuracy/verify": 100.0}
    got = get_benchmark("gqa").score(records("gqa", ["no", "man", "left", "tshirt"], fixtures_dir))
    assert got["accuracy"] == 50.0


# ----------------------------------------------------------------------------------------------- POPE


POPE_CASES = [
    # category, ground truth, prediction
    ("adversarial", "yes", "yes"),
    ("adversarial", "yes", "no"),
    ("adversarial", "no", "yes"),
    ("adversarial", "no", "no"),
    ("popular", "yes", "Yes"),
    ("popular", "yes", "Yes."),  # not exactly "yes" for lmms-eval: wrong, neither TP nor FN
    ("popular", "no", "no"),
    ("popular", "no", "No"),
    ("random", "yes", "yes, there is"),  # unparsed by lmms-eval; "yes" for LLaVA
    ("random", "no", "No, there is not."),  # unparsed by lmms-eval; "no" for LLaVA
    ("random", "no", "yes"),
    ("random", "yes", "yes"),
]


def test_pope_by_hand():
    got = pope.score([rec(c, g, p) for c, g, p in POPE_CASES])
    # lmms-eval parsing, per category (TP, FP, FN):
    #   adversarial (1, 1, 1): P = R = F1 = 1/2, acc 2/4, predicted-yes ratio 2/4
    #   popular     (1, 0, 0): P = R = F1 = 1,   acc 3/4, predicted-yes ratio 1/4
    #   random      (1, 1, 0): P = 1/2, R = 1, F1 = 2/3, acc 1/4, predicted-yes ratio 2/4
    # yes_ratio is lmms-eval's pope_yes_ratio, the share of ground-truth "yes": 2/4 in every category
    assert got["f1/adversarial"] == pytest.approx(50.0)
    assert got["precision/popular"] == pytest.approx(100.0)
    assert got["recall/popular"] == pytest.approx(100.0)
    assert got["accuracy/popular"] == pytest.approx(75.0)
    assert got["pred_yes_ratio/popular"] == pytest.approx(25.0)
    assert got["yes_ratio/popular"] == pytest.approx(50.0)
    assert got["precision/random"] == pytest.approx(50.0)
    assert got["recall/random"] == pytest.approx(100.0)
    assert got["f1/random"] == pytest.approx(200 / 3)
    assert got["accuracy/random"] == pytest.approx(25.0)
    assert got["f1_mean"] == pytest.approx((50 + 100 + 200 / 3) / 3)
    assert got["accuracy_mean"] == pytest.approx((50 + 75 + 25) / 3)
    # pooled (lmms-eval's numbers): TP 3, FP 2, FN 1 -> P 3/5, R 3/4, F1 2PR/(P+R) = 2/3
    assert got["accuracy"] == pytest.approx(100 * 6 / 12)
    assert got["precision"] == pytest.approx(60.0)
    assert got["recall"] == pytest.approx(75.0)
    assert got["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35 * 100)
    assert got["pred_yes_ratio"] == pytest.approx(100 * 5 / 12)
    assert got["yes_ratio"] == pytest.approx(50.0)
    # LLaVA eval_pope parsing: popular all right; random preds yes, no, yes, yes -> TP 2, FP 1, FN 0
    assert got["llava/f1/popular"] == pytest.approx(100.0)
    assert got["llava/f1/random"] == pytest.approx(80.0)
    assert got["llava/accuracy/random"] == pytest.approx(75.0)
    assert got["llava/f1_mean"] == pytest.approx((50 + 100 + 80) / 3)


@pytest.mark.parametrize(
    "text, lmms, llava",
    [
        ("yes", "yes", "yes"),
        ("Yes", "yes", "yes"),
        (" No ", "no", "no"),
        ("Yes.", "yes.", "yes"),
        ("yes, there is", "yes, there is", "yes"),
        ("There is no dog.", "there is no dog.", "no"),
        ("It is not there", "it is not there", "no"),
        ("I see a dog. No cat.", "i see a dog. no cat.", "yes"),  # LLaVA reads the first sentence only
    ],
)
def test_pope_parsers(text, lmms, llava):
    assert pope.parse_lmms_eval(text) == lmms
    assert pope.parse_llava(text) == llava


def test_pope_on_fixture(fixtures_dir):
    # every category: gt yes, no; all answered "Yes" -> P 1/2, R 1, F1 2/3, acc 1/2, predicted-yes ratio 1
    got = get_benchmark("pope").score(records("pope", ["Yes"] * 6, fixtures_dir))
    assert got["f1_mean"] == pytest.approx(200 / 3)
    assert got["pred_yes_ratio"] == 100.0
    assert got["yes_ratio"] == 50.0  # ground-truth share (lmms-eval's pope_yes_ratio)
    assert got["accuracy"] == 50.0


# ------------------------------------------------------------------------------------------------ MME


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, it is.", "yes"),
        ("No.", "no"),
        ("Not sure", "no"),  # "no" within the first 4 characters
        ("There is no train", "other"),
        ("Maybe", "other"),
        ("", "other"),
    ],
)
def test_mme_parse(text, parsed):
    assert mme.parse_prediction(text) == parsed


def test_mme_acc_plus_pairs(fixtures_dir):
    # code_reasoning (No, Yes): both right -> acc 100, acc+ 100, score 200
    # existence (Yes, No): first right, second wrong -> acc 50, acc+ 0, score 50
    got = get_benchmark("mme").score(records("mme", ["No", "Yes, it is.", "yes", "Yes"], fixtures_dir))
    assert got["acc/code_reasoning"] == 100.0 and got["acc_plus/code_reasoning"] == 100.0
    assert got["acc/existence"] == 50.0 and got["acc_plus/existence"] == 0.0
    assert got["score/existence"] == 50.0
    assert got["perception"] == 50.0
    assert got["cognition"] == 200.0
    assert got["total"] == 250.0


def test_mme_acc_plus_by_hand():
    rows = []
    # two images in `count`: image 1 both right, image 2 both wrong; one image in `OCR`: one of two right
    for image, gt, pred in [("c1", "Yes", "Yes"), ("c1", "No", "No"), ("c2", "Yes", "No"), ("c2", "No", "Yes")]:
        rows.append(rec("count", gt, pred) | {"image_id": image})
    for gt, pred in [("Yes", "Yes"), ("No", "Yes")]:
        rows.append(rec("OCR", gt, pred) | {"image_id": "o1"})
    got = mme.score(rows)
    assert (got["acc/count"], got["acc_plus/count"]) == (50.0, 50.0)
    assert (got["acc/OCR"], got["acc_plus/OCR"]) == (50.0, 0.0)
    assert got["perception"] == 100.0 + 50.0
    # no cognition item: lmms-eval reports no mme_cognition_score (vtc said 0 before the lmms-eval parity tests)
    assert math.isnan(got["cognition"]) and got["total"] == 150.0


# ------------------------------------------------------------------------------------------ ScienceQA


@pytest.mark.parametrize(
    "prediction, right",
    [
        ("B", True),
        ("b", True),
        (" B\n", True),
        ("B. Louisiana", True),
        ("C. Arizona", False),
        ("(B)", False),  # lmms-eval / LLaVA rule: only "X" or "X. ..." count
        ("The answer is B", False),
        ("Louisiana", False),
    ],
)
def test_scienceqa_rule(prediction, right):
    assert scienceqa.is_correct(prediction, "B") is right


def test_scienceqa_on_fixture(fixtures_dir):
    got = get_benchmark("scienceqa").score(records("scienceqa", ["A", "(B)", "C. Is it warm?"], fixtures_dir))
    assert got["accuracy"] == pytest.approx(200 / 3)
    assert got["accuracy/language science"] == 0.0
    assert got["accuracy/natural science"] == 100.0


# ---------------------------------------------------------------------------------------- TextVQA/VQAv2


def test_textvqa_on_fixture(fixtures_dir):
    # dakota: 5 humans -> 1; "Copenhagen." -> 1; "two": answers normalise to ten "2" -> 1
    for name in ("textvqa", "textvqa_ocr"):
        got = get_benchmark(name).score(records(name, ["Dakota", "Copenhagen.", "two"], fixtures_dir))
        assert got == {"accuracy": 100.0}
    got = get_benchmark("textvqa").score(records("textvqa", ["Dakota Digital", "paris", "2"], fixtures_dir))
    assert got["accuracy"] == pytest.approx(100 * (0.9 + 0 + 1) / 3)


def test_vqav2_on_fixture(fixtures_dir):
    # row 1: "nets" said by 1 of 10 -> 0.3; row 2: "Two" -> "2", said by 2 of 10 -> 0.6; row 3: "Yes." -> 1
    got = get_benchmark("vqav2").score(records("vqav2", ["nets", "Two", "Yes."], fixtures_dir))
    assert got["accuracy"] == pytest.approx(100 * (0.3 + 0.6 + 1.0) / 3)
    assert got["accuracy/other"] == pytest.approx(30.0)
    assert got["accuracy/number"] == pytest.approx(60.0)
    assert got["accuracy/yes/no"] == pytest.approx(100.0)


# -------------------------------------------------------------------------------------------- MMBench


OPTIONS = {"A": "dog", "B": "cat", "C": "bird"}


@pytest.mark.parametrize(
    "prediction, choice",
    [
        ("B", "B"),
        ("B. cat", "B"),
        ("(B)", "B"),
        ("The answer is B", "B"),
        ("B: cat", "B"),
        ("cat", "B"),  # option text
        ("It is a Cat.", "B"),
        ("A cat", "A"),  # known quirk (as in the reference heuristic): the article reads as option A
        ("B or C", "B"),  # lmms-eval's extract_mcq_answer: a standalone letter starting the reply wins
        ("a cat or a dog", None),
        ("I don't know", None),
        ("", None),
    ],
)
def test_mmbench_extract(prediction, choice):
    assert mmbench.extract_choice(prediction, OPTIONS) == choice


def test_mmbench_on_fixture(fixtures_dir):
    # 241 (B) right, 1000241 (A) right, 2000241 (C) wrong, 250 (D) right via text, 300 (A) right via text "3"
    got = get_benchmark("mmbench").score(records("mmbench", ["B", "(A)", "B", "he opens it", "3"], fixtures_dir))
    # CircularEval, as lmms-eval's headline: question 241 fails one of its 3 rotations; 250 and 300 are right
    assert got["accuracy"] == pytest.approx(200 / 3)
    assert got["row_accuracy"] == 80.0
    assert got["extracted"] == 100.0
    assert got["accuracy/image_topic"] == 0.0  # categories count originals only (241)


# ----------------------------------------------------------------------------------------- SEED-Bench


@pytest.mark.parametrize(
    "prediction, right",
    [
        ("A", True),
        ("a", True),
        ("A. One", True),
        ("  A\n", True),
        ("(A)", False),
        ("The answer is A", False),
        ("B", False),
        ("", False),
    ],
)
def test_seedbench_first_character(prediction, right, fixtures_dir):
    got = seedbench.score([rec("instances_counting", "A", prediction)])
    assert got["accuracy"] == (100.0 if right else 0.0)


def test_seedbench_on_fixture(fixtures_dir):
    got = get_benchmark("seedbench").score(records("seedbench", ["A", "Snowy"], fixtures_dir))
    assert got == {"accuracy": 50.0, "accuracy/instances_counting": 100.0, "accuracy/scene_understanding": 0.0}


# ----------------------------------------------------------------------------------------------- MMMU


PAINTERS = ["Monet", "Manet", "Degas", "Renoir"]


@pytest.mark.parametrize(
    "prediction, choice",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. Manet", "B"),
        ("The answer is B", "B"),
        ("The answer is (C).", "C"),
        ("A and B", "B"),  # several letters: the last one written wins
        ("I think it was painted by Manet, judging by the brushwork", "B"),  # > 5 words: option text
    ],
)
def test_mmmu_multiple_choice(prediction, choice):
    assert mmmu.parse_multi_choice(prediction, PAINTERS) == choice


def test_mmmu_random_fallback_is_seeded():
    first = mmmu.parse_multi_choice("no idea", PAINTERS, seed="validation_Art_1")
    assert first in "ABCD"
    assert all(mmmu.parse_multi_choice("no idea", PAINTERS, seed="validation_Art_1") == first for _ in range(5))


@pytest.mark.parametrize(
    "gold, prediction, right",
    [
        ("12.5", "12.5", True),
        ("12.5", "The area is 12.5 square units.", True),
        ("12.5", "12.50", True),
        ("12.5", "12", False),
        ("1000", "1,000", True),
        ("Paris", "It is Paris.", True),
        ("Paris", "London", False),
    ],
)
def test_mmmu_open(gold, prediction, right):
    assert mmmu.eval_open(gold, mmmu.parse_open(prediction)) is right


def test_mmmu_on_fixture(fixtures_dir):
    got = get_benchmark("mmmu").score(records("mmmu", ["B", "The area is 12.5.", "(C)"], fixtures_dir))
    assert got["accuracy"] == 66.667  # lmms-eval's mmmu_acc is round(2/3, 5)
    assert got["accuracy/Art and Design"] == 100.0
    assert got["accuracy/Science"] == 100.0
    assert got["accuracy/Business"] == 0.0
    assert got["accuracy/Accounting"] == 0.0
