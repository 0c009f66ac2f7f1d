"""VQA answer normalisation and accuracy, as lmms-eval 0.7.3's `vqav2_val` and `textvqa_val` compute them.

Shared by `vqav2` and `textvqa`. The rules are those of the VQA evaluation (visualqa.org/evaluation, the
`vqaEval.py` reference evaluator and EvalAI's answer processor, which lmms-eval's `EvalAIAnswerProcessor`
copies), quirks kept on purpose so that numbers agree:

- `tokenize`: lower-case, delete ``,`` and ``?``, split the possessive ``'s`` into ``" 's"``, strip.
- `process_punctuation`: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a
  space in the input (or the input has a digit-comma-digit group), otherwise replaced by a space; then
  periods not followed by a digit are removed. The reference regex is ``(?!<=\\d)(\\.)(?!\\d)`` (a
  mistyped look-behind, so a period after a digit *is* removed too) applied with ``count=re.UNICODE``
  (= 32 replacements at most); both are kept.
- `process_digit_article`: lower-case, split on whitespace, number words ``none, zero ... ten`` -> digits,
  drop the articles ``a an the``, then restore apostrophes of known contractions (``dont`` -> ``don't``).
- `vqa_accuracy`: the 10-choose-9 average of ``min(1, #matching humans / 3)``: for each of the 10 human
  answers, count how many of the *other* 9 equal the prediction.

The two tasks differ in which steps they run (see `vqa_accuracy`). Deliberate difference: lmms-eval's `vqav2`
leaves a human answer out by comparing answer *records* (text, confidence, answer_id), vtc by position; the
hub's answer ids are 1..10 within a question, so both leave out exactly one answer.
"""

from __future__ import annotations

import re
from statistics import mean

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}


# Spellings without (or with misplaced) apostrophes -> the contraction: the reference evaluator's table,
# including its oddities (capitalised keys that never match lower-cased text, "somebody'd" -> "somebodyd").
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd
whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's
wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all
yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd
youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())


def tokenize(text: str) -> str:
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def process_punctuation(text: str) -> str:
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full EvalAI processing of one answer: tokenize, whitespace, punctuation, digits/articles."""
    text = tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def leave_one_out_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over each human answer left out of min(1, #others equal to the prediction / 3), in [0, 1]."""
    if not answers:
        return 0.0
    accs = []
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == prediction)
        accs.append(min(1.0, matches / 3))
    return mean(accs)


def vqa_accuracy(prediction: str, answers: list[str], mode: str = "vqav2") -> float:
    """VQA accuracy of one prediction against the (usually 10) human answers, in [0, 1].

    mode="vqav2" (lmms-eval 0.7.3 `vqav2_process_results`): prediction and every human answer alike get
    newlines/tabs -> spaces, strip, `process_punctuation`, `process_digit_article`, once each, also when all
    humans agree; no `tokenize` (so "he's" and "men's" keep their apostrophe and are not split).
    mode="textvqa" (lmms-eval `textvqa_process_results` / the TextVQA m4c evaluator): prediction and every
    human answer get the full `normalize_answer`.
    """
    if mode == "textvqa":
        process = normalize_answer
    elif mode == "vqav2":
        process = _vqav2_answer
    else:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; allowed: 'vqav2', 'textvqa'")
    return leave_one_out_accuracy(process(prediction), [process(a) for a in answers])


def _vqav2_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))
