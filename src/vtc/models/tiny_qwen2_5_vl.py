"""A tiny random Qwen2.5-VL built from `transformers` parts, for tests without downloads.

Same classes and call path as `Qwen/Qwen2.5-VL-7B-Instruct` (`Qwen2_5_VLForConditionalGeneration`,
`Qwen2_5_VLProcessor` with Qwen's chat template, the Qwen2-VL image processor), only narrow:

- vision tower: 4 blocks of width 32, 7-pixel patches, temporal patch 2, 2 × 2 merger; windowed attention in blocks 0
  and 2, full attention in blocks 1 and 3 (the last block is a full-attention block, as block 31 of the 7B), windows of
  28 pixels = 2 × 2 merged tokens (the 7B: 112 pixels = 4 × 4), so images of a few dozen merged tokens already have
  several windows, some of them ragged at the border;
- image processor: smart_resize to multiples of 14 (= patch 7 × merge 2) between 14·14·4 and 14·14·64 pixels, i.e.
  4 to 64 merged tokens per image;
- language model: 2 Qwen2 decoder layers of width 64, 4 query heads, 2 key/value heads (grouped-query attention as in
  the 7B), M-RoPE sections (2, 3, 3) over the 8 rotary frequencies of a 16-wide head;
- tokenizer: word level over the `shapes` testbed's words and the chat template's, with Qwen's special tokens
  (`<|im_start|>`, `<|im_end|>`, `<|vision_start|>`, `<|image_pad|>`, `<|vision_end|>`, ...). Newlines of the template
  are not tokens here (the whitespace pre-tokenizer drops them); that changes ids, not the call path.

`build(out_dir)` saves model and processor with `save_pretrained`, so `from_pretrained` loads them as a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vtc.data import shapes
from vtc.models.qwen2_5_vl import ImageOnlyProcessor

PATCH = 7
MERGE = 2
FACTOR = PATCH * MERGE
MIN_PIXELS = FACTOR * FACTOR * 4
MAX_PIXELS = FACTOR * FACTOR * 64
# Weights 5 × wider than transformers' default init (0.02): attention is then sharp enough for the rotary positions to
# change the greedy tokens, so position bugs fail the tests instead of vanishing in near-uniform attention.
INIT = 0.1

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", "Picture", "Video", ":"]

# Qwen2.5-VL-Instruct's chat template (the hub's chat_template.json): a default system turn when the conversation has
# none, images as <|vision_start|><|image_pad|><|vision_end|> where they appear in the user content.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = CHAT_WORDS + shapes.question_vocabulary() + shapes.answer_vocabulary()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["<unk>"] + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="left",
    )
    return tokenizer


def build_processor() -> ImageOnlyProcessor:
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    vision = {
        "depth": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "window_size": FACTOR * 2,
        "fullatt_block_indexes": [1, 3],
        "out_hidden_size": 64,
        "initializer_range": INIT,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": INIT,
    }
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_model(processor: ImageOnlyProcessor, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(build_config(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    # the 7B Instruct's generation_config.json has repetition_penalty 1.05, which greedy model.generate applies
    model.generation_config.repetition_penalty = 1.05
    return model.eval()


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a tiny random Qwen2.5-VL and its processor's parts under out_dir (created), as a hub checkpoint has them,
    loadable with `from_pretrained` (`qwen2_5_vl.load_model`). The processor itself cannot `save_pretrained` without a
    video processor, so its tokenizer, image processor and chat template are saved one by one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    build_model(processor, seed).save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out_dir
