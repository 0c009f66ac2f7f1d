"""GQA testdev-balanced (12,578 questions on 398 images), as lmms-eval's `gqa` task.

Source: `lmms-lab/GQA`, questions from config `testdev_balanced_instructions`, images from config
`testdev_balanced_images` (joined on `imageId` -> `id`), split `testdev`.
Prompt: ``{question}\\nAnswer the question using a single word or phrase.``; max_new_tokens 16, greedy.
Score: lmms-eval's `exact_match` metric with ignore_case + ignore_punctuation (`lmms_eval/api/metrics.py`,
`exact_match_hf_evaluate`), applied per sample as lmms-eval's `generate_until` scoring does: the output is
stripped, then output and gold answer each become a one-element numpy string array, are lower-cased and
stripped of every `string.punctuation` character with `np.char`, and compared. No article or number-word
handling. Going through numpy is deliberate, so that its fixed-width strings behave the same: trailing NUL
characters vanish ("yes\\x00" == "yes"), and a character whose lower case is longer ("İ" -> "i̇") is cut to the
array's width. The family is the question's structural type (verify / query / choose / logical / compare);
`accuracy/<family>` is vtc's own breakdown of the same per-sample scores.
"""

from __future__ import annotations

import string

import numpy as np

from vtc.benchmarks import Benchmark, accuracy_by_family, register_benchmark
from vtc.benchmarks._loading import dumps, image_value, load_source, to_common, undecode_images

QUESTIONS_CONFIG = "testdev_balanced_instructions"
IMAGES_CONFIG = "testdev_balanced_images"
POST_PROMPT = "\nAnswer the question using a single word or phrase."
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def _load(source: str, split: str, revision: str | None):
    questions = load_source(source, split, revision, QUESTIONS_CONFIG)
    images = undecode_images(load_source(source, split, revision, IMAGES_CONFIG))
    where = {image_id: i for i, image_id in enumerate(images["id"])}

    def convert(row: dict, index: int) -> dict:
        if row["imageId"] not in where:
            raise KeyError(f"GQA question {row['id']}: image {row['imageId']!r} missing from {IMAGES_CONFIG}")
        types = row.get("types") or {}
        groups = row.get("groups") or {}
        return {
            "id": str(row["id"]),
            "image_id": str(row["imageId"]),
            "image": image_value(images[where[row["imageId"]]]["image"]),
            "question": row["question"],
            "answers": [row["answer"]],
            "family": types.get("structural") or "",
            "meta": dumps(
                {
                    "full_answer": row.get("fullAnswer"),
                    "types": types,
                    "groups": groups,
                }
            ),
        }

    return to_common(questions, convert, desc="gqa")


def prompt(row: dict) -> str:
    return row["question"] + POST_PROMPT


def normalize(text: str) -> np.ndarray:
    """lmms-eval's exact_match normalisation with ignore_case and ignore_punctuation, on a one-element array (its
    width, the text's length, matters: see the module docstring)."""
    return np.char.translate(np.char.lower(np.asarray([text])), table=_PUNCT_TABLE)


def is_correct(prediction: str, answer: str) -> bool:
    return bool((normalize(prediction.strip()) == normalize(answer))[0])


def score(records: list[dict]) -> dict[str, float]:
    return accuracy_by_family(records, lambda r: is_correct(r["prediction"], r["answers"][0]))


GQA = register_benchmark(
    Benchmark(
        name="gqa",
        # lmms-eval now reads lmms-lab-encoder/GQA (moved 2026-07-30, PR #1416); override in the config.
        default_source="lmms-lab/GQA",
        default_split="testdev",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=16,
        notes=(
            "GQA testdev-balanced as lmms-eval `gqa`: exact match after lower-casing and deleting punctuation "
            "(not the official GQA eval.py used by LLaVA's scripts). Families = structural question types."
        ),
        options={"configs": [QUESTIONS_CONFIG, IMAGES_CONFIG]},
    )
)
