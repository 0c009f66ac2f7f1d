"""MME (2,374 yes/no questions, two per image, in 14 subtasks), as lmms-eval's `mme` task.

Source: `lmms-lab/MME`, split `test`; the family is `category`. `question_id` is the image's path and is
shared by the image's two questions (one with answer Yes, one with No).
Prompt: the question without its trailing " Please answer yes or no.", then
``\\nAnswer the question using a single word or phrase.``; max_new_tokens 16.

Answer parsing (lmms-eval `parse_pred_ans`): lower-case, strip, delete every "."; "yes"/"no" as is; a single
character is "yes" if it is "y", "no" if "n", else "other"; otherwise "yes" if the first 4 characters contain
"yes", else "no" if they contain "no", else "other". The gold answer is lower-cased, stripped and loses its "."
too ("No." is "no"); anything but yes/no is refused, as lmms-eval refuses it.

Per subtask: acc = % of questions right, acc+ = % of images with both questions right, score = lmms-eval's
per-subtask figure, the mean over images of (image acc + image acc+) (0-200; = acc + acc+). perception =
lmms-eval's `mme_perception_score`, the sum of the scores of the perception subtasks present (max 2000);
cognition = `mme_cognition_score`, the same over every other subtask (lmms-eval counts any category that is
not one of the 10 perception subtasks as cognition; max 800 on MME's 4); total = perception + cognition (the
"1862" of pruning papers; vtc's own sum, over the sides that have items).

Where lmms-eval reports no figure, vtc reports NaN: a side with no items (lmms-eval computes no metric that
received none), and the score of a subtask, its side and total when one of its images does not have exactly
two questions (lmms-eval refuses those: "MME only supports pairwise evaluation"; a `limit` subsample can cut a
pair). acc and acc+ (vtc's own figures) are still given for such a subtask, acc+ over the questions present.
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
        gold(row["answer"])  # refuses an answer that is not yes/no now, not after generation
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
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def gold(answer: str) -> str:
    label = answer.lower().strip().replace(".", "")
    if label not in ("yes", "no"):
        raise ValueError(f"MME answer {answer!r} is neither yes nor no (lmms-eval refuses it too)")
    return label


def is_correct(prediction: str, answer: str) -> bool:
    return parse_prediction(prediction) == gold(answer)


def _subtask_score(images: dict[str, list[bool]]) -> float:
    """lmms-eval's per-subtask figure; NaN when an image does not have exactly two questions."""
    if any(len(rights) != 2 for rights in images.values()):
        return float("nan")
    total = 0.0
    for rights in images.values():
        total += 100.0 * (sum(rights) == 2) + sum(rights) / len(rights) * 100.0
    return total / len(images)


def score(records: list[dict]) -> dict[str, float]:
    # category -> image -> [right?], categories and images in order of appearance (lmms-eval sums in that order)
    table: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        table[record["family"]][record["image_id"]].append(is_correct(record["prediction"], record["answers"][0]))
    per_category: dict[str, dict[str, float]] = {}
    for category, images in table.items():
        answers = [r for rights in images.values() for r in rights]
        per_category[category] = {
            "acc": pct(sum(answers), len(answers)),
            "acc_plus": pct(sum(all(rights) for rights in images.values()), len(images)),
            "score": _subtask_score(images),
        }
    sides = {"perception": [], "cognition": []}
    for category, values in per_category.items():
        sides["perception" if category in PERCEPTION else "cognition"].append(values["score"])
    side_scores = {side: sum(scores) if scores else float("nan") for side, scores in sides.items()}
    present = [side_scores[side] for side, scores in sides.items() if scores]
    metrics = {"total": sum(present) if present else float("nan"), **side_scores}
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
        limit_whole_images=True,
    )
)
