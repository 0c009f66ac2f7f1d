"""A tiny random LLaVA-NeXT (`llava-hf/llava-v1.6-vicuna-7b-hf` look-alike) built from `transformers` parts.

Same architecture and call path as the real checkpoint: CLIP ViT with a CLS token, features from the penultimate
layer with the CLS dropped (`vision_feature_select_strategy="default"`), anyres preprocessing (a base view resized
to the tower's square input plus crops of the image resized and padded to the best of `image_grid_pinpoints`), the
crops' grids stitched and unpadded, a learned `image_newline` after each high-resolution row, a 2-layer GELU
projector and a Llama decoder, with `LlavaNextProcessor` and the llava-hf Vicuna chat template. Only narrow: 32-pixel
views in 4-pixel patches (8 × 8 = 64 tokens per view), pinpoints giving 1 to 4 crops, a 4-layer decoder and the
word-level tokenizer of `vtc.models.tiny` (the shapes testbed's words). `build(out_dir)` saves it with
`save_pretrained` so that it loads with `from_pretrained` like a hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from vtc.models.tiny import build_tokenizer

IMAGE_SIZE = 32  # the tower's square input, and each crop's side
PATCH = 4
GRID = IMAGE_SIZE // PATCH
# (height, width) resolutions a crop grid may have: 1 × 1, 1 × 2, 2 × 1 and 2 × 2 crops.
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]
# The chat template stored with llava-hf/llava-v1.6-vicuna-7b-hf's processor (the same as llava-1.5's):
# "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_processor() -> LlavaNextProcessor:
    # The PIL image processor: this environment has no torchvision, and both give the same crops.
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer) -> LlavaNextConfig:
    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,  # as the tiny LLaVA-1.5: in-LLM methods' default layers (FastV's K = 2) fit
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=GRID**2,
    )


def build_model(processor: LlavaNextProcessor, seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(build_config(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model


def build(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a random tiny LLaVA-NeXT and its processor to `out_dir` (`from_pretrained` loads it); returns the path."""
    out_dir = Path(out_dir)
    processor = build_processor()
    build_model(processor, seed).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
