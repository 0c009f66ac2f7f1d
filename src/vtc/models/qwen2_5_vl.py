"""Qwen2.5-VL (`Qwen/Qwen2.5-VL-7B-Instruct`) through `transformers`: load, encode images once, generate from reduced
visual tokens with 3-D rotary positions. The model-family contract is the one of `vtc.models` (ADAPTER, issue 17).

How the model makes visual tokens (transformers 5.23, `modeling_qwen2_5_vl.py`): the image processor resizes each image
to a multiple of 28 pixels per side within [min_pixels, max_pixels] and cuts it into 14-pixel patches, listed 2 × 2
window by 2 × 2 window; the vision tower permutes the windows of 2 × 2 groups for windowed attention (`window_index`),
runs its blocks (window attention except `fullatt_block_indexes`, the last block among them), and the merger turns each
group of 4 patches into one LLM token, restored to row-major order. So an image of H × W pixels gives one view of
(H/28) × (W/28) tokens; the LLM sees them between <|vision_start|> and <|vision_end|> at 3-D positions (t, row, col).

`encode_images` (one `EncodedView` per image, row-major on the merged grid):

- projected: the merger's output, exactly what the model's forward puts in place of the <|image_pad|> tokens;
- features: the mean of the 4 patch features (output of the last vision block, before the merger) of each token;
- keys: the mean of the 4 patches' attention keys in the last block, heads concatenated, *before* the vision rotary
  embedding: rotated keys' dot products depend on the two patches' relative position, so pre-rotary keys are the
  content similarity that key-based merging (VisionZip's contextual tokens) uses on LLaVA's CLIP, whose keys carry no
  rotary either;
- cls_attention: Qwen2.5-VL has no CLS token. The substitute, `PROVIDES["cls_attention"] = "mean_received"`, is the mean
  attention each patch receives from all patch queries of its image in the last vision block (a full-attention block),
  per head, summed over the 4 patches of each merged token, so it sums to 1 over the tokens per head. This is the
  "attention received" importance VisPruner and CDPruner use for Qwen (they pool it with the same 2 × 2 merge). It is
  recomputed from that block's queries and keys (rotary applied) as softmax(q·kᵀ/√d_h), so the tower keeps SDPA.

`generate` never runs the vision tower. Per row it writes the prompt with k <|image_pad|> ids (k = that row's reduced
token count), embeds it, puts the k reduced vectors in place of the pads, builds the M-RoPE position ids (3, B, L) and
decodes greedily with a KV cache, calling the language model with explicit position ids at every step (left padding,
rows stop at EOS and are padded after it). Positions, for a row whose image starts after s text tokens:

- `original`: each token at its source on the merged grid, (t, row, col) = (s, s + row, s + col); a token covering
  several sources gets the rounded mean of their rows and of their columns (halves up, as `llava.source_positions`).
  Text after the image continues at s + max(h, w), as in the UNREDUCED prompt (`get_rope_index`), and decode step j is
  at the prompt's largest position + 1 + j, what the model's cached `rope_deltas` give. With all tokens this is exactly
  `model.generate` (tested).
- `renumbered`: the k tokens are a 1-D run like text, (s + i, s + i, s + i) for i < k, text after them from s + k on.
  With all tokens this is not `model.generate`: it is the language model with 1-D (text-style) positions everywhere,
  i.e. `model.generate(inputs_embeds=..., attention_mask=...)` without `image_grid_thw` (tested). Reference ports
  differ here: FlowCut's Qwen port gives the kept tokens the first k positions of the original image span (a prefix of
  the row-major grid, our reading), which puts unrelated tokens at grid coordinates that are not theirs; a 1-D run
  makes no claim about the grid, and `original` is the option that keeps the geometry.

In-LLM methods (`generate_pruned`, FastV and the others of `vtc.models.inllm`): the prompt is built as for `generate`
with `original` positions (every given token at its source's (t, row, col), the unpruned prompt's M-RoPE ids), and the
decoder loop prunes with those 3-D ids: a plan with `positions: original` keeps each kept token's (t, row, col) and the
decode continues from the unpruned prompt's largest id + 1; `renumbered` gives the sequence after a prune layer a 1-D
run. The loop applies `generation_config.repetition_penalty` as `generate` does, so keeping everything decodes what
`generate` decodes at original positions (tested).

Prompt, as lmms-eval 0.7.3 (`lmms_eval/models/simple/qwen2_5_vl.py`) builds it for Qwen2.5-VL: an explicit system turn
"You are a helpful assistant.", then one user turn with the image first and the question after it, through the
processor's chat template, add_generation_prompt=True:
"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"
"<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n".
lmms-eval's defaults are min_pixels = 256·28·28 and max_pixels = 1605632 (= 2048·28·28), passed to the processor;
here they are the family options `min_pixels`, `max_pixels` (absent: the checkpoint's own preprocessor config). lmms-eval calls `model.generate` with do_sample=False,
which still applies the checkpoint's generation_config.json repetition_penalty (1.05 for the 7B Instruct); `generate`
applies `model.generation_config.repetition_penalty` the same way (over the row's prompt ids and generated ids), so it
decodes what `model.generate` decodes. lmms-eval also pre-resizes images with qwen_vl_utils before the processor; we
let the processor resize (the same smart_resize grid).

Processor: transformers 5.23 cannot build `Qwen2_5_VLProcessor` without torchvision (its video processor needs it, and
the processor's class check fails on a missing one), and the project's environments have no torchvision. `load_model`
therefore assembles `ImageOnlyProcessor`, the same processor class without a video processor, from the checkpoint's
tokenizer, image processor (`AutoImageProcessor`, PIL backend without torchvision) and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    DynamicCache,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.utils import cached_file
from transformers.vision_utils import get_vision_window_index

from vtc.models import EncodedView, ReducedImage, inllm
from vtc.models.llava import DTYPES, Generation, attention_implementation, decode, generated_lengths, pretrained

# positions: a method that reduces before the LLM keeps each token's own (t, row, col) by default, so that `full` is the
# model as it is and a kept token stays where the image had it (what Qwen ports of pruning methods do).
PROVIDES = {"cls_attention": "mean_received", "encoder_methods": False, "in_llm": True, "positions": "original"}
FAMILY_OPTIONS = ("min_pixels", "max_pixels")
POSITIONS = ("renumbered", "original")
SYSTEM_PROMPT = "You are a helpful assistant."
# queries per chunk when recomputing the last block's attention: bounds the [heads, chunk, n] score tensor
ATTENTION_CHUNK = 1024


class ImageOnlyProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without a video processor (which needs torchvision in transformers 5.23)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return type(None)
        return super().check_argument_for_proper_class(argument_name, argument)


def _checked_options(family_options: dict) -> dict:
    unknown = sorted(set(family_options) - set(FAMILY_OPTIONS))
    if unknown:
        raise ValueError(f"unknown qwen2_5_vl model option(s) {unknown}; allowed: {list(FAMILY_OPTIONS)}")
    options = {key: value for key, value in family_options.items() if value is not None}
    for key, value in options.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"model option {key} must be a positive integer (pixels), got {value!r}")
    if "min_pixels" in options and "max_pixels" in options and options["min_pixels"] > options["max_pixels"]:
        raise ValueError(f"model option min_pixels {options['min_pixels']} exceeds max_pixels {options['max_pixels']}")
    return options


def _chat_template(path: str, revision: str | None, tokenizer) -> str:
    """The processor's chat template: chat_template.jinja (newer snapshots) or chat_template.json (the 7B's), else the
    tokenizer's."""
    for name in ("chat_template.jinja", "chat_template.json"):
        file = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        if file is not None:
            text = Path(file).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise ValueError(f"{path} has no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")


def load_processor(path: str, revision: str | None = None, trust_remote_code: bool = False, **family_options):
    """`ImageOnlyProcessor` from a hub id or directory, its image processor bounded by min_pixels / max_pixels."""
    options = _checked_options(family_options)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code, **options
    )
    return ImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_chat_template(path, revision, tokenizer)
    )


def load_model(
    path: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    **family_options,
):
    """Model and processor from a hub id or a local directory, ready for inference. family_options: min_pixels,
    max_pixels (the image processor's resolution bounds; absent: the checkpoint's)."""
    if dtype not in DTYPES:  # before the processor, so that a bad dtype costs nothing
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    processor = load_processor(path, revision, trust_remote_code, **family_options)  # checks options before loading
    model = pretrained(
        Qwen2_5_VLForConditionalGeneration, path, revision, dtype, device, attn_implementation, trust_remote_code
    )
    return model, processor


def load_from_config(model_cfg: dict):
    """`load_model` with a `models.<name>` entry of config.yaml (family options: min_pixels, max_pixels)."""
    options = config_options(model_cfg)
    return load_model(
        model_cfg["path"],
        model_cfg.get("revision"),
        model_cfg["dtype"],
        model_cfg["device"],
        model_cfg["attn_implementation"],
        model_cfg.get("trust_remote_code", False),
        **options,
    )


def config_options(model_cfg: dict) -> dict:
    """The family options a `models.<name>` entry sets (null: the checkpoint's own)."""
    return {key: model_cfg[key] for key in FAMILY_OPTIONS if model_cfg.get(key) is not None}


def processor_from_config(model_cfg: dict):
    """The processor of a `models.<name>` entry, without the weights (the encode cache's key)."""
    return load_processor(
        model_cfg["path"], model_cfg.get("revision"), model_cfg.get("trust_remote_code", False), **config_options(model_cfg)
    )


def pixel_bounds(processor) -> dict:
    """The image processor's resolution bounds {min_pixels, max_pixels}."""
    size = processor.image_processor.size
    return {"min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"])}


def _check_bounds(processor, model_cfg: dict) -> None:
    bounds = pixel_bounds(processor)
    for key in FAMILY_OPTIONS:
        if model_cfg.get(key) is not None and model_cfg[key] != bounds[key]:
            raise ValueError(
                f"model option {key} is {model_cfg[key]} but the processor was loaded with {bounds[key]}; "
                "load it with load_from_config(model_cfg)"
            )


def _last_block(model) -> torch.nn.Module:
    visual = model.model.visual
    last = len(visual.blocks) - 1
    if last not in visual.fullatt_block_indexes:
        raise NotImplementedError(
            f"the mean_received attention needs a full-attention last vision block; block {last} is windowed "
            f"(fullatt_block_indexes {list(visual.fullatt_block_indexes)})"
        )
    return visual.blocks[last]


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention each of P keys receives from all P queries: q, k [heads, P, d] → [heads, P], sums to 1 per head.

    softmax(q·kᵀ·scale) over the keys, averaged over the queries, in chunks of queries so that the score tensor stays
    [heads, ATTENTION_CHUNK, P] (P is 4 × the token count, up to ~8k patches at lmms-eval's max_pixels)."""
    received = q.new_zeros(q.shape[0], k.shape[1], dtype=torch.float32)
    for start in range(0, q.shape[1], ATTENTION_CHUNK):
        scores = q[:, start : start + ATTENTION_CHUNK].float() @ k.float().transpose(-1, -2) * scale
        received += scores.softmax(dim=-1).sum(dim=1)
    return received / q.shape[1]


@torch.no_grad()
def encode_patch_groups(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """Runs the vision tower once on a batch of images: per image, what `encode_images` pools, before pooling.

    Returns (projected, groups, keys, received): lists over images of projected [n, D] (the merger's output, as the
    model's forward feeds the LLM), groups [n, 4, C] (last block's output, the 4 patches of each token), keys [n, 4, C]
    (last block's pre-rotary keys) and received [heads, n, 4] (mean attention received, see `received_attention`),
    all row-major on the merged grid (the tower's window permutation undone). n = h·w of that image's merged grid.
    """
    visual = model.model.visual
    block = _last_block(model)
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    hook = block.attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        output = model.model.get_image_features(pixel_values.to(model.device, visual.dtype), image_grid_thw=grid_thw)
    finally:
        hook.remove()
    unit = visual.spatial_merge_size**2
    window_index, _ = get_vision_window_index(
        grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
    )
    restore = torch.argsort(window_index.to(pixel_values.device))

    def grouped(x: torch.Tensor) -> torch.Tensor:  # [P, ...] in window order → [P / unit, unit, ...] row-major
        return x.reshape(x.shape[0] // unit, unit, *x.shape[1:])[restore.to(x.device)]

    attention = block.attn
    hidden = captured["hidden"]
    q, k, _ = attention.qkv(hidden).reshape(hidden.shape[0], 3, attention.num_heads, -1).unbind(1)
    cos, sin = captured["rope"]
    q_rot, k_rot = apply_rotary_pos_emb_vision(q, k, cos, sin)
    counts = (grid_thw.prod(-1) // unit).tolist()
    groups = grouped(output.last_hidden_state).split(counts)
    keys = grouped(k.flatten(1)).split(counts)
    q_rot, k_rot = grouped(q_rot).split(counts), grouped(k_rot).split(counts)
    received = []
    for q_image, k_image in zip(q_rot, k_rot):
        n = q_image.shape[0]
        per_patch = received_attention(q_image.flatten(0, 1).transpose(0, 1), k_image.flatten(0, 1).transpose(0, 1),
                                       attention.scaling)  # fmt: skip
        received.append(per_patch.view(-1, n, unit))
    return list(output.pooler_output), list(groups), list(keys), received


@torch.no_grad()
def encode_images(model, processor, images: list, model_cfg: dict) -> list[list[EncodedView]]:
    """Per image its one view (`EncodedView`): projected [n, D], features [n, C], cls_attention [heads, n] (the
    mean_received substitute, float32), keys [n, C], grid (h, w) = the merged grid, n = h·w."""
    _check_bounds(processor, model_cfg)
    inputs = processor.image_processor(images=images, return_tensors="pt")
    grid_thw = inputs["image_grid_thw"].to(model.device)
    if not bool((grid_thw[:, 0] == 1).all()):
        raise ValueError(f"still images have one temporal patch, got image_grid_thw {grid_thw.tolist()}")
    projected, groups, keys, received = encode_patch_groups(model, inputs["pixel_values"], grid_thw)
    merge = model.model.visual.spatial_merge_size
    views = []
    for (_, h, w), p, g, k, r in zip(grid_thw.tolist(), projected, groups, keys, received):
        views.append(
            [
                EncodedView(
                    projected=p,
                    features=g.float().mean(dim=1).to(g.dtype),
                    cls_attention=r.sum(dim=-1),
                    keys=k.float().mean(dim=1).to(k.dtype),
                    grid=(h // merge, w // merge),
                )
            ]
        )
    return views


def user_turn(processor, text: str) -> str:
    """The prompt for one image and one question as lmms-eval builds it for Qwen2.5-VL: system turn, image, question."""
    conversation = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
    ]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def source_grid_positions(sources: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[k, N] bool over a row-major grid of width `width` → (row [k], col [k]) int64: each token's source cell, or for
    a token with several sources the mean of their rows and of their columns rounded to nearest, halves up."""
    count = sources.sum(dim=-1)
    if not bool((count > 0).all()):
        raise ValueError("every visual token needs at least one source to have an original position")
    index = torch.arange(sources.shape[-1], device=sources.device)
    weights = sources.long()

    def rounded_mean(values: torch.Tensor) -> torch.Tensor:
        total = (weights * values).sum(dim=-1)
        return torch.div(2 * total + count, 2 * count, rounding_mode="floor")

    return rounded_mean(index // width), rounded_mean(index % width)


def image_positions(image: ReducedImage, start: int, positions: str) -> tuple[torch.Tensor, int]:
    """Position ids [3, k] of an image's k tokens whose span starts at `start`, and where the text after it starts."""
    (h, w, k_view), *more = image.views
    if more:
        raise ValueError(f"a Qwen2.5-VL image has one view, got {len(image.views)}")
    k = image.tokens.shape[0]
    if k_view != k or image.sources.shape != (k, h * w):
        raise ValueError(
            f"ReducedImage with {k} tokens, views {image.views} and sources {tuple(image.sources.shape)} is inconsistent"
        )
    if positions == "renumbered":
        return (start + torch.arange(k)).expand(3, k), start + k
    row, col = source_grid_positions(image.sources.cpu(), w)
    return torch.stack([torch.full_like(row, start), start + row, start + col]), start + max(h, w)


def build_inputs(model, processor, prompts: list[str], images: list[ReducedImage], positions: str):
    """Left-padded input_ids, attention_mask [B, L], position ids [3, B, L] and image_mask [B, L] for `generate`."""
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    tokenizer = processor.tokenizer
    pad_image = model.config.image_token_id
    rows = []
    for prompt, image in zip(prompts, images):
        ids = tokenizer(prompt)["input_ids"]
        where = [i for i, token in enumerate(ids) if token == pad_image]
        if len(where) != 1:
            raise ValueError(f"expected exactly one <|image_pad|> in the prompt, found {len(where)}: {prompt!r}")
        start = where[0]
        image_ids, after = image_positions(image, start, positions)
        k = image_ids.shape[1]
        text_after = len(ids) - start - 1
        position = torch.cat(
            [torch.arange(start).expand(3, -1), image_ids, (after + torch.arange(text_after)).expand(3, -1)], dim=1
        )
        rows.append((ids[:start] + [pad_image] * k + ids[start + 1 :], position, start, k))
    length = max(len(r[0]) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    position_ids = torch.zeros(3, batch, length, dtype=torch.long)
    image_mask = torch.zeros(batch, length, dtype=torch.bool)
    for row, (ids, position, start, k) in enumerate(rows):
        offset = length - len(ids)
        input_ids[row, offset:] = torch.tensor(ids)
        attention_mask[row, offset:] = 1
        position_ids[:, row, offset:] = position
        image_mask[row, offset + start : offset + start + k] = True
    device = model.device
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device), image_mask.to(device)


def _embedded(model, input_ids: torch.Tensor, image_mask: torch.Tensor, images: list[ReducedImage]) -> torch.Tensor:
    """inputs_embeds [B, L, D]: the prompt ids embedded, each row's <|image_pad|> positions replaced by its tokens."""
    embeds = model.model.language_model.embed_tokens(input_ids)
    visual = torch.cat([image.tokens for image in images]).to(embeds.device, embeds.dtype)
    return embeds.masked_scatter(image_mask[..., None], visual)


@torch.no_grad()
def generate(
    model, processor, prompts: list[str], images: list[ReducedImage], max_new_tokens: int, positions: str
) -> Generation:
    """Greedy generation for a left-padded batch of prompts (one <|image_pad|> each) with reduced images spliced in.

    ids [B, T] new tokens, pad_token_id after a row's EOS; text_tokens per row = prompt tokens that are not visual
    (system turn, <|vision_start|>, <|vision_end|> and the question included); positions: see the module docstring.
    """
    input_ids, attention_mask, position_ids, image_mask = build_inputs(model, processor, prompts, images, positions)
    language_model = model.model.language_model
    embeds = _embedded(model, input_ids, image_mask, images)

    prompt_lengths = attention_mask.sum(dim=1).tolist()
    config = model.generation_config
    eos = torch.tensor(config.eos_token_id if config.eos_token_id is not None else [], device=embeds.device).flatten()
    pad_token_id = processor.tokenizer.pad_token_id
    # the repetition penalty counts the prompt's ids (model.generate's input_ids), padding excluded
    seen = inllm.seen_tokens(input_ids, attention_mask, model.lm_head.out_features)
    cache = DynamicCache(config=language_model.config)
    hidden = language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    next_position = position_ids.amax(dim=(0, 2)) + 1  # [B]: decode continues after the row's largest position
    unfinished = torch.ones(len(prompts), dtype=torch.bool, device=embeds.device)
    generated = []
    for step in range(max_new_tokens):
        logits = inllm.repetition_penalized(model.lm_head(hidden).float(), seen, config.repetition_penalty)
        token = logits.argmax(dim=-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        generated.append(token)
        seen.scatter_(1, token[:, None], unfinished[:, None])
        unfinished &= ~torch.isin(token, eos)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        hidden = language_model(
            inputs_embeds=language_model.embed_tokens(token[:, None]),
            attention_mask=attention_mask,
            position_ids=(next_position + step).view(1, -1, 1).expand(3, -1, 1),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
    ids = torch.stack(generated, dim=1)
    text_tokens = [int(n) - image.tokens.shape[0] for n, image in zip(prompt_lengths, images)]
    return Generation(ids, text_tokens, generated_lengths(ids, config.eos_token_id))


@torch.no_grad()
def generate_pruned(
    model, processor, prompts: list[str], images: list[ReducedImage], max_new_tokens: int, plan_for
) -> Generation:
    """Greedy answers of an in-LLM method (`vtc.models.inllm`): each image's k tokens spliced in at their original
    3-D positions and pruned inside the LLM by the plan `plan_for(k)` gives (the rows of a batch must share k);
    `Generation.pruned_sources` [B, V, k] which of the row's k tokens each visual token of the last layers covers,
    `plan` the plan. The generation config's repetition penalty is applied as in `generate`."""
    counts = [image.tokens.shape[0] for image in images]
    if len(set(counts)) != 1:
        raise ValueError(f"in-LLM pruning takes a batch of images of one token count, got {counts}")
    plan = plan_for(counts[0])
    input_ids, attention_mask, position_ids, image_mask = build_inputs(model, processor, prompts, images, "original")
    config = model.generation_config
    output = inllm.generate_pruned(
        model,
        _embedded(model, input_ids, image_mask, images),
        attention_mask,
        image_mask,
        plan,
        max_new_tokens,
        eos_token_id=config.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        position_ids=position_ids,
        prompt_ids=input_ids,
        repetition_penalty=config.repetition_penalty,
    )
    text_tokens = [int(n) - k for n, k in zip(attention_mask.sum(dim=1), counts)]
    new_tokens = generated_lengths(output.ids, config.eos_token_id)
    return Generation(output.ids, text_tokens, new_tokens, pruned_sources=output.sources, plan=plan)


def vision_tower(model) -> torch.nn.Module:
    """The module that must not run in `generate` (patch embedding, blocks and merger)."""
    return model.model.visual


def encode_key_extras(model_cfg: dict, processor, model_config) -> dict:
    """What the cached encoder outputs depend on besides the checkpoint: the image processor (resolution bounds,
    normalisation, patch and merge size, and its class: the PIL and torchvision backends resize differently), and
    which block and substitutes `encode_images` reads."""
    image_processor = processor.image_processor
    settings = json.loads(image_processor.to_json_string())
    vision = model_config.vision_config
    return {
        "image_processor_class": type(image_processor).__name__,
        "image_processor": settings,
        **pixel_bounds(processor),
        "feature_block": vision.depth - 1,
        "cls_attention": PROVIDES["cls_attention"],
        "keys": "pre_rotary",
    }
