"""TextVQA validation (5,000 questions, 10 human answers each), as lmms-eval's `textvqa_val` task.

Source: `lmms-lab/textvqa`, split `validation`. Two registered variants, differing only in the prompt:

- ``textvqa`` (lmms-eval default, `ocr: false`): ``{question.capitalize()}`` then
  ``\\nAnswer the question using a single word or phrase.`` (LLaVA-1.5-7B ~46).
- ``textvqa_ocr`` (LLaVA's own protocol, `llava_textvqa_val_v051_ocr.jsonl`, reproduced as lmms-eval's
  `ocr: true`): ``{question.capitalize()}\\nReference OCR token: {", ".join(ocr_tokens)}`` then the same
  post-prompt (LLaVA-1.5-7B reports 58.2). Note `str.capitalize` lower-cases the rest of the question, as
  lmms-eval does. `prompt(row, include_ocr=None)` falls back to the module-level `INCLUDE_OCR_DEFAULT`; the two
  registered benchmarks fix it.

lmms-eval sets no max_new_tokens for this task (only ``until: ASSISTANT:``), so the model default applies:
1024 in lmms-eval's `llava` wrapper. We cap at 128, as LLaVA's own TextVQA script does: human answers are a few
words, so an output cut at 128 tokens cannot have matched one (our generation is batched, and one rambling
row would otherwise keep the whole batch decoding to 1024). 1024 is kept in
`options["lmms_eval_max_new_tokens"]`. Score: VQA accuracy (`vqa_eval.vqa_accuracy`, mode "textvqa": the full
EvalAI processing on the prediction and on every human answer, 10-choose-9 averaged min(1, n/3)).
"""

from __future__ import annotations

from vtc.benchmarks import Benchmark, register_benchmark
from vtc.benchmarks._loading import dumps, image_value, load_source, meta_of, to_common
from vtc.benchmarks.vqa_eval import vqa_accuracy

POST_PROMPT = "\nAnswer the question using a single word or phrase."
INCLUDE_OCR_DEFAULT = False  # lmms-eval's default; `textvqa_ocr` passes include_ocr=True


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision)

    def convert(row: dict, index: int) -> dict:
        return {
            "id": str(row["question_id"]),
            "image_id": str(row["image_id"]),
            "image": image_value(row["image"]),
            "question": row["question"],
            "answers": list(row["answers"] or []),
            "family": "all",
            "meta": dumps(
                {
                    "question_id": row["question_id"],
                    "ocr_tokens": list(row.get("ocr_tokens") or []),
                    "image_classes": list(row.get("image_classes") or []),
                    "set_name": row.get("set_name"),
                }
            ),
        }

    return to_common(ds, convert, desc="textvqa")


def prompt(row: dict, include_ocr: bool | None = None) -> str:
    include_ocr = INCLUDE_OCR_DEFAULT if include_ocr is None else include_ocr
    text = row["question"].capitalize()
    if include_ocr:
        text += "\nReference OCR token: " + ", ".join(meta_of(row).get("ocr_tokens", []))
    return text + POST_PROMPT


def prompt_plain(row: dict) -> str:
    return prompt(row, include_ocr=False)


def prompt_ocr(row: dict) -> str:
    return prompt(row, include_ocr=True)


def score(records: list[dict]) -> dict[str, float]:
    accs = [vqa_accuracy(r["prediction"], list(r["answers"]), mode="textvqa") for r in records]
    return {"accuracy": 100 * sum(accs) / len(accs) if accs else 0.0}


_COMMON = dict(
    # lmms-eval now reads lmms-lab-encoder/textvqa (moved 2026-07-30, PR #1416); override in the config.
    default_source="lmms-lab/textvqa",
    default_split="validation",
    load=_load,
    score=score,
    max_new_tokens=128,
)

TEXTVQA = register_benchmark(
    Benchmark(
        name="textvqa",
        prompt=prompt_plain,
        notes="TextVQA val as lmms-eval `textvqa_val` (default ocr: false: no OCR tokens in the prompt); VQA accuracy.",
        options={"include_ocr": False, "lmms_eval_max_new_tokens": 1024},
        **_COMMON,
    )
)

TEXTVQA_OCR = register_benchmark(
    Benchmark(
        name="textvqa_ocr",
        prompt=prompt_ocr,
        notes=(
            "TextVQA val with 'Reference OCR token: ...' in the prompt (LLaVA's eval protocol, lmms-eval "
            "ocr: true; the numbers LLaVA-1.5 and most pruning papers report); VQA accuracy."
        ),
        options={"include_ocr": True, "lmms_eval_max_new_tokens": 1024},
        **_COMMON,
    )
)
