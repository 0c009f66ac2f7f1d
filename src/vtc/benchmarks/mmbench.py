"""MMBench (English) dev, as lmms-eval's `mmbench_en_dev` prompt, scored without any external judge.

Source: `lmms-lab/MMBench`, config `en`, split `dev`. Rows with `index >= 1_000_000` are MMBench's circular
re-orderings of a question (same image, options rotated); `index % 1_000_000` names the original question.
The family is `category` (`L2-category` is kept in meta).

Prompt (lmms-eval `mmbench_doc_to_text`): ``{hint} {question} Options:\\nA. ...\\nB. ...`` (the hint and its
space are left out when the hint is missing / NaN / "nan"; options that are empty / NaN / "nan" are left out), then
``\\nAnswer with the option's letter from the given choices directly.``. lmms-eval generates up to 1024
new tokens; we cap at 128 as LLaVA's own MMBench script does (LLaVA-1.5 answers with a letter; the cap only
bounds batched decoding when a row rambles; 1024 is kept in `options["lmms_eval_max_new_tokens"]`). lmms-eval
runs the original-LLaVA wrapper with `image_aspect_ratio: original` (kept in `options`).

Answer extraction, deterministic and local (no GPT judge, unlike lmms-eval's `mmbench_en_dev`, whose
heuristic stage this reproduces): (1) replace ``.()[],:;!*#{}`` with spaces and split into words; if exactly
one of the row's option letters occurs as a word, that letter ("B", "B. cat", "(B)", "The answer is B");
(2) otherwise, if exactly one option's text occurs (case-insensitively) in the output, that option;
(3) otherwise no answer (counted wrong, where lmms-eval would ask the judge). Known quirk kept: a leading
article "A" ("A cat") reads as option A.

Metrics: ``accuracy`` = % of rows right, every row (circular copies included) counted on its own — this is
NOT MMBench's CircularEval; ``accuracy_circular`` = % of original questions whose every copy present is
right (equals CircularEval only when all rotations of a question are in the scored set); ``extracted`` =
% of outputs an option could be read from; per-category accuracy.
"""

from __future__ import annotations

from collections import defaultdict

from vtc.benchmarks import Benchmark, register_benchmark
from vtc.benchmarks._loading import dumps, image_digest, image_value, load_source, meta_of, pct, to_common

CONFIG = "en"
OPTION_LETTERS = ("A", "B", "C", "D", "E")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
CIRCULAR_OFFSET = 1_000_000
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def _missing(value) -> bool:
    """None / NaN / the string "nan", as lmms-eval's `pd.notna(x) and x != "nan"` tests."""
    return value is None or (isinstance(value, float) and value != value) or str(value) == "nan"


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision, CONFIG)

    def convert(row: dict, index: int) -> dict:
        image = image_value(row["image"])
        # lmms-eval drops falsy options ("" included) and NaN / "nan" ones
        options = {k: str(row[k]) for k in OPTION_LETTERS if k in row and row[k] and not _missing(row[k])}
        hint = row.get("hint")
        return {
            "id": str(row["index"]),
            "image_id": image_digest(image),
            "image": image,
            "question": row["question"],
            "answers": [str(row["answer"])],
            "family": row.get("category") or "",
            "meta": dumps(
                {
                    "index": int(row["index"]),
                    "options": options,
                    "hint": None if _missing(hint) else str(hint),
                    "l2_category": row.get("L2-category"),
                    "source": row.get("source"),
                    "split": row.get("split"),
                }
            ),
        }

    return to_common(ds, convert, desc="mmbench")


def prompt(row: dict) -> str:
    meta = meta_of(row)
    options = "Options:\n" + "\n".join(f"{k}. {v}" for k, v in sorted(meta["options"].items()))
    body = f"{row['question']} {options}"
    if meta.get("hint") is not None:  # an empty hint still adds its space, as in lmms-eval
        body = f"{meta['hint']} {body}"
    return body + POST_PROMPT


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter an output names, or None (see the module docstring)."""
    words = prediction.translate(_SEPARATORS).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        return named[0]
    text = prediction.lower()
    matched = [letter for letter, option in options.items() if str(option).lower() in text]
    if len(matched) == 1:
        return matched[0]
    return None


def score(records: list[dict]) -> dict[str, float]:
    by_family: dict[str, list[bool]] = defaultdict(list)
    by_question: dict[int, list[bool]] = defaultdict(list)
    extracted = 0
    for record in records:
        meta = meta_of(record)
        choice = extract_choice(record["prediction"], meta["options"])
        extracted += choice is not None
        right = choice == record["answers"][0]
        by_family[record["family"]].append(right)
        by_question[int(meta.get("index", record["id"])) % CIRCULAR_OFFSET].append(right)
    hits = [h for family in by_family.values() for h in family]
    metrics = {
        "accuracy": pct(sum(hits), len(hits)),
        "accuracy_circular": pct(sum(all(v) for v in by_question.values()), len(by_question)),
        "extracted": pct(extracted, len(hits)),
    }
    metrics |= {f"accuracy/{family}": pct(sum(h), len(h)) for family, h in sorted(by_family.items())}
    return metrics


MMBENCH = register_benchmark(
    Benchmark(
        name="mmbench",
        # lmms-eval now reads lmms-lab-encoder/MMBench (moved 2026-07-30, PR #1416); override in the config.
        default_source="lmms-lab/MMBench",
        default_split="dev",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=128,
        notes=(
            "MMBench-EN dev with lmms-eval's prompt; local heuristic option extraction, no GPT judge. "
            "Headline accuracy counts every row on its own (no CircularEval); accuracy_circular groups "
            "rotations by index % 1e6."
        ),
        options={"config": CONFIG, "image_aspect_ratio": "original", "lmms_eval_max_new_tokens": 1024},
    )
)
