"""VQAv2 validation (214,354 questions, 10 human answers each), as lmms-eval's `vqav2_val` task.

Source: `lmms-lab/VQAv2`, split `validation` (`testdev` / `test` exist but have no public answers: papers'
test-dev numbers come from EvalAI submissions, which this benchmark does not do). The family is
`answer_type` (yes/no, number, other).
Prompt: ``{question}\\nAnswer the question using a single word or phrase.``; max_new_tokens 16.
Score: VQA accuracy as lmms-eval 0.7.3's `vqav2_process_results` (`vqa_eval.vqa_accuracy`, mode "vqav2"):
prediction and the 10 human answers alike get whitespace, punctuation and digit/article/contraction
processing (not the full EvalAI answer processing: no lower-casing before the punctuation step, no "'s"
split); accuracy = mean over the 10 leave-one-out subsets of min(1, #matching humans / 3). Percentages,
overall (lmms-eval's `exact_match`) and per answer type (vtc's breakdown of the same per-sample scores).
"""

from __future__ import annotations

from collections import defaultdict

from vtc.benchmarks import Benchmark, register_benchmark
from vtc.benchmarks._loading import dumps, image_value, load_source, to_common
from vtc.benchmarks.vqa_eval import vqa_accuracy

POST_PROMPT = "\nAnswer the question using a single word or phrase."


def _answer_text(answer) -> str:
    return answer["answer"] if isinstance(answer, dict) else str(answer)


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision)

    def convert(row: dict, index: int) -> dict:
        return {
            "id": str(row["question_id"]),
            "image_id": str(row["image_id"]),
            "image": image_value(row["image"]),
            "question": row["question"],
            "answers": [_answer_text(a) for a in (row.get("answers") or [])],
            "family": row.get("answer_type") or "",
            "meta": dumps(
                {
                    "question_id": row["question_id"],
                    "question_type": row.get("question_type"),
                    "multiple_choice_answer": row.get("multiple_choice_answer"),
                }
            ),
        }

    return to_common(ds, convert, desc="vqav2")


def prompt(row: dict) -> str:
    return row["question"] + POST_PROMPT


def score(records: list[dict]) -> dict[str, float]:
    by_family: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_family[record["family"]].append(vqa_accuracy(record["prediction"], list(record["answers"]), mode="vqav2"))
    accs = [a for family in by_family.values() for a in family]
    metrics = {"accuracy": 100 * sum(accs) / len(accs) if accs else 0.0}
    metrics |= {f"accuracy/{family}": 100 * sum(a) / len(a) for family, a in sorted(by_family.items())}
    return metrics


VQAV2 = register_benchmark(
    Benchmark(
        name="vqav2",
        # lmms-eval now reads lmms-lab-encoder/VQAv2 (moved 2026-07-30, PR #1416); override in the config.
        default_source="lmms-lab/VQAv2",
        default_split="validation",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=16,
        notes=(
            "VQAv2 val as lmms-eval `vqav2_val`, scored locally with the official VQA accuracy (papers' 78.5 "
            "for LLaVA-1.5-7B is test-dev via EvalAI, not comparable)."
        ),
    )
)
