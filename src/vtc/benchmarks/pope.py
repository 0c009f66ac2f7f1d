"""POPE (object hallucination; 3 x 3,000 yes/no questions on COCO val2014), as lmms-eval's `pope` task.

Source: `lmms-lab/POPE` (config `default`), split `test`; `category` in {adversarial, popular, random} is the
family. Prompt: ``{question}\\nAnswer the question using a single word or phrase.``; max_new_tokens 128.

Scoring, two parsings of the output:

- lmms-eval (headline): ``prediction.lower().strip()`` must equal ``"yes"`` or ``"no"`` exactly; anything
  else ("Yes.", "yes, there is") is simply wrong, and is neither a positive nor a negative prediction:
  precision = TP / (TP + FP) counts predictions equal to "yes", recall = TP / (TP + FN) counts
  ground-truth-yes rows predicted exactly "no" as FN (unparsed rows fall out of both).
- LLaVA's `eval_pope.py` (``llava/*``): keep the first sentence (up to the first "."), delete commas, and
  the answer is "no" if one of the words is ``no``/``not``/``No``, otherwise "yes".

Metrics are reported pooled over the 9,000 rows (what lmms-eval's `pope` reports) and per category (what its
`pope_adv` / `pope_pop` / `pope_random` report); ``f1_mean`` (the mean F1 over the three categories, the
number LLaVA and the pruning papers report) comes first. All values are percentages.

``yes_ratio`` is lmms-eval's `pope_yes_ratio`: the share of rows whose *ground truth* is "yes" (it does not
depend on the model; 50 on POPE). The share of rows *predicted* "yes", a hallucination indicator, is vtc's own
``pred_yes_ratio``. LLaVA's eval_pope.py prints that predicted share under the name "yes_ratio"; vtc reports it
as ``llava/pred_yes_ratio`` so that each name means one thing (``llava/yes_ratio`` is the ground-truth share).
"""

from __future__ import annotations

from collections import defaultdict

from vtc.benchmarks import Benchmark, register_benchmark
from vtc.benchmarks._loading import dumps, image_value, load_source, pct, to_common

CATEGORIES = ("adversarial", "popular", "random")
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision)

    def convert(row: dict, index: int) -> dict:
        return {
            "id": f"{row['category']}/{row['question_id']}",
            "image_id": str(row["image_source"]),
            "image": image_value(row["image"]),
            "question": row["question"],
            "answers": [row["answer"].strip().lower()],
            "family": row["category"],
            "meta": dumps({"question_id": str(row["question_id"]), "source_id": str(row.get("id"))}),
        }

    return to_common(ds, convert, desc="pope")


def prompt(row: dict) -> str:
    return row["question"] + POST_PROMPT


def parse_lmms_eval(prediction: str) -> str:
    """``yes`` / ``no`` when the whole output is exactly that (case-insensitive), else the output itself."""
    return prediction.lower().strip()


def parse_llava(prediction: str) -> str:
    """LLaVA eval_pope.py: "no" if the first sentence contains the word no/not, else "yes"."""
    text = prediction
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def binary_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """(parsed prediction, ground truth) pairs -> accuracy, precision, recall, f1, yes_ratio (ground truth),
    pred_yes_ratio (percentages), as lmms-eval's `pope_aggregate_*` functions."""
    tp = sum(1 for p, g in pairs if g == "yes" and p == "yes")
    fp = sum(1 for p, g in pairs if g == "no" and p == "yes")
    fn = sum(1 for p, g in pairs if g == "yes" and p == "no")
    correct = sum(1 for p, g in pairs if p == g)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": pct(correct, len(pairs)),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": pct(sum(1 for _, g in pairs if g == "yes"), sum(1 for _, g in pairs if g in ("yes", "no"))),
        "pred_yes_ratio": pct(sum(1 for p, _ in pairs if p == "yes"), len(pairs)),
    }


def score(records: list[dict]) -> dict[str, float]:
    parsers = {"": parse_lmms_eval, "llava/": parse_llava}
    metrics: dict[str, float] = {}
    results: dict[str, dict] = {}
    for prefix, parse in parsers.items():
        by_category: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for record in records:
            by_category[record["family"]].append((parse(record["prediction"]), record["answers"][0].lower()))
        pooled = binary_metrics([pair for pairs in by_category.values() for pair in pairs])
        per_category = {c: binary_metrics(pairs) for c, pairs in sorted(by_category.items())}
        results[prefix] = {"pooled": pooled, "per_category": per_category}
    for prefix in parsers:
        per_category = results[prefix]["per_category"]
        metrics[f"{prefix}f1_mean"] = sum(m["f1"] for m in per_category.values()) / max(1, len(per_category))
        metrics[f"{prefix}accuracy_mean"] = sum(m["accuracy"] for m in per_category.values()) / max(
            1, len(per_category)
        )
        metrics |= {f"{prefix}{k}": v for k, v in results[prefix]["pooled"].items()}
        for category, values in per_category.items():
            metrics |= {f"{prefix}{k}/{category}": v for k, v in values.items()}
    return metrics


POPE = register_benchmark(
    Benchmark(
        name="pope",
        # lmms-eval now reads lmms-lab-encoder/POPE (moved 2026-07-30, PR #1416); override in the config.
        default_source="lmms-lab/POPE",
        default_split="test",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=128,
        notes=(
            "POPE as lmms-eval `pope` (exact 'yes'/'no' match; pooled metrics are lmms-eval's). Headline "
            "f1_mean = mean F1 over adversarial/popular/random, as LLaVA/pruning papers report; llava/* = "
            "same metrics with LLaVA eval_pope.py's lenient yes/no parsing."
        ),
    )
)
