"""MMBench (English) dev, as lmms-eval's `mmbench_en_dev` prompt, scored without any external judge.

Source: `lmms-lab/MMBench`, config `en`, split `dev`. Rows with `index >= 1_000_000` are MMBench's circular
re-orderings of a question (same image, options rotated); `index % 1_000_000` names the original question.
The family is `category` (`L2-category` is kept in meta).

Prompt (lmms-eval 0.7.3 `mmbench_doc_to_text`, its `sys_prompt` from mmbench.yaml):
``{hint} {question} There are several options:\\nA. ...\\nB. ...`` (the hint and its space are left out when
the hint is missing / NaN / "nan"; options that are empty / NaN / "nan" are left out; trailing newlines of the
block are stripped), then ``\\n\\nAnswer with the option's letter from the given choices directly.`` (lmms-eval
joins its post-prompt, which starts with a newline, with another one). lmms-eval generates up to 1024
new tokens; we cap at 128 as LLaVA's own MMBench script does (LLaVA-1.5 answers with a letter; the cap only
bounds batched decoding when a row rambles; 1024 is kept in `options["lmms_eval_max_new_tokens"]`). lmms-eval
runs the original-LLaVA wrapper with `image_aspect_ratio: original` (kept in `options`).

Scoring: lmms-eval's `mmbench_en_dev_static` (`MMBench_Evaluator.eval_result(..., eval_method="static")`), the
deterministic path of `mmbench_en_dev`; `mmbench_en_dev` itself asks a GPT judge for the outputs the rules
below cannot read, which vtc does not do (no network, no paid API). Per row, on the stripped output:

1. `can_infer_option`: split on whitespace; if exactly one of the letters A-E is a word, that letter, unless
   "A" is a word of a reply longer than 3 words (then "A" may be the article); otherwise, for each pattern
   "X.", "X,", "X:", "X)", "X).", "(X)", "(X).", ":X", ":X,", ":X.", ":X)", ":X)." in turn, the letter when
   exactly one letter is written so. E counts although MMBench-EN has no option E.
2. `can_infer_text`: the option whose text occurs (lower-cased) in the lower-cased output, when exactly one
   does. The options are the row's A-D values that are not null: the string "nan" (MMBench's empty option) is
   an option text, so "banana" names it, and a missing column reads as "nan".
3. `extract_mcq_answer` (lmms-eval's shared MCQ extractor): candidates "(X)", "X.", "X:", "X)", "X ", an answer
   phrase ("the answer is X", "答案是X", ...) followed by X, a standalone X starting or ending the reply, and,
   only when none of those, X anywhere; the highest-priority format wins, then the last position. Letters
   are the row's option letters (A-H when it has none).

CircularEval: MMBench's copies of a question (`index + k * 1_000_000`, options rotated) are scored together
with their original (`index < 1_000_000`): the original counts as right only when every copy is right.
``accuracy`` (lmms-eval's `gpt_eval_score`, static path) is the share of originals right; copies whose original
is not in the scored set count nowhere; no original at all gives NaN. ``accuracy/<category>`` and
``accuracy_l2/<L2-category>`` are lmms-eval's category figures (over originals). vtc's own: ``row_accuracy``
(every row on its own) and ``extracted`` (% of rows an option letter could be read from).
The options lmms-eval's scorer sees are stored in meta as `scored_options` by `_load`; a dataset prepared
before it existed falls back to the prompt's `options` (the "nan" options are then unknown to step 2): prepare
it again for exact parity.
"""

from __future__ import annotations

from collections import defaultdict

from vtc.benchmarks import Benchmark, register_benchmark
from vtc.benchmarks._loading import dumps, image_digest, image_value, load_source, meta_of, pct, to_common

CONFIG = "en"
OPTION_LETTERS = ("A", "B", "C", "D", "E")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
SYS_PROMPT = "There are several options:"  # lmms-eval's mmbench.yaml metadata.sys_prompt
CIRCULAR_OFFSET = 1_000_000


def _missing(value) -> bool:
    """None / NaN / the string "nan", as lmms-eval's `pd.notna(x) and x != "nan"` tests."""
    return value is None or (isinstance(value, float) and value != value) or str(value) == "nan"


def _load(source: str, split: str, revision: str | None):
    ds = load_source(source, split, revision, CONFIG)

    def convert(row: dict, index: int) -> dict:
        image = image_value(row["image"])
        # lmms-eval drops falsy options ("" included) and NaN / "nan" ones
        options = {k: str(row[k]) for k in OPTION_LETTERS if k in row and row[k] and not _missing(row[k])}
        # What lmms-eval's scorer sees: a missing column is "nan", a null is no option, any string is one.
        scored = {k: row.get(k, "nan") for k in "ABCD"}
        scored = {k: str(v) for k, v in scored.items() if v is not None and not (isinstance(v, float) and v != v)}
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
                    "scored_options": scored,
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
    options = (SYS_PROMPT + "\n" + "".join(f"{k}. {v}\n" for k, v in sorted(meta["options"].items()))).rstrip("\n")
    body = f"{row['question']} {options}"
    if meta.get("hint") is not None:  # an empty hint still adds its space, as in lmms-eval
        body = f"{meta['hint']} {body}"
    return body + "\n" + POST_PROMPT


_PATTERNS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""), (":", ","),
             (":", "."), (":", ")"), (":", ")."))  # fmt: skip
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
# extract_mcq_answer's formats, most trusted first
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}  # fmt: skip


def _letter_word(prediction: str) -> str | None:
    """Step 1 of the module docstring (lmms-eval `can_infer_option`, which also gives up on its judge's failure
    message)."""
    if "Failed to obtain answer via API" in prediction:
        return None
    words = prediction.split()
    named = [c for c in "ABCDE" if c in words]
    if len(named) == 1 and not ("A" in words and len(words) > 3):
        return named[0]
    for prefix, suffix in _PATTERNS:
        named = [c for c in "ABCDE" if prefix + c + suffix in words]
        if len(named) == 1:
            return named[0]
    return None


def _option_text(prediction: str, options: dict[str, str]) -> str | None:
    """Step 2 (lmms-eval `can_infer_text`)."""
    text = prediction.lower()
    named = [letter for letter, option in options.items() if option.lower() in text]
    return named[0] if len(named) == 1 else None


def _mcq_letter(prediction: str, letters: list[str]) -> str | None:
    """Step 3 (lmms-eval `extract_mcq_answer`)."""
    if not prediction.strip():
        return None
    letters = letters or list("ABCDEFGH")
    text = prediction.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    found = []  # (format, position, letter)
    for name, template in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                           ("space", "{} ")):  # fmt: skip
        found += [(name, text.rfind(template.format(c)), c) for c in letters if template.format(c) in text]
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            found += [("phrase", text.find(c, at + len(phrase)), c) for c in letters if c in text[at + len(phrase) :]]
    bare = text.strip()
    found += [("start", 0, c) for c in letters if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())]
    found += [("end", len(text) - 1, c) for c in letters
              if bare.endswith(c) and (len(bare) == 1 or not bare[-2].isalpha())]  # fmt: skip
    if not found:
        found = [("fallback", text.rfind(c), c) for c in letters if c in text]
    if not found:
        return None
    # sorted() is stable, as lmms-eval's sort: among equal (priority, position) the first found wins
    return sorted(found, key=lambda f: (_PRIORITY[f[0]], f[1]), reverse=True)[0][2]


def scored_options(meta: dict) -> dict[str, str]:
    """The options lmms-eval's scorer sees (A-D); rows prepared before `scored_options` existed use `options`."""
    options = meta.get("scored_options", meta.get("options", {}))
    return {k: str(v) for k, v in options.items() if k in "ABCD"}


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter lmms-eval's static path reads from an output, or None (see the module docstring).

    `options`: letter -> text, as `scored_options` gives them."""
    prediction = str(prediction).strip()
    return _letter_word(prediction) or _option_text(prediction, options) or _mcq_letter(prediction, sorted(options))


def score(records: list[dict]) -> dict[str, float]:
    rows = []  # (index, category, l2 category, right?, extracted?)
    for record in records:
        meta = meta_of(record)
        choice = extract_choice(record["prediction"], scored_options(meta))
        index = int(meta.get("index", record["id"]))
        rows.append((index, record["family"], meta.get("l2_category"), choice == record["answers"][0], choice))
    by_question: dict[int, list[bool]] = defaultdict(list)
    for index, _, _, right, _ in rows:
        by_question[index % CIRCULAR_OFFSET].append(right)
    originals = sorted((r for r in rows if r[0] < CIRCULAR_OFFSET), key=lambda r: r[0])
    hits = [(category, l2, all(by_question[index])) for index, category, l2, _, _ in originals]
    metrics = {
        "accuracy": pct(sum(h for _, _, h in hits), len(hits)) if hits else float("nan"),
        "row_accuracy": pct(sum(r[3] for r in rows), len(rows)),
        "extracted": pct(sum(r[4] is not None for r in rows), len(rows)),
    }
    for name, position in (("accuracy", 0), ("accuracy_l2", 1)):
        groups: dict[str, list[bool]] = defaultdict(list)
        for hit in hits:
            if hit[position] is not None:  # pandas' groupby leaves out a null category
                groups[hit[position]].append(hit[2])
        metrics |= {f"{name}/{group}": pct(sum(h), len(h)) for group, h in sorted(groups.items())}
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
            "MMBench-EN dev as lmms-eval `mmbench_en_dev_static` (its rule-based extraction, no GPT judge); "
            "headline accuracy is CircularEval over the originals (a question is right only if every rotated "
            "copy is); row_accuracy counts every row on its own."
        ),
        options={"config": CONFIG, "image_aspect_ratio": "original", "lmms_eval_max_new_tokens": 1024},
    )
)
