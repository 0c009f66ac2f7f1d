"""MME (2,374 yes/no questions, two per image, in 14 subtasks), as lmms-eval's `mme` task.

Source: `lmms-lab/MME`, split `test`; the family is `category`. `question_id` is the image's path and is
shared by the image's two questions (one with answer Yes, one with No).
Prompt: the question without its trailing " Please answer yes or no.", then
``\\nAnswer the question using a single word or phrase.``; max_new_tokens 16.

Answer parsing (lmms-eval `parse_pred_ans`): lower-case, strip, delete every "."; "yes"/"no" as is, else
"yes" if the first 4 characters contain "yes", else "no" if they contain "no", else "other".
Per subtask: acc = % of questions right, acc+ = % of images with both questions right, score = acc + acc+
(0-200). Perception = sum of the 10 perception subtask scores (max 2000), cognition = sum of the 4
cognition subtask scores (max 800), total = perception + cognition (the "1862" of pruning papers).
"""

from __future__ import annotations

from collections import defaultdict

from vtc.benchmarks import Benchmark, register_benchmark
from vtc.benchmarks._loading import dumps, image_value, load_source, pct, to_common

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
STRIPPED = " Please answer yes or no."
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def _image_key(category: str, question_id: str) -> str:
    return question_id if question_id.startswith(category + "/") else f"{category}/{question_id}"


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision)
    # Number the questions of each image in dataset order (from the text columns, images not decoded).
    seen: dict[str, int] = defaultdict(int)
    keys, ids = [], []
    for category, question_id in zip(ds["category"], ds["question_id"]):
        key = _image_key(category, str(question_id))
        keys.append(key)
        ids.append(f"{key}#{seen[key]}")
        seen[key] += 1

    def convert(row: dict, index: int) -> dict:
        return {
            "id": ids[index],
            "image_id": keys[index],
            "image": image_value(row["image"]),
            "question": row["question"],
            "answers": [row["answer"]],
            "family": row["category"],
            "meta": dumps({"question_id": str(row["question_id"])}),
        }

    return to_common(ds, convert, desc="mme")


def prompt(row: dict) -> str:
    return row["question"].strip().replace(STRIPPED, "") + POST_PROMPT


def parse_prediction(prediction: str) -> str:
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def is_correct(prediction: str, answer: str) -> bool:
    return parse_prediction(prediction) == answer.strip().lower()


def score(records: list[dict]) -> dict[str, float]:
    # category -> image -> [right?]
    table: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        right = parse_prediction(record["prediction"]) == record["answers"][0].strip().lower()
        table[record["family"]][record["image_id"]].append(right)
    per_category: dict[str, dict[str, float]] = {}
    for category, images in table.items():
        answers = [r for rights in images.values() for r in rights]
        acc = pct(sum(answers), len(answers))
        acc_plus = pct(sum(all(rights) for rights in images.values()), len(images))
        per_category[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(per_category[c]["score"] for c in PERCEPTION if c in per_category)
    cognition = sum(per_category[c]["score"] for c in COGNITION if c in per_category)
    metrics = {"total": perception + cognition, "perception": perception, "cognition": cognition}
    for category in sorted(per_category):
        metrics |= {f"{k}/{category}": v for k, v in per_category[category].items()}
    return metrics


MME = register_benchmark(
    Benchmark(
        name="mme",
        # lmms-eval now reads lmms-lab-encoder/MME (moved 2026-07-30, PR #1416); override in the config.
        default_source="lmms-lab/MME",
        default_split="test",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=16,
        notes=(
            "MME as lmms-eval `mme`: per subtask acc + acc+ (image-level, both questions right); total = "
            "perception (10 subtasks, max 2000) + cognition (4 subtasks, max 800). LLaVA's '1510.7' is "
            "perception only."
        ),
        options={"perception": list(PERCEPTION), "cognition": list(COGNITION)},
    )
)
