"""SEED-Bench, image questions only ("SEED-img", 14k of the 19k rows), as lmms-eval's `seedbench` task.

Source: `lmms-lab/SEED-Bench`, split `test`; rows with `data_type == "image"` are kept (the video rows, whose
`image` holds several frames, are dropped); `image` is a list of images, of which an image row has one
(we take the first). The family is the evaluation dimension (`question_type_id` 1-9, named below).
Prompt (lmms-eval `seed_doc_to_text`): ``{question}\\nA. {choice_a}\\nB. {choice_b}\\nC. {choice_c}\\nD. {choice_d}``
then ``\\nAnswer with the option's letter from the given choices directly.``. lmms-eval sets no
max_new_tokens (only ``until: ASSISTANT:`` and `image_aspect_ratio: original`), so its `llava` default 1024
applies; since only the first character is scored and decoding is greedy, we stop at 16 new tokens, which
gives the same scores (1024 is kept in `options["lmms_eval_max_new_tokens"]`).
Score (lmms-eval `seed_process_result`): strip the output and keep its first character; right if it equals
the answer letter (case-insensitive). So "B. cat" is right, "(B)" and "The answer is B" are wrong.
lmms-eval reports `seed_image` (this benchmark's headline), `seed_video` and `seed_all`.
"""

from __future__ import annotations


from vtc.benchmarks import Benchmark, accuracy_by_family, register_benchmark
from vtc.benchmarks._loading import dumps, image_digest, image_value, load_source, meta_of, to_common

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
DIMENSIONS = {
    1: "scene_understanding",
    2: "instance_identity",
    3: "instance_attributes",
    4: "instance_location",
    5: "instances_counting",
    6: "spatial_relation",
    7: "instance_interaction",
    8: "visual_reasoning",
    9: "text_understanding",
}


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision)
    ds = ds.filter(lambda data_type: data_type == "image", input_columns="data_type")

    def convert(row: dict, index: int) -> dict:
        images = row["image"]
        first = images[0] if isinstance(images, list) and images else (None if isinstance(images, list) else images)
        image = image_value(first)
        type_id = int(row["question_type_id"])
        return {
            "id": str(row["question_id"]),
            "image_id": str(row.get("data_id") or image_digest(image)),
            "image": image,
            "question": row["question"],
            "answers": [str(row["answer"]).strip()],
            "family": DIMENSIONS.get(type_id, str(type_id)),
            "meta": dumps(
                {
                    "choices": {k: row[f"choice_{k.lower()}"] for k in "ABCD"},
                    "question_type_id": type_id,
                    "data_id": row.get("data_id"),
                }
            ),
        }

    return to_common(ds, convert, desc="seedbench")


def prompt(row: dict) -> str:
    choices = meta_of(row)["choices"]
    options = "\n".join(f"{k}. {choices[k]}" for k in "ABCD")
    return f"{row['question']}\n{options}{POST_PROMPT}"


def parse_prediction(prediction: str) -> str:
    pred = prediction.strip()
    return pred[:1]


def is_correct(prediction: str, answer: str) -> bool:
    """lmms-eval `seed_aggregation_result`'s comparison."""
    return parse_prediction(prediction).lower().strip() == answer.lower().strip()


def score(records: list[dict]) -> dict[str, float]:
    return accuracy_by_family(records, lambda r: is_correct(r["prediction"], r["answers"][0]))


SEEDBENCH = register_benchmark(
    Benchmark(
        name="seedbench",
        # lmms-eval now reads lmms-lab-encoder/SEED-Bench (moved 2026-07-30, PR #1416; id not verified).
        default_source="lmms-lab/SEED-Bench",
        default_split="test",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=16,
        notes=(
            "SEED-Bench image questions (lmms-eval seed_image); the first character of the stripped output "
            "must be the answer letter. lmms-eval runs original-LLaVA with image_aspect_ratio=original."
        ),
        options={"image_aspect_ratio": "original", "data_type": "image", "lmms_eval_max_new_tokens": 1024},
    )
)
