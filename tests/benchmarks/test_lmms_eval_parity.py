"""vtc's scorers against lmms-eval 0.7.3's own task code (differential tests, zero mismatches allowed).

For every benchmark vtc scores, documents are built in the hub schema (the fixture rows plus generated ones),
written as a local parquet mirror and read back through the benchmark's real loader, so vtc scores exactly the
rows it would prepare. Every document then gets a seeded, systematic set of predictions: its right and wrong
answers (and option letters / texts) under case changes, every kind of whitespace (unicode spaces, NUL,
zero-width), punctuation around and inside, articles, number words and digits, contractions and possessives,
repeated periods, "Y"/"N", option letters alone / with text / in a sentence / in markdown / in other scripts,
reasoning tags and empty answers, plus random chains of those perturbations.

Per prediction, vtc's per-sample result is compared with lmms-eval's `process_results` (and, where lmms-eval
decides per sample inside the aggregation, with the functions that aggregation calls). Per run (each document
answered once, some runs on a random subset of the documents, so categories go missing, MME pairs break and
MMBench circular copies lose their original), every metric vtc reports is compared with what lmms-eval's
aggregation functions return (numbers within 1e-9; lmms-eval's fractions are vtc's percentages / 100). A figure
lmms-eval does not compute (no item in a category, MME groups that are not pairs) must be NaN in vtc. A metric
vtc reports that lmms-eval has no counterpart for must be derived here from lmms-eval's per-sample results (e.g.
per-category accuracy), except POPE's `llava/*` (LLaVA's eval_pope.py parsing, tested in test_bench_scoring.py).

The one deliberate difference, MMMU's random letter when no option can be read (lmms-eval draws from Python's
global RNG; vtc seeds the draw with the question id), is bridged by giving lmms-eval's module the same seeded
draw: a `random` with vtc's `choice`.
"""

from __future__ import annotations

import copy
import math
import random
import types
import zlib
from collections import defaultdict
from pathlib import Path

import datasets
import pytest
import yaml

import lmms_eval_reference
from vtc.benchmarks import LMMS_EVAL_VERSION, get_benchmark, gqa, mmbench, mme, mmmu, pope, scienceqa, seedbench
from vtc.benchmarks._loading import load_source, meta_of, undecode_images
from vtc.benchmarks.vqa_eval import vqa_accuracy

TOLERANCE = 1e-9
RUNS = 24  # aggregate comparisons per benchmark (each run answers every kept document once)
MIN_PREDICTIONS = 500
PER_DOCUMENT = 100  # predictions per document (about 2,500-6,000 per benchmark)

# ------------------------------------------------------------------------------------------ perturbations

SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u1680", "\u2002", "\u2003",
          "\u2009", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\u200b", "\ufeff", "\x00"]  # fmt: skip
AROUND = [".", "..", "...", "....", "!", "?", ",", ";", ":", "'", '"', "*", "**", "`", "(", ")", "[", "]", "{", "}",
          "-", "_", "/", "\\", "@", "<", ">", "=", "+", "#", "%", "&", "~", "。", "、", "！", "？", "…"]  # fmt: skip
WRAPS = [("(", ")"), ("[", "]"), ("**", "**"), ("*", "*"), ('"', '"'), ("'", "'"), ("`", "`"), ("<b>", "</b>"),
         ("Answer: ", ""), ("**Answer:** ", ""), ("The answer is ", "."), ("I think it is ", "."), ("「", "」"),
         ("“", "”"), ("<think>hmm, maybe not</think>", ""), ("<think>\nno, yes\n</think>\n", ""), ("</think>", ""),
         ("<think>", ""), ("", "<think>A</think>")]  # fmt: skip
INSIDE = ["-", "/", "_", ",", ", ", ".", "'", "  ", "\t", "\xa0", "", " . ", "'s "]
ARTICLES = ["a ", "an ", "the ", "The ", "A ", "An ", "THE "]
WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "10": "ten", "0 ": "none "}
CONSTANTS = [
    "", " ", "\n", "\x00", "\u200b", "yes", "no", "Yes", "No", "YES", "NO", "Y", "N", "y", "n", "Y.", "n.", "yes.",
    "No.", "Yes, there is.", "No, there is not.", "yes no", "no yes", "nope", "yeah", "Not", "not sure", "none",
    "None", "zero", "one", "two", "2", "10", "1,000", "1000", "3.50", "A", "B", "C", "D", "E", "F", "a", "b", "(A)",
    "(B)", "A.", "B.", "C)", "D:", ":A", "**B**", "**Answer:** C", "Answer: A", "The answer is B.",
    "The answer is (C).", "I think the answer is D", "A cat", "A dog is on the left of the man", "An apple", "B. cat",
    "Option B", "`C`", "Ｂ", "В", "Β", "是", "否", "はい", "いいえ", "да", "нет", "نعم", "答案是B", "选C", "정답은 A",
    "<think>A</think>B", "<think>\nThe answer is A.\n</think>\nB", "</think>C", "he's", "hes", "he is", "men's room",
    "mens room", "dont", "don't", "it's", "its", "Im", "I'm", "y'all", "the man", "a man", "man.", "Man!", "t-shirt",
    "t shirt", "tshirt", "Dr. Who", "3.5", "3.0", "12.5", "so x = 12.5", "yes...", "no..", "N/A", "n/a", "nan",
    "banana", "left", "right", "A B", "(A) or (B)", "A, B", "I choose B", "C is wrong, D", "b.", "e",
    "Failed to obtain answer via API: B", "5cm", "12.5kg", "-3.0e2m", "x is so \n12.5", "so \nthe answer is 3",
]  # fmt: skip


def _numbers(text: str) -> str:
    for digit, word in WORDS.items():
        text = text.replace(digit, word) if digit in text else text.replace(word, digit)
    return text


def single_perturbations() -> list:
    """Functions str -> str, each one systematic perturbation."""
    fs = [lambda s: s, str.upper, str.lower, str.title, str.capitalize, str.swapcase, str.casefold, _numbers]
    for sp in SPACES:
        fs += [lambda s, sp=sp: sp + s, lambda s, sp=sp: s + sp, lambda s, sp=sp: sp + s + sp]
    for p in AROUND:
        fs += [lambda s, p=p: s + p, lambda s, p=p: p + s]
    fs += [lambda s, w=w: w[0] + s + w[1] for w in WRAPS]
    fs += [lambda s, c=c: s.replace(" ", c) if " " in s else s[:1] + c + s[1:] for c in INSIDE]
    fs += [lambda s, a=a: a + s for a in ARTICLES] + [lambda s: s + " a", lambda s: s + " the"]
    fs += [
        lambda s: s + "'s",
        lambda s: s + "s'",
        lambda s: s + "s",
        lambda s: "it's " + s,
        lambda s: s.replace("'", ""),
        lambda s: s.replace("'", "’"),
        lambda s: s.replace(" is", "'s"),
        lambda s: s + " " + s,
        lambda s: s + s,
        lambda s: f"{s}. {s}.",
        lambda s: s[:-1],
        lambda s: s[1:],
        lambda s: s.replace(".", ""),
        lambda s: s.replace(",", ""),
    ]
    return fs


SINGLE = single_perturbations()


def prediction_pool(bases: list[str], rng: random.Random, size: int = PER_DOCUMENT) -> tuple[list[str], list[str]]:
    """(perturbations of the right answer `bases[0]`, a seeded sample of `size` predictions drawn from every single
    perturbation of every base, the shared constants and random 2-3 step chains of perturbations)."""
    right = list(dict.fromkeys(f(bases[0]) for f in SINGLE))
    pool = [f(b) for b in bases for f in SINGLE] + CONSTANTS
    for _ in range(size):
        text = rng.choice(bases)
        for f in rng.sample(SINGLE, rng.randint(2, 3)):
            text = f(text)
        pool.append(text)
    pool = list(dict.fromkeys(pool))
    return right, rng.sample(pool, min(size, len(pool)))


# ---------------------------------------------------------------------------------------------- documents


def fixture_rows(fixtures_dir: Path, directory: str, split: str, config: str | None = None):
    ds = undecode_images(load_source(str(fixtures_dir / directory), split, None, config))
    return ds.features, ds.to_list()


def write_mirror(root: Path, relative: str, rows: list[dict], features) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def read_back(root: Path, relative: str) -> list[dict]:
    """The documents as lmms-eval gets them from `load_dataset` (image columns left out: no scorer reads them)."""
    ds = datasets.load_dataset("parquet", data_files=str(root / relative), split="train")
    return ds.remove_columns([c for c in ds.column_names if c.startswith("image")]).to_list()


def vtc_rows(name: str, root: Path, split: str) -> list[dict]:
    return get_benchmark(name).load(str(root), split, None).remove_columns("image").to_list()


def image_of(rows: list[dict], column: str = "image"):
    return next(r[column] for r in rows if r.get(column))


# --------------------------------------------------------------------------------------------- comparison


class Mismatches(list):
    def check(self, where: str, expected, got) -> None:
        if not same(expected, got):
            self.append(f"{where}: lmms-eval {expected!r}, vtc {got!r}")

    def metrics(self, where: str, expected: dict, got: dict, own_prefixes: tuple[str, ...] = ()) -> None:
        for key, value in expected.items():
            self.check(f"{where} [{key}]", value, got.get(key, "<missing>"))
        for key in got:
            if key not in expected and not key.startswith(own_prefixes):
                self.append(f"{where} [{key}]: vtc reports a metric with no lmms-eval counterpart")


def same(expected, got) -> bool:
    if isinstance(expected, tuple) and isinstance(got, tuple):  # per-sample fields, compared one by one
        return len(expected) == len(got) and all((e is None and g is None) or same(e, g) for e, g in zip(expected, got))
    if expected is None:  # lmms-eval reports nothing
        return isinstance(got, float) and math.isnan(got)
    if isinstance(expected, bool) or isinstance(got, bool) or isinstance(expected, str) or isinstance(got, str):
        return expected == got
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(got, float) and math.isnan(got)
    return isinstance(got, (int, float)) and abs(float(expected) - float(got)) <= TOLERANCE


def pct(value):
    return None if value is None else 100.0 * value


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def runs(n_docs: int, pools: list[tuple[list[str], list[str]]], rng: random.Random):
    """`RUNS` runs: (kept document indices, one prediction each); every third run keeps a random subset. Each run
    takes a perturbation of the right answer with its own probability, else any prediction of the document."""
    for r in range(RUNS):
        keep = list(range(n_docs))
        if r % 3 == 2:
            keep = sorted(rng.sample(keep, rng.randint(1, n_docs)))
        right_bias = rng.random()
        chosen = [rng.choice(pools[i][0] if rng.random() < right_bias else pools[i][1]) for i in keep]
        yield keep, chosen


def records_for(rows: list[dict], keep: list[int], predictions: list[str]) -> list[dict]:
    return [rows[i] | {"prediction": p} for i, p in zip(keep, predictions)]


def by_key(items, key):
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


def task_kwargs(lmms, task_file: str, **override) -> dict:
    """The `lmms_eval_specific_kwargs.default` of a task yaml (its `!function` lines dropped, as lmms-eval does)."""
    text = (lmms.root / "tasks" / task_file).read_text()
    config = yaml.safe_load("\n".join(line for line in text.splitlines() if "!function" not in line))
    return config["lmms_eval_specific_kwargs"]["default"] | override


@pytest.fixture(scope="module")
def lmms():
    from loguru import logger

    logger.disable("lmms_eval")  # lmms-eval logs every "A might be a quantifier" at INFO
    yield lmms_eval_reference.load()
    logger.enable("lmms_eval")


def test_version_recorded(lmms):
    assert LMMS_EVAL_VERSION == lmms_eval_reference.VERSION


GENERATION = {  # vtc benchmark -> lmms-eval task yaml(s) whose generation_kwargs apply
    "gqa": ["gqa/gqa.yaml"],
    "vqav2": ["vqav2/_default_template_vqav2_yaml"],
    "textvqa": ["textvqa/_default_template_textvqa_yaml"],
    "textvqa_ocr": ["textvqa/_default_template_textvqa_yaml"],
    "pope": ["pope/pope.yaml"],
    "mme": ["mme/mme.yaml"],
    "scienceqa": ["scienceqa/scienceqa_img.yaml"],
    "seedbench": ["seedbench/seedbench.yaml"],
    "mmbench": ["mmbench/_default_template_mmbench_en_yaml"],
    "mmmu": ["mmmu/_default_template_yaml", "mmmu/mmmu_val.yaml"],
}


@pytest.mark.parametrize("name", sorted(GENERATION))
def test_generation_length_equal_or_recorded(lmms, name):
    """vtc generates as many new tokens as lmms-eval, or records lmms-eval's figure (a task without one gets the
    `llava` wrapper's default, 1024) in `options["lmms_eval_max_new_tokens"]`, its docstring saying why."""
    limit = None
    for task_file in GENERATION[name]:
        text = (lmms.root / "tasks" / task_file).read_text()
        config = yaml.safe_load("\n".join(line for line in text.splitlines() if "!function" not in line))
        limit = (config.get("generation_kwargs") or {}).get("max_new_tokens", limit)
    benchmark = get_benchmark(name)
    if benchmark.max_new_tokens != limit:
        assert benchmark.options.get("lmms_eval_max_new_tokens") == (limit or 1024), name


# ------------------------------------------------------------------------------------------------ GQA

GQA_ANSWERS = ["yes", "no", "man", "t-shirt", "right", "Man's hat", "dr. who", "2", "two", "ice cream", "U.S.", "50%",
               "3.5", "café", "İstanbul", "straße", "rock'n'roll", "a", "yes\x00", "ÉCOLE", "ﬁsh", "Ⅻ"]  # fmt: skip


def gqa_case(fixtures_dir, tmp_path):
    features, questions = fixture_rows(fixtures_dir, "gqa", "testdev", "testdev_balanced_instructions")
    image_features, images = fixture_rows(fixtures_dir, "gqa", "testdev", "testdev_balanced_images")
    structural = ["verify", "query", "choose", "logical", "compare"]
    for i, answer in enumerate(GQA_ANSWERS):
        doc = copy.deepcopy(questions[i % len(questions)])
        doc |= {"id": f"9{i:04d}", "answer": answer, "imageId": images[i % len(images)]["id"]}
        doc["types"] = dict(doc["types"], structural=structural[i % len(structural)])
        questions.append(doc)
    write_mirror(tmp_path, "testdev_balanced_instructions/testdev-00000-of-00001.parquet", questions, features)
    write_mirror(tmp_path, "testdev_balanced_images/testdev-00000-of-00001.parquet", images, image_features)
    docs = read_back(tmp_path, "testdev_balanced_instructions/testdev-00000-of-00001.parquet")
    return docs, vtc_rows("gqa", tmp_path, "testdev")


def test_gqa(lmms, fixtures_dir, tmp_path):
    docs, rows = gqa_case(fixtures_dir, tmp_path)
    em = lmms.metrics.exact_match_hf_evaluate

    def reference(doc, prediction):
        # lmms-eval's generate_until default: strip the output, exact_match(references=[doc_to_target], ...)
        return float(em(predictions=[prediction.strip()], references=[doc["answer"]], ignore_case=True,
                        ignore_punctuation=True)["exact_match"])  # fmt: skip

    def aggregate(docs_, predictions):
        scores = [reference(d, p) for d, p in zip(docs_, predictions)]
        metrics = {"accuracy": 100 * lmms.metrics.mean(scores)}
        for family, items in by_key(zip(docs_, scores), lambda x: x[0]["types"]["structural"]).items():
            metrics[f"accuracy/{family}"] = 100 * lmms.metrics.mean([s for _, s in items])
        return metrics

    run_benchmark("gqa", docs, rows, [d["answer"] for d in docs], reference,
                  lambda r: float(gqa.is_correct(r["prediction"], r["answers"][0])), aggregate,
                  lambda d: lmms.gqa.gqa_doc_to_text(d, task_kwargs(lmms, "gqa/gqa.yaml")))  # fmt: skip


# --------------------------------------------------------------------------------------- VQAv2 / TextVQA

VQA_ANSWER_SETS = [
    ["net"] * 10, ["2"] * 2 + ["3"] * 8, ["two", "2", "2", "2", "two", "2", "2", "2", "2", "2"],
    ["he's", "he is", "hes", "he's", "he's", "he's", "he's", "he's", "he's", "he's"],
    ["men's room"] * 5 + ["mens room"] * 3 + ["restroom"] * 2, ["yes"] * 10, ["Yes"] * 9 + ["yes"],
    ["no"] * 7 + ["yes"] * 3, ["a dog"] * 4 + ["dog"] * 4 + ["the dog"] * 2, ["t-shirt"] * 5 + ["tshirt"] * 3 + ["t shirt"] * 2,
    ["1,000"] * 5 + ["1000"] * 5, ["3.5"] * 6 + ["3.50"] * 4, ["don't know"] * 3 + ["dont know"] * 3 + ["unknown"] * 4,
    ["Dr. Who"] * 10, ["red, white and blue"] * 6 + ["red white and blue"] * 4, ["left"] * 3 + ["right"] * 3 + ["center"] * 4,
    [" cat "] * 5 + ["cat\n"] * 5, ["none"] * 5 + ["0"] * 5, ["it's raining"] * 10, ["Im", "I'm", "im"] * 3 + ["I am"],
    ["U.S.A."] * 4 + ["usa"] * 6, ["10:30"] * 5 + ["10.30"] * 5, ["ten"] * 10, ["x-ray"] * 3 + ["xray"] * 7,
    ["ice-cream!"] * 5 + ["ice cream"] * 5, ["man's"] * 10, ["one way"] * 10, ["a"] * 10,
]  # fmt: skip


def vqa_type(answers: list[str]) -> str:
    first = answers[0].strip().lower()
    return "yes/no" if first in ("yes", "no") else "number" if first.replace(",", "").isdigit() else "other"


def vqa_bases(answers: list[str], other: list[str]) -> list[str]:
    common = sorted(set(answers), key=lambda a: -answers.count(a))
    return [common[0], common[-1], other[0]]


def vqav2_case(fixtures_dir, tmp_path):
    features, docs = fixture_rows(fixtures_dir, "vqav2", "validation")
    for i, texts in enumerate(VQA_ANSWER_SETS):
        doc = copy.deepcopy(docs[i % 3])
        doc["answers"] = [{"answer": t, "answer_confidence": "yes", "answer_id": k + 1} for k, t in enumerate(texts)]
        doc |= {"question_id": 700000 + i, "answer_type": vqa_type(texts), "multiple_choice_answer": texts[0]}
        docs.append(doc)
    write_mirror(tmp_path, "data/validation-00000-of-00001.parquet", docs, features)
    return read_back(tmp_path, "data/validation-00000-of-00001.parquet"), vtc_rows("vqav2", tmp_path, "validation")


def test_vqav2(lmms, fixtures_dir, tmp_path):
    docs, rows = vqav2_case(fixtures_dir, tmp_path)

    def reference(doc, prediction):  # process_results rewrites doc["answers"]: give it a copy
        return lmms.vqav2.vqav2_process_results_val(copy.deepcopy(doc), [prediction])["exact_match"]

    def aggregate(docs_, predictions):
        scores = [reference(d, p) for d, p in zip(docs_, predictions)]
        metrics = {"accuracy": 100 * lmms.metrics.mean(scores)}
        for family, items in by_key(zip(docs_, scores), lambda x: x[0]["answer_type"]).items():
            metrics[f"accuracy/{family}"] = 100 * lmms.metrics.mean([s for _, s in items])
        return metrics

    answers = [[a["answer"] for a in d["answers"]] for d in docs]
    bases = [vqa_bases(a, answers[(i + 1) % len(answers)]) for i, a in enumerate(answers)]
    run_benchmark("vqav2", docs, rows, bases, reference,
                  lambda r: vqa_accuracy(r["prediction"], list(r["answers"]), mode="vqav2"), aggregate,
                  lambda d: lmms.vqav2.vqav2_doc_to_text(d, task_kwargs(lmms, "vqav2/vqav2_val.yaml")))  # fmt: skip


@pytest.mark.parametrize("name", ["textvqa", "textvqa_ocr"])
def test_textvqa(lmms, fixtures_dir, tmp_path, name):
    features, docs = fixture_rows(fixtures_dir, "textvqa", "validation")
    for i, texts in enumerate(VQA_ANSWER_SETS):
        doc = copy.deepcopy(docs[i % 3])
        doc |= {"question_id": 80000 + i, "answers": texts, "ocr_tokens": texts[:3]}
        docs.append(doc)
    write_mirror(tmp_path, "data/validation-00000-of-00001.parquet", docs, features)
    docs = read_back(tmp_path, "data/validation-00000-of-00001.parquet")
    rows = vtc_rows(name, tmp_path, "validation")
    kwargs = task_kwargs(lmms, "textvqa/_default_template_textvqa_yaml", ocr=name == "textvqa_ocr")

    def reference(doc, prediction):
        return lmms.textvqa.textvqa_process_results(copy.deepcopy(doc), [prediction])["exact_match"]

    def aggregate(docs_, predictions):
        return {"accuracy": 100 * lmms.metrics.mean([reference(d, p) for d, p in zip(docs_, predictions)])}

    bases = [vqa_bases(d["answers"], docs[(i + 1) % len(docs)]["answers"]) for i, d in enumerate(docs)]
    run_benchmark(name, docs, rows, bases, reference,
                  lambda r: vqa_accuracy(r["prediction"], list(r["answers"]), mode="textvqa"), aggregate,
                  lambda d: lmms.textvqa.textvqa_doc_to_text(d, kwargs))  # fmt: skip


# ----------------------------------------------------------------------------------------------- POPE


def test_pope(lmms, fixtures_dir, tmp_path):
    features, docs = fixture_rows(fixtures_dir, "pope", "test")
    image = image_of(docs)
    answers = ["yes", "no", "Yes", "No", " yes", "no "]
    for i in range(30):
        category = ("adversarial", "popular", "random")[i % 3]
        docs.append({"id": str(100 + i), "question_id": str(i % 7), "question": f"Is there a thing {i} in the image?",
                     "answer": answers[i % len(answers)], "image_source": f"img{i % 5}", "image": image,
                     "category": category})  # fmt: skip
    write_mirror(tmp_path, "data/test-00000-of-00001.parquet", docs, features)
    docs = read_back(tmp_path, "data/test-00000-of-00001.parquet")
    rows = vtc_rows("pope", tmp_path, "test")
    m = lmms.pope

    def reference(doc, prediction):
        result = m.pope_process_results(doc, [prediction])["pope_accuracy"]
        return result["score"], result["prediction"], result["ground_truth"]

    def ours(record):
        prediction = pope.parse_lmms_eval(record["prediction"])
        truth = record["answers"][0]
        return float(prediction == truth), prediction, truth

    def figures(results):
        return {
            "accuracy": 100 * m.pope_aggregate_accuracy(results),
            "precision": 100 * m.pope_aggregate_precision(results),
            "recall": 100 * m.pope_aggregate_recall(results),
            "f1": 100 * m.pope_aggregate_f1_score(results),
            "yes_ratio": 100 * m.pope_aggregate_yes_ratio(results),
            # vtc's own: the share of outputs lmms-eval reads as "yes"
            "pred_yes_ratio": 100 * mean(r["prediction"] == "yes" for r in results),
        }

    def aggregate(docs_, predictions):
        results = [m.pope_process_results(d, [p])["pope_accuracy"] for d, p in zip(docs_, predictions)]
        metrics = figures(results)
        per_category = {c: figures([r for d, r in items]) for c, items in
                        by_key(zip(docs_, results), lambda x: x[0]["category"]).items()}  # fmt: skip
        metrics["f1_mean"] = mean(v["f1"] for v in per_category.values())
        metrics["accuracy_mean"] = mean(v["accuracy"] for v in per_category.values())
        for category, values in per_category.items():
            metrics |= {f"{k}/{category}": v for k, v in values.items()}
        return metrics

    bases = [[d["answer"], "no" if d["answer"].strip().lower() == "yes" else "yes"] for d in docs]
    run_benchmark("pope", docs, rows, bases, reference, ours, aggregate,
                  lambda d: m.pope_doc_to_text(d, task_kwargs(lmms, "pope/pope.yaml")), own_prefixes=("llava/",))  # fmt: skip


# ------------------------------------------------------------------------------------------------ MME


def test_mme(lmms, fixtures_dir, tmp_path):
    features, docs = fixture_rows(fixtures_dir, "mme", "test")
    image = image_of(docs)
    categories = list(mme.PERCEPTION + mme.COGNITION) + ["not_an_mme_category"]
    gold = [("Yes", "No"), ("No", "Yes"), ("yes", "no."), ("Yes.", "No")]
    for c, category in enumerate(categories):
        for k in range(2):
            question_id = f"{category}/{k:04d}.png" if k else f"{c:012d}.jpg"
            for answer in gold[(c + k) % len(gold)]:
                docs.append({"question_id": question_id, "image": image, "category": category, "answer": answer,
                             "question": f"Is it {answer}? Please answer yes or no."})  # fmt: skip
    write_mirror(tmp_path, "data/test-00000-of-00001.parquet", docs, features)
    docs = read_back(tmp_path, "data/test-00000-of-00001.parquet")
    rows = vtc_rows("mme", tmp_path, "test")
    m = lmms.mme

    def reference(doc, prediction):
        ((key, result),) = m.mme_process_results(doc, [prediction]).items()
        return key, result["score"], m.parse_pred_ans(prediction)

    def ours(record):
        side = "mme_perception_score" if record["family"] in mme.PERCEPTION else "mme_cognition_score"
        right = mme.is_correct(record["prediction"], record["answers"][0])
        return side, float(right), mme.parse_prediction(record["prediction"])

    def lmms_score(results):
        if not results:
            return None  # lmms-eval computes no metric that received no item
        try:
            return m.mme_aggregate_results(results)
        except AssertionError:  # "MME only supports pairwise evaluation"
            return None

    def aggregate(docs_, predictions):
        keyed = [next(iter(m.mme_process_results(d, [p]).items())) for d, p in zip(docs_, predictions)]
        sides = {s: [r for k, r in keyed if k == s] for s in ("mme_perception_score", "mme_cognition_score")}
        perception, cognition = lmms_score(sides["mme_perception_score"]), lmms_score(sides["mme_cognition_score"])
        present = [lmms_score(v) for v in sides.values() if v]
        metrics = {
            "total": None if not present or None in present else sum(present),
            "perception": perception,
            "cognition": cognition,
        }
        for category, results in by_key([r for _, r in keyed], lambda r: r["category"]).items():
            images = by_key(results, lambda r: r["question_id"])
            metrics[f"acc/{category}"] = 100 * mean(r["score"] for r in results)
            metrics[f"acc_plus/{category}"] = 100 * mean(all(r["score"] for r in v) for v in images.values())
            metrics[f"score/{category}"] = lmms_score(results)
        return metrics

    bases = [[d["answer"], "no" if d["answer"].lower().startswith("y") else "yes"] for d in docs]
    run_benchmark("mme", docs, rows, bases, reference, ours, aggregate,
                  lambda d: m.mme_doc_to_text(d, task_kwargs(lmms, "mme/mme.yaml")))  # fmt: skip


# ---------------------------------------------------------------------------------------------- ScienceQA


def test_scienceqa(lmms, fixtures_dir, tmp_path):
    features, docs = fixture_rows(fixtures_dir, "scienceqa", "test", "ScienceQA-IMG")
    image = image_of(docs)
    docs = [d for d in docs if d["image"]]
    subjects = ["natural science", "social science", "language science"]
    for i in range(24):
        choices = ["cat", "dog", "bird", "fish", "ant"][: 2 + i % 4]
        docs.append(copy.deepcopy(docs[i % len(docs)]) | {"image": image, "choices": choices, "answer": i % len(choices),
                    "hint": ["", "A hint."][i % 2], "subject": subjects[i % 3]})  # fmt: skip
    write_mirror(tmp_path, "ScienceQA-IMG/test-00000-of-00001.parquet", docs, features)
    docs = read_back(tmp_path, "ScienceQA-IMG/test-00000-of-00001.parquet")
    rows = vtc_rows("scienceqa", tmp_path, "test")
    m = lmms.scienceqa

    def reference(doc, prediction):
        return m.sqa_process_results(doc, [prediction])["exact_match"]

    def aggregate(docs_, predictions):
        scores = [reference(d, p) for d, p in zip(docs_, predictions)]
        metrics = {"accuracy": 100 * lmms.metrics.mean(scores)}
        for family, items in by_key(zip(docs_, scores), lambda x: x[0]["subject"]).items():
            metrics[f"accuracy/{family}"] = 100 * lmms.metrics.mean([s for _, s in items])
        return metrics

    def bases(doc):
        right, wrong = doc["answer"], (doc["answer"] + 1) % len(doc["choices"])
        letter = chr(65 + right)
        return [letter, chr(65 + wrong), doc["choices"][right], f"{letter}. {doc['choices'][right]}",
                f"{chr(65 + wrong)}. {doc['choices'][wrong]}"]  # fmt: skip

    run_benchmark("scienceqa", docs, rows, [bases(d) for d in docs], reference,
                  lambda r: float(scienceqa.is_correct(r["prediction"], r["answers"][0])), aggregate,
                  lambda d: m.sqa_doc_to_text(d, task_kwargs(lmms, "scienceqa/scienceqa_img.yaml")))  # fmt: skip


# ---------------------------------------------------------------------------------------------- SEED-Bench


def test_seedbench(lmms, fixtures_dir, tmp_path):
    features, docs = fixture_rows(fixtures_dir, "seedbench", "test")
    image = next(d["image"] for d in docs if d["data_type"] == "image")
    docs = [d for d in docs if d["data_type"] == "image"]  # vtc keeps SEED-img only
    for i in range(24):
        docs.append(copy.deepcopy(docs[i % len(docs)]) | {"question_id": str(300 + i), "image": image,
                    "answer": "ABCD"[i % 4], "question_type_id": 1 + i % 9, "choice_b": ["Two", "b", "B. two"][i % 3]})  # fmt: skip
    write_mirror(tmp_path, "data/test-00000-of-00001.parquet", docs, features)
    docs = read_back(tmp_path, "data/test-00000-of-00001.parquet")
    rows = vtc_rows("seedbench", tmp_path, "test")
    m = lmms.seedbench

    def reference(doc, prediction):
        result = m.seed_process_result(doc, [prediction])["seed_image"]
        return m.seed_aggregation_result([result])

    def aggregate(docs_, predictions):
        results = [m.seed_process_result(d, [p])["seed_image"] for d, p in zip(docs_, predictions)]
        metrics = {"accuracy": 100 * m.seed_aggregation_result(results)}
        for type_id, items in by_key(zip(docs_, results), lambda x: x[0]["question_type_id"]).items():
            metrics[f"accuracy/{seedbench.DIMENSIONS[type_id]}"] = 100 * m.seed_aggregation_result(
                [r for _, r in items]
            )
        return metrics

    def bases(doc):
        wrong = "ABCD"[("ABCD".index(doc["answer"]) + 1) % 4]
        return [doc["answer"], wrong, doc[f"choice_{doc['answer'].lower()}"], f"{doc['answer']}. x"]

    run_benchmark("seedbench", docs, rows, [bases(d) for d in docs], reference,
                  lambda r: float(seedbench.is_correct(r["prediction"], r["answers"][0])), aggregate,
                  m.seed_doc_to_text)  # fmt: skip


# ---------------------------------------------------------------------------------------------- MMBench

MMBENCH_OPTIONS = [
    ["cat", "dog", "bird", "nan"], ["3", "4", "5", "6"], ["he runs", "he sits", "he sleeps", "he opens it"],
    ["A cat", "a dog", "Both", "None of the above"], ["red", "reddish", "blue", None], ["Yes", "No", None, None],
    ["apple", "", "pear", "plum"], ["(A) first", "B second", "C.", "D"], ["左", "右", "上", "下"],
]  # fmt: skip


def test_mmbench(lmms, fixtures_dir, tmp_path):
    features, docs = fixture_rows(fixtures_dir, "mmbench", "dev", "en")
    image = image_of(docs)
    categories = ["image_topic", "future_prediction", "ocr", "attribute_recognition"]
    for q, options in enumerate(MMBENCH_OPTIONS):
        present = [k for k, o in enumerate(options) if o not in (None, "nan", "")] or [0]
        answer = present[q % len(present)]
        copies = (q % 3) + 1 if q != 4 else 0  # circular copies: rotations of the non-missing options
        for c in range(copies + 1):
            rotated = list(options)
            for k, slot in enumerate(present):
                rotated[slot] = options[present[(k + c) % len(present)]]
            letter = "ABCD"[present[(present.index(answer) - c) % len(present)]]
            docs.append({"index": 500 + q + c * 1_000_000, "question": f"Question {q}?",
                         "hint": [None, "nan", "A hint.", ""][q % 4], "answer": letter,
                         **dict(zip("ABCD", rotated)), "category": categories[q % 4], "image": image,
                         "source": "gen", "L2-category": ["perception", "reasoning"][q % 2], "comment": "nan",
                         "split": "dev"})  # fmt: skip
    write_mirror(tmp_path, "en/dev-00000-of-00001.parquet", docs, features)
    docs = read_back(tmp_path, "en/dev-00000-of-00001.parquet")
    rows = vtc_rows("mmbench", tmp_path, "dev")
    m = lmms.mmbench
    evaluator = m.mmbench_evaluator

    def reference(doc, prediction):
        # What `eval_sub_data(..., static_only=True)` decides per row: the prefetch, else the static extraction.
        item = m.mmbench_process_results(doc, [prediction])["gpt_eval_score"]
        choice = evaluator.prefetch_answer(dict(item))
        if not choice:
            choices = sorted(evaluator.build_choices(item))
            choice = lmms.mcq_extract.extract_mcq_answer(item["prediction"], choices=choices)
        return choice or None, float(choice == doc["answer"])

    def ours(record):
        choice = mmbench.extract_choice(record["prediction"], mmbench.scored_options(meta_of(record)))
        return choice, float(choice == record["answers"][0])

    def aggregate(docs_, predictions):
        results = [m.mmbench_process_results(d, [p])["gpt_eval_score"] for d, p in zip(docs_, predictions)]
        overall, per_category, per_l2 = evaluator.eval_result(results, eval_method="static")
        rows_ = [reference(d, p) for d, p in zip(docs_, predictions)]
        metrics = {
            "accuracy": 100 * overall,
            "row_accuracy": 100 * mean(right for _, right in rows_),
            "extracted": 100 * mean(choice is not None for choice, _ in rows_),
        }
        metrics |= {f"accuracy/{k}": 100 * v for k, v in per_category.items()}
        metrics |= {f"accuracy_l2/{k}": 100 * v for k, v in per_l2.items()}
        return metrics

    def bases(doc):
        texts = {k: doc[k] for k in "ABCD" if doc[k] not in (None, "nan", "")}
        wrong = next((k for k in texts if k != doc["answer"]), "E")
        return [doc["answer"], wrong, str(doc[doc["answer"]]), str(texts.get(wrong, "")),
                f"{doc['answer']}. {doc[doc['answer']]}", f"The answer is {wrong}"]  # fmt: skip

    run_benchmark("mmbench", docs, rows, [bases(d) for d in docs], reference, ours, aggregate,
                  lambda d: m.mmbench_doc_to_text(d, task_kwargs(lmms, "mmbench/_default_template_mmbench_en_yaml")))  # fmt: skip


# ------------------------------------------------------------------------------------------------- MMMU

MMMU_MC = [["Monet", "Manet", "Degas", "Renoir"], ["$1,000", "$2,000", "$3,000"], ["yes", "no"],
           ["A", "B", "C", "D", "E"], ["1", "2", "3", "4", "5", "6", "7"], ["the cat", "a cat", "cat"]]  # fmt: skip
MMMU_OPEN = ["12.5", "1,000", "3", "-2", "0.001", "Paris", "a", "x^2", "5 cm", "1e-3", "2.345", "yes"]
MMMU_SUBJECTS = ["Art_Theory", "Math", "Accounting", "Clinical_Medicine", "History", "Computer_Science", "Physics",
                 "Music", "Energy_and_Power", "Psychology"]  # fmt: skip


def test_mmmu(lmms, fixtures_dir, tmp_path):
    features, docs = fixture_rows(fixtures_dir, "mmmu", "validation")
    image = image_of(docs, "image_1")
    n = 0
    for i, options in enumerate(MMMU_MC * 2):
        docs.append(copy.deepcopy(docs[0]) | {"id": f"validation_{MMMU_SUBJECTS[n % 10]}_{100 + n}", "image_1": image,
                    "options": repr(options), "answer": chr(65 + i % len(options)), "question_type": "multiple-choice"})  # fmt: skip
        n += 1
    for answer in MMMU_OPEN:
        docs.append(copy.deepcopy(docs[1]) | {"id": f"validation_{MMMU_SUBJECTS[n % 10]}_{100 + n}", "image_1": image,
                    "options": "[]", "answer": answer, "question_type": "open"})  # fmt: skip
        n += 1
    write_mirror(tmp_path, "data/validation-00000-of-00001.parquet", docs, features)
    docs = read_back(tmp_path, "data/validation-00000-of-00001.parquet")
    rows = vtc_rows("mmmu", tmp_path, "validation")
    m = lmms.mmmu

    def seeded(doc):  # vtc's documented draw, for lmms-eval's `random.choice(all_choices)`
        return types.SimpleNamespace(choice=lambda seq: random.Random(zlib.crc32(doc["id"].encode())).choice(seq))

    def processed(doc, prediction):
        real = lmms.mmmu_mcq.random
        lmms.mmmu_mcq.random = seeded(doc)
        try:
            return m.mmmu_process_results(doc, [prediction])["mmmu_acc"]
        finally:
            lmms.mmmu_mcq.random = real

    def reference(doc, prediction):
        return m.evaluate_mmmu([processed(doc, prediction)])[1]["acc"]

    def aggregate(docs_, predictions):
        results = [processed(d, p) for d, p in zip(docs_, predictions)]
        printed = []
        m.print = printed.append  # mmmu_aggregate_results prints its per-domain / per-subject table
        try:
            overall = m.mmmu_aggregate_results(results)
        finally:
            del m.print
        table = printed[-1]
        metrics = {"accuracy": 100 * overall}
        for key, value in table.items():
            if key.startswith("Overall-") and value["num"]:
                metrics[f"accuracy/{key[len('Overall-'):]}"] = 100 * value["acc"]
            elif key != "Overall" and not key.startswith("Overall-"):
                metrics[f"accuracy/{key}"] = 100 * value["acc"]
        for subject, items in by_key(results, lambda r: r["subdomain"]).items():
            if f"accuracy/{subject}" not in metrics:  # subjects outside MMMU's 30 are not in lmms-eval's table
                metrics[f"accuracy/{subject}"] = 100 * round(m.evaluate_mmmu(items)[1]["acc"], 5)
        return metrics

    def bases(doc):
        if doc["question_type"] == "open":
            return [doc["answer"], "42", f"The answer is {doc['answer']}", f"so x = {doc['answer']}.",
                    f"{doc['answer']}kg", f"x is so \n{doc['answer']}"]  # fmt: skip
        options = eval(doc["options"])  # noqa: S307 - our own literal
        k = ord(doc["answer"]) - 65
        wrong = (k + 1) % len(options)
        return [doc["answer"], chr(65 + wrong), f"I am fairly sure the answer here is {options[k]}",
                f"({doc['answer']})", f"{chr(65 + wrong)}. {options[wrong]}"]  # fmt: skip

    run_benchmark("mmmu", docs, rows, [bases(d) for d in docs], reference,
                  lambda r: float(mmmu.is_correct(r)), aggregate,
                  lambda d: m.mmmu_doc_to_text(d, task_kwargs(lmms, "mmmu/mmmu_val.yaml")))  # fmt: skip


# ------------------------------------------------------------------------------------------------- driver


def run_benchmark(name, docs, rows, bases, reference, ours, aggregate, doc_to_text, own_prefixes=()):
    """Prompts, per-sample results, then per-run aggregates; fails listing the first mismatches and their count."""
    assert len(docs) == len(rows), f"{name}: the loader kept {len(rows)} of {len(docs)} documents"
    rng = random.Random(f"lmms-eval-parity/{name}")
    pools = [prediction_pool(b if isinstance(b, list) else [b], rng) for b in bases]
    bad = Mismatches()
    prompt = get_benchmark(name).prompt
    for i, (doc, row) in enumerate(zip(docs, rows)):
        bad.check(f"{name} doc {i} prompt", doc_to_text(doc), prompt(row))
    prompts = len(bad)
    samples = 0
    for i, (doc, row) in enumerate(zip(docs, rows)):
        for prediction in pools[i][1]:
            samples += 1
            bad.check(f"{name} doc {i} prediction {prediction!r}", reference(doc, prediction),
                      ours(row | {"prediction": prediction}))  # fmt: skip
    per_sample = len(bad) - prompts
    score = get_benchmark(name).score
    for r, (keep, predictions) in enumerate(runs(len(docs), pools, rng)):
        expected = aggregate([docs[i] for i in keep], predictions)
        bad.metrics(f"{name} run {r} ({len(keep)} docs)", expected, score(records_for(rows, keep, predictions)),
                    own_prefixes)  # fmt: skip
    assert samples >= MIN_PREDICTIONS, f"{name}: only {samples} predictions"
    assert not bad, (
        f"{name}: {prompts} of {len(docs)} prompts, {per_sample} of {samples} predictions and "
        f"{len(bad) - prompts - per_sample} aggregates over {RUNS} runs differ from lmms-eval {LMMS_EVAL_VERSION}:\n"
        + "\n".join(bad[:25])
    )
