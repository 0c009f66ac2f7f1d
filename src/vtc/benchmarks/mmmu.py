"""MMMU validation (900 questions, 30 subjects), as lmms-eval's `mmmu_val` task.

Source: `lmms-lab/MMMU`, split `validation`. Columns: `id` ("validation_<Subject>_<n>"), `question`,
`options` (a Python-literal list in a string), `answer` (a letter for multiple-choice, free text for open
questions), `question_type` ("multiple-choice" / "open"), `image_1` ... `image_7`. The family is the subject
parsed from the id.

Images: a question may reference several images (``<image 1>`` ... ``<image 7>``) in its question or
options. lmms-eval passes every referenced image, in order of first reference; our pipeline feeds LLaVA-1.5
exactly one image, so we keep the FIRST referenced image (or `image_1` when none is referenced) and record
`n_images` in meta; questions with ``n_images > 1`` are at a disadvantage and can be filtered on it. The
``<image i>`` placeholders stay in the text, as with lmms-eval's default (`interleaved_format: false`).

Prompt (lmms-eval `construct_prompt`, prompt_type "format"):
multiple-choice: ``{question}\\n(A. opt\\nB. opt ...)\\n\\nAnswer with the option's letter from the given choices directly.``
open:            ``{question}\\n\\nAnswer the question using a single word or phrase.``
max_new_tokens 128, as lmms-eval's mmmu template (the open-answer parser reads key phrases anywhere in the
output, so a shorter cap could change scores).

Scoring follows MMMU's official rules, as lmms-eval uses them:
- multiple-choice: strip ``, . ! ? ; : '`` from the ends, pad with spaces; candidates are letters written
  "(B)", else "B " (a letter followed by a space), else "B."; failing that, when the output is longer than
  5 words, options whose text occurs in it; several candidates -> the one that occurs last; none -> a random
  letter (seeded by the question id, see below).
- open: take the text after the last key phrase ("could be", "so", "is", "thus", "therefore", "final",
  "answer", "result", and "=" in the last sentence) of each sentence, add every number found in it,
  normalise (numbers -> float rounded to 2 places, strings lower-cased; one-character strings padded with
  a space); right if a normalised gold number equals a predicted number or a normalised gold string is a
  substring of a predicted string.
Metrics: accuracy over all questions (micro, lmms-eval's `mmmu_acc`), then per discipline (6 groups, those
with questions) and per subject, each as lmms-eval computes it: per subject the share right, a group's figure the
question-weighted mean of its subjects' shares, rounded to 5 decimals of the fraction (lmms-eval's `mmmu_acc`
is `round(acc, 5)`; vtc reports 100 x that).

Parsing follows lmms-eval 0.7.3 (MMMU's eval_utils.py) to the character: a number is extracted only where a
word boundary follows its integer digits ("3kg" gives no number, "3 kg" gives 3), and a key phrase whose tail
is empty gives way to the next phrase that matches, even a longer one.

Deliberate difference: when no option can be read from a multiple-choice output, lmms-eval (and MMMU) draw a
letter with Python's global `random.choice`, so scores change from run to run; vtc draws from a generator seeded
with the question id (`zlib.crc32(id)`): reproducible, with the same expected value.
"""

from __future__ import annotations

import ast
import random
import re
import zlib
from collections import defaultdict

from vtc.benchmarks import Benchmark, register_benchmark
from vtc.benchmarks._loading import dumps, image_digest, image_value, load_source, meta_of, to_common

MC_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
MAX_IMAGES = 7
DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": (
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": (
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ),
}
_IMAGE_REF = re.compile(r"<image (\d+)>")


def subject_of(question_id: str) -> str:
    """ "validation_Art_Theory_12" -> "Art_Theory"."""
    match = re.match(r"^[^_]+_(.+)_\d+$", question_id)
    return match.group(1) if match else question_id


def parse_options(options) -> list[str]:
    if isinstance(options, str):
        options = ast.literal_eval(options) if options.strip() else []
    return [str(o) for o in options]


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision)

    def convert(row: dict, index: int) -> dict:
        options = parse_options(row.get("options") or "[]")
        text = row["question"] + " " + " ".join(options)
        referenced = list(dict.fromkeys(int(n) for n in _IMAGE_REF.findall(text)))
        present = [i for i in referenced if 1 <= i <= MAX_IMAGES and row.get(f"image_{i}") is not None]
        first = present[0] if present else 1
        image = image_value(row.get(f"image_{first}"))
        return {
            "id": str(row["id"]),
            "image_id": image_digest(image),
            "image": image,
            "question": row["question"],
            "answers": [str(row["answer"])],
            "family": subject_of(str(row["id"])),
            "meta": dumps(
                {
                    "options": options,
                    "question_type": row["question_type"],
                    "image_used": f"image_{first}",
                    "n_images": (
                        len(present)
                        if present
                        else sum(row.get(f"image_{i}") is not None for i in range(1, MAX_IMAGES + 1))
                    ),
                    "img_type": row.get("img_type"),
                    "topic_difficulty": row.get("topic_difficulty"),
                    "subfield": row.get("subfield"),
                }
            ),
        }

    return to_common(ds, convert, desc="mmmu")


def prompt(row: dict) -> str:
    meta = meta_of(row)
    if meta["question_type"] == "multiple-choice":
        options = "\n".join(f"{letter}. {opt}" for letter, opt in zip(_letters(len(meta["options"])), meta["options"]))
        return f"{row['question']}\n{options}\n\n{MC_PROMPT}"
    return f"{row['question']}\n\n{OPEN_PROMPT}"


# ---------------------------------------------------------------------------------------- multiple choice


def parse_multi_choice(response: str, options: list[str], seed: str = "") -> str:
    letters = _letters(len(options))
    by_letter = dict(zip(letters, options))
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "

    candidates = [c for c in letters if f"({c})" in response]
    bracketed = bool(candidates)
    by_content = False
    if not candidates:
        candidates = [c for c in letters if f"{c} " in response]
    if not candidates:
        candidates = [c for c in letters if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, opt in by_letter.items() if opt.lower() in response.lower()]
        by_content = bool(candidates)

    if not candidates:
        return random.Random(zlib.crc32(seed.encode())).choice(letters) if letters else ""
    if len(candidates) == 1:
        return candidates[0]
    if by_content:
        positions = [response.lower().rfind(by_letter[c].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[max(range(len(candidates)), key=lambda i: (positions[i], -i))]


# ------------------------------------------------------------------------------------------- open answers

_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,234,567
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # 12, 3.5, .5
)
_KEY_PHRASES = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _extract_numbers(text: str) -> list[str]:
    return [n for pattern in _NUMBER_PATTERNS for n in pattern.findall(text)]


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_open(text: str) -> list:
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_responses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, sentence in enumerate(sentences):
        phrases = _KEY_PHRASES + (("=",) if i == len(sentences) - 1 else ())
        shortest = None
        for phrase in phrases:
            if phrase in sentence:
                tail = sentence.split(phrase)[-1].strip()
                if not shortest or len(tail) < len(shortest):  # an empty tail is replaced, as in MMMU's code
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    keys = _key_responses(response)
    candidates = list(keys)
    for key in keys:
        candidates.extend(_extract_numbers(key))
    normalised = []
    for candidate in candidates:
        normalised.extend(normalize_open(candidate))
    return list(dict.fromkeys(normalised))


def eval_open(gold: str, predictions: list) -> bool:
    golds = normalize_open(gold)
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def is_correct(record: dict) -> bool:
    meta = meta_of(record)
    gold = record["answers"][0]
    if meta["question_type"] == "multiple-choice":
        return parse_multi_choice(record["prediction"], meta["options"], seed=str(record["id"])) == gold
    return eval_open(gold, parse_open(record["prediction"]))


def _accuracy(by_subject: dict[str, list[bool]], subjects) -> float:
    """lmms-eval's `calculate_ins_level_acc` over `subjects` (each subject's share weighted by its questions),
    rounded as its `mmmu_aggregate_results`, in percent."""
    weighted = total = 0
    for subject in subjects:
        hits = by_subject[subject]
        weighted += sum(hits) / len(hits) * len(hits)
        total += len(hits)
    return 100 * round(weighted / total if total else 0, 5)


def score(records: list[dict]) -> dict[str, float]:
    by_subject: dict[str, list[bool]] = defaultdict(list)  # subjects in order of appearance, as lmms-eval sums
    for record in records:
        by_subject[record["family"]].append(is_correct(record))
    metrics = {"accuracy": _accuracy(by_subject, list(by_subject))}
    for discipline, subjects in DISCIPLINES.items():
        present = [s for s in subjects if s in by_subject]
        if present:
            metrics[f"accuracy/{discipline}"] = _accuracy(by_subject, present)
    metrics |= {f"accuracy/{subject}": _accuracy(by_subject, [subject]) for subject in sorted(by_subject)}
    return metrics


MMMU = register_benchmark(
    Benchmark(
        name="mmmu",
        # lmms-eval now reads lmms-lab-encoder/MMMU (moved 2026-07-30, PR #1416; id not verified).
        default_source="lmms-lab/MMMU",
        default_split="validation",
        load=_load,
        prompt=prompt,
        score=score,
        max_new_tokens=128,
        notes=(
            "MMMU val as lmms-eval `mmmu_val` with MMMU's official answer parsing (random letter, seeded by id, "
            "when none is found). Only the first referenced image is given to the model; meta.n_images > 1 marks "
            "the affected questions."
        ),
    )
)
