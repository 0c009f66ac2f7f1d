"""Snapshots of the exact user text each benchmark puts after the image (lmms-eval's LLaVA-1.5 prompts).

The chat template adds "USER: <image>\\n" before and " ASSISTANT:" after; these strings are what sits
between. Every expected string is written out literally: changing a prompt must change this file.
"""

import pytest

from vtc.benchmarks import get_benchmark

from bench_cases import CASES


@pytest.fixture(scope="module")
def rows(fixtures_dir):
    loaded = {}
    for name, (directory, split, _) in CASES.items():
        ds = get_benchmark(name).load(str(fixtures_dir / directory), split, None)
        loaded[name] = ds.remove_columns("image").to_list()
    return loaded


def prompts(name, rows):
    return [get_benchmark(name).prompt(row) for row in rows[name]]


def test_gqa(rows):
    assert prompts("gqa", rows)[0] == "Is the table made of wood?\nAnswer the question using a single word or phrase."


def test_pope(rows):
    assert (
        prompts("pope", rows)[1]
        == "Is there a snowboard in the image?\nAnswer the question using a single word or phrase."
    )


def test_mme_strips_yes_no_instruction(rows):
    assert prompts("mme", rows)[:2] == [
        "Is a c++ code shown in the picture?\nAnswer the question using a single word or phrase.",
        "Is a python code shown in the picture?\nAnswer the question using a single word or phrase.",
    ]


def test_scienceqa_with_and_without_context(rows):
    assert prompts("scienceqa", rows) == [
        "Which of these states is farthest north?\n"
        "A. West Virginia\nB. Louisiana\nC. Arizona\nD. Oklahoma\n"
        "Answer with the option's letter from the given choices directly.",
        "Context: Mona will print her name with care.\n"
        "Which tense does the sentence use?\n"
        "A. past tense\nB. present tense\n"
        "Answer with the option's letter from the given choices directly.",
        "Context: Gina planted seeds.\n"
        "Identify the question that the experiment can best answer.\n"
        "A. Do more seeds sprout?\nB. Does the soil dry?\nC. Is it warm?\n"
        "Answer with the option's letter from the given choices directly.",
    ]


def test_textvqa_default_has_no_ocr_and_capitalizes(rows):
    assert prompts("textvqa", rows)[:2] == [
        "What is the brand of this camera?\nAnswer the question using a single word or phrase.",
        # str.capitalize lower-cases the rest, as lmms-eval's prompt does
        "What does the small white text say about nasa?\nAnswer the question using a single word or phrase.",
    ]


def test_textvqa_ocr(rows):
    assert prompts("textvqa_ocr", rows) == [
        "What is the brand of this camera?\nReference OCR token: MIX, dakota, digital\n"
        "Answer the question using a single word or phrase.",
        "What does the small white text say about nasa?\nReference OCR token: \n"
        "Answer the question using a single word or phrase.",
        "How many items?\nReference OCR token: 2, items\nAnswer the question using a single word or phrase.",
    ]


def test_textvqa_module_switch(rows):
    from vtc.benchmarks import textvqa

    row = rows["textvqa"][2]
    assert textvqa.prompt(row) == "How many items?\nAnswer the question using a single word or phrase."
    assert textvqa.prompt(row, include_ocr=True) == textvqa.prompt_ocr(row)


def test_vqav2(rows):
    assert (
        prompts("vqav2", rows)[1]
        == "How many people are in the picture?\nAnswer the question using a single word or phrase."
    )


def test_mmbench_with_and_without_hint(rows):
    # lmms-eval 0.7.3's text (its sys_prompt "There are several options:", a blank line before the instruction);
    # vtc wrote "Options:" and a single newline before the lmms-eval parity tests
    got = prompts("mmbench", rows)
    assert got[0] == (
        "Which animal is in the image? There are several options:\nA. dog\nB. cat\nC. bird\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert got[3] == (
        "The man is holding an umbrella. What will happen next? There are several options:\n"
        "A. he runs\nB. he sits\nC. he sleeps\nD. he opens it\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert got[4] == (
        "How many apples are there? There are several options:\nA. 3\nB. 4\n\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_seedbench(rows):
    assert prompts("seedbench", rows)[0] == (
        "How many towels are in the image?\nA. One\nB. Two\nC. Three\nD. Four\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_mmmu_multiple_choice_and_open(rows):
    assert prompts("mmmu", rows) == [
        "Which artist painted <image 2>? Compare with <image 1>.\n"
        "A. Monet\nB. Manet\nC. Degas\nD. Renoir\n\n"
        "Answer with the option's letter from the given choices directly.",
        "<image 1> What is the area of the triangle in square units?\n\n"
        "Answer the question using a single word or phrase.",
        "Which option is the net income?\nA. $1,000\nB. $2,000\nC. $3,000\n\n"
        "Answer with the option's letter from the given choices directly.",
    ]


# The chat template shipped with llava-hf/llava-1.5-7b-hf (and -13b-hf), as stored in its processor config.
LLAVA_15_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_string_the_llava_15_model_sees(rows):
    """The whole prompt, through `vtc.models.llava.user_turn` and the llava-hf chat template."""
    from vtc.models.llava import user_turn
    from vtc.models.tiny import build_processor

    processor = build_processor()
    processor.chat_template = LLAVA_15_HF_TEMPLATE
    seen = {name: user_turn(processor, get_benchmark(name).prompt(rows[name][0])) for name in ("gqa", "scienceqa")}
    assert seen["gqa"] == (
        "USER: <image>\nIs the table made of wood?\nAnswer the question using a single word or phrase. ASSISTANT:"
    )
    assert seen["scienceqa"].startswith("USER: <image>\n") and seen["scienceqa"].endswith(
        "Answer with the option's letter from the given choices directly. ASSISTANT:"
    )
