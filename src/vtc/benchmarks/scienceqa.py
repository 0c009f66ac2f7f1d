"""ScienceQA-IMG (2,017 test questions that come with an image), as lmms-eval's `scienceqa_img` task.

Source: `lmms-lab/ScienceQA`, config `ScienceQA-IMG`, split `test`; rows without an image are dropped (the
IMG config has none; this matters only if the `ScienceQA-FULL` config is pointed at). `answer` is the
index of the right choice; we store its letter. The family is `subject`.
Prompt: ``Context: {hint}\\n`` (only when the hint is non-empty), then ``{question}\\nA. ...\\nB. ...``,
then ``\\nAnswer with the option's letter from the given choices directly.``; max_new_tokens 16. lmms-eval
also sets `image_aspect_ratio: original` for the original-LLaVA model wrapper (kept in `options`).

Score (lmms-eval `sqa_process_results`, itself LLaVA's rule): right when the stripped output, lower-cased, is
the letter, or when it starts with an upper-case letter followed by "." ("B. cat") and that letter is right.
Anything else ("(B)", "The answer is B") is wrong.
"""

from __future__ import annotations


from vtc.benchmarks import Benchmark, accuracy_by_family, register_benchmark
from vtc.benchmarks._loading import (
    dumps,
    image_digest,
    image_value,
    load_source,
    meta_of,
    to_common,
    undecode_images,
)

CONFIG = "ScienceQA-IMG"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def _letter(i: int) -> str:
    return chr(ord("A") + i)


def _has_image(image) -> bool:
    return image is not None and bool(image.get("bytes") or image.get("path"))


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision, CONFIG)
    # Keep the original row number as the id; drop image-less rows without decoding any image.
    ds = ds.add_column("_row", list(range(len(ds))))
    ds = undecode_images(ds)
    ds = ds.filter(_has_image, input_columns="image")

    def convert(row: dict, index: int) -> dict:
        image = image_value(row["image"])
        return {
            "id": f"sqa-{split}-{row['_row']}",
            "image_id": image_digest(image),
            "image": image,
            "question": row["question"],
            "answers": [_letter(int(row["answer"]))],
            "family": row.get("subject") or "",
            "meta": dumps(
                {
                    "choices": list(row["choices"]),
                    "hint": row.get("hint") or "",
                    "answer_index": int(row["answer"]),
                    "grade": row.get("grade"),
                    "subject": row.get("subject"),
                    "topic": row.get("topic"),
                    "category": row.get("category"),
                    "skill": row.get("skill"),
                }
            ),
        }

    return to_common(ds, convert, desc="scienceqa")


def prompt(row: dict) -> str:
    meta = meta_of(row)
    context = f"Context: {meta['hint']}\n" if meta.get("hint") else ""
    choices = "\n".join(f"{_letter(i)}. {choice}" for i, choice in enumerate(meta["choices"]))
    return f"{context}{row['question']}\n{choices}{POST_PROMPT}"


def is_correct(prediction: str, letter: str) -> bool:
    target = letter.strip().lower()
    pred = prediction.strip()
    if pred.lower() == target:
        return True
    if len(pred) >= 2 and pred[0].isupper() and pred[1] == ".":
        return pred[0].lower() == target
    return False


def score(records: list[dict]) -> dict[str, float]:
    return accuracy_by_family(records, lambda r: is_correct(r["prediction"], r["answers"][0]))


SCIENCEQA = register_benchmark(
    Benchmark(
        name="scienceqa",
        # lmms-eval now reads lmms-lab-encoder/ScienceQA (moved 2026-07-30, PR #1416); override in the config.
        default_source="lmms-lab/ScienceQA",
        default_split="test",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=16,
        notes=(
            "ScienceQA-IMG test as lmms-eval `scienceqa_img` (LLaVA's single-pred rule: the bare letter or "
            "'X. ...'); lmms-eval runs original-LLaVA with image_aspect_ratio=original here."
        ),
        options={"config": CONFIG, "image_aspect_ratio": "original"},
    )
)
