"""LLaVA through `transformers`: load, encode images once, and generate from reduced visual tokens.

The pipeline splits `LlavaForConditionalGeneration` at the point where visual-token reduction acts:

- `encode` runs the vision tower and projector (`LlavaModel.get_image_features`) and also captures,
  from the feature layer, the CLS→patch attention and the attention keys that reduction methods use.
- `generate_ids` never runs the vision tower: it embeds the prompt, replaces the single `<image>`
  placeholder by the k reduced vectors (no padding back to 576), and calls `model.generate` with
  `inputs_embeds`. With all 576 tokens this is exactly what `generate(pixel_values=...)` does. It also
  counts the text and generated tokens of each row, for the cost model; `decode` turns the ids into answers.
- `generate_ids_original_positions` is the same with each visual token at its position in the unreduced prompt
  (`positions: original`), through `vtc.models.inllm`'s decoder loop, which takes explicit position ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vtc.models import EncodedView, ReducedImage, inllm

# What this family gives the methods: CLS attention of the feature layer; ToMe can run in its CLIP tower; the in-LLM
# decoder loop (vtc.models.inllm) runs its Llama.
PROVIDES = {"cls_attention": "cls", "encoder_methods": True, "in_llm": True, "positions": "renumbered"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    path: str,
    revision: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
):
    """Model and processor from a hub id or a local directory, ready for inference."""
    model = pretrained(LlavaForConditionalGeneration, path, revision, dtype, device, attn_implementation, trust_remote_code)
    processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return model, processor


def pretrained(model_class, path, revision, dtype: str, device: str, attn_implementation: str, trust_remote_code: bool):
    """`model_class.from_pretrained` by hub id (and revision) or directory, in `dtype`, on `device`, in eval mode: how
    every model family loads its weights (safetensors; remote code only where the config opts in)."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = model_class.from_pretrained(
        path,
        revision=revision,
        dtype=DTYPES[dtype],
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return model.to(resolve_device(device)).eval()


def processor_from_config(model_cfg: dict):
    """The processor of a `models.<name>` entry, without the weights (the encode cache's key)."""
    return AutoProcessor.from_pretrained(model_cfg["path"], revision=model_cfg.get("revision"))


def load_from_config(model_cfg: dict):
    """`load_model` with a `models.<name>` entry of config.yaml."""
    return load_model(
        model_cfg["path"], model_cfg.get("revision"), model_cfg["dtype"], model_cfg["device"], model_cfg["attn_implementation"]
    )


def feature_layer_index(model: LlavaForConditionalGeneration) -> int:
    """Index of the encoder layer whose output LLaVA feeds the projector (-2 → the penultimate)."""
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError("several vision feature layers (LLaVA-NeXT style) are not supported yet")
    num_layers = model.config.vision_config.num_hidden_layers
    # hidden_states[0] is the embedding output, so hidden_states[h] is the output of layer h - 1.
    return (num_layers + 1 + layer if layer < 0 else layer) - 1


@dataclass
class Encoded:
    """Per-image encoder outputs for a batch of B images with N patches.

    projected [B, N, D], features [B, N, C], cls_attention [B, heads, N], keys [B, N, C].
    """

    projected: torch.Tensor
    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor


@torch.no_grad()
def encode(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> Encoded:
    """Runs the vision tower and projector once, capturing what reduction methods need.

    The CLS→patch attention is recomputed from the feature layer's queries and keys, softmax(q·kᵀ/√d_h),
    which is what eager attention returns, so the tower can keep a fused kernel (SDPA, FlashAttention)
    that returns no weights.
    """
    output, attention, keys = with_cls_attention(
        model, lambda: model.model.get_image_features(pixel_values=pixel_values.to(model.device, model.dtype))
    )
    projected = torch.stack(list(output.pooler_output))
    features = output.hidden_states[model.config.vision_feature_layer]
    strip_cls = model.config.vision_feature_select_strategy == "default"
    return Encoded(
        projected=projected,
        features=features[:, 1:] if strip_cls else features,
        cls_attention=attention[:, :, 1:] if strip_cls else attention,
        keys=keys[:, 1:] if strip_cls else keys,
    )


def with_cls_attention(model, run_tower):
    """Runs `run_tower()` (a forward of the model's CLIP vision tower) and captures its feature layer's queries and
    keys: (run_tower's output, the CLS query's attention [B, heads, L] over all L positions, CLS first, recomputed as
    softmax(q·kᵀ/√d_h), eager attention's row, so that the tower keeps a fused kernel; the keys [B, L, C])."""
    tower = model.model.vision_tower
    # transformers 5 may hand the CLIP transformer directly, older versions wrap it in `vision_model`.
    encoder = getattr(tower, "vision_model", tower).encoder
    layer = encoder.layers[feature_layer_index(model)].self_attn
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        layer.q_proj.register_forward_hook(lambda m, i, out: captured.__setitem__("q", out)),
        layer.k_proj.register_forward_hook(lambda m, i, out: captured.__setitem__("k", out)),
    ]
    try:
        output = run_tower()
    finally:
        for hook in hooks:
            hook.remove()
    batch, length, width = captured["k"].shape
    heads = layer.num_heads
    q = captured["q"][:, 0].float().view(batch, heads, 1, width // heads)
    k = captured["k"].float().view(batch, length, heads, width // heads).transpose(1, 2)
    return output, (q @ k.transpose(-1, -2) * layer.scale).softmax(dim=-1)[:, :, 0], captured["k"]


def vision_tower(model: LlavaForConditionalGeneration) -> torch.nn.Module:
    return model.model.vision_tower


def encode_key_extras(model_cfg: dict, processor, model_config) -> dict:
    """What the cached tensors depend on besides `vtc.pipeline.encode.encode_key`'s common fields: nothing."""
    return {}


def encode_images(model: LlavaForConditionalGeneration, processor, images: list, model_cfg: dict) -> list[list[EncodedView]]:
    """One view per image: its grid of N patches (`encode`)."""
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    encoded = encode(model, pixel_values)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return [
        [EncodedView(encoded.projected[b], encoded.features[b], encoded.cls_attention[b], encoded.keys[b], (grid, grid))]
        for b in range(len(images))
    ]


def generate(model, processor, prompts: list[str], images: list[ReducedImage], max_new_tokens: int, positions: str):
    """Greedy answers with each image's reduced tokens spliced in at `positions` "renumbered" (`generate_ids`) or
    "original" (`generate_ids_original_positions`)."""
    visual = [image.tokens for image in images]
    if positions == "original":
        sources = [image.sources for image in images]
        return generate_ids_original_positions(model, processor, prompts, visual, sources, max_new_tokens)
    return generate_ids(model, processor, prompts, visual, max_new_tokens)


def generate_pruned(model, processor, prompts: list[str], images: list[ReducedImage], max_new_tokens: int, plan_for):
    """Greedy answers of an in-LLM method: each image's tokens spliced in, pruned inside the LLM by the plan that
    `plan_for(n)` gives for images of n visual tokens (one n per batch); `Generation.pruned_sources` [B, V, k] over the
    row's k given tokens, `Generation.plan` the plan used."""
    counts = {image.tokens.shape[0] for image in images}
    if len(counts) != 1:
        raise ValueError(f"in-LLM pruning takes a batch of images of one token count, got {sorted(counts)}")
    plan = plan_for(counts.pop())
    visual = [image.tokens for image in images]
    generation = generate_ids_pruned(model, processor, prompts, visual, max_new_tokens, plan)
    generation.plan = plan
    return generation


def user_turn(processor, text: str) -> str:
    """The prompt string for one image and one question, through the model's own chat template."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def splice_visual_tokens(
    model: LlavaForConditionalGeneration,
    tokenizer,
    prompts: list[str],
    visual_tokens: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `inputs_embeds` [B, L, D] and `attention_mask` [B, L] for a batch of prompts.

    Each prompt holds one `<image>` placeholder, replaced by that sample's visual tokens [k_b, D]; k may
    differ across samples.
    """
    inputs_embeds, attention_mask, _ = splice_with_image_mask(model, tokenizer, prompts, visual_tokens)
    return inputs_embeds, attention_mask


def splice_with_image_mask(
    model: LlavaForConditionalGeneration,
    tokenizer,
    prompts: list[str],
    visual_tokens: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`splice_visual_tokens`, and image_mask [B, L] bool: the positions the visual tokens landed on."""
    image_token_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    sequences, starts = [], []
    for prompt, visual in zip(prompts, visual_tokens):
        ids = torch.tensor(tokenizer(prompt, add_special_tokens=True)["input_ids"], device=model.device)
        where = (ids == image_token_id).nonzero().flatten().tolist()
        if len(where) != 1:
            raise ValueError(f"expected exactly one image placeholder in the prompt, found {len(where)}: {prompt!r}")
        text = embed(ids)
        visual = visual.to(text.device, text.dtype)
        sequences.append(torch.cat([text[: where[0]], visual, text[where[0] + 1 :]]))
        starts.append(where[0])
    length = max(len(s) for s in sequences)
    width = sequences[0].shape[-1]
    inputs_embeds = sequences[0].new_zeros(len(sequences), length, width)
    attention_mask = torch.zeros(len(sequences), length, dtype=torch.long, device=model.device)
    image_mask = torch.zeros(len(sequences), length, dtype=torch.bool, device=model.device)
    for row, (sequence, start, visual) in enumerate(zip(sequences, starts, visual_tokens)):
        offset = length - len(sequence)
        inputs_embeds[row, offset:] = sequence
        attention_mask[row, offset:] = 1
        image_mask[row, offset + start : offset + start + len(visual)] = True
    return inputs_embeds, attention_mask, image_mask


@dataclass
class Generation:
    """Greedy output for a batch of B prompts.

    ids [B, T]: the new tokens only (`generate` with `inputs_embeds` returns no prompt ids); a row that ended
    before the longest one is padded with pad_token_id after its EOS.
    text_tokens [B]: prompt tokens besides the visual ones (the tokenised prompt minus its `<image>` placeholder).
    new_tokens [B]: tokens each row generated, its EOS included, padding excluded.
    pruned_sources [B, V, n] bool, only where the language model itself pruned: which of the n visual tokens it was
    given each of the V visual tokens of its last layers covers.
    structural_tokens [B]: image tokens the model adds besides the reduced ones (LLaVA-NeXT's row-end newlines), None
    where it adds none.
    """

    ids: torch.Tensor
    text_tokens: list[int]
    new_tokens: list[int]
    pruned_sources: torch.Tensor | None = None
    structural_tokens: list[int] | None = None
    plan: "inllm.Plan | None" = None


def generated_lengths(ids: torch.Tensor, eos_token_id: int | list[int] | None) -> list[int]:
    """Tokens each row of `ids` [B, T] generated: through its first EOS, or all T when it has none (it ran to
    max_new_tokens). Counted by the first EOS, not by padding, because pad_token_id may equal an EOS id or be
    generated legitimately."""
    if eos_token_id is None:
        return [ids.shape[1]] * ids.shape[0]
    eos = torch.tensor(eos_token_id, device=ids.device).flatten()
    is_eos = torch.isin(ids, eos)
    first = is_eos.int().argmax(dim=1) + 1  # argmax returns the first maximum
    return torch.where(is_eos.any(dim=1), first, ids.shape[1]).tolist()


@torch.no_grad()
def generate_ids(
    model: LlavaForConditionalGeneration,
    processor,
    prompts: list[str],
    visual_tokens: list[torch.Tensor],
    max_new_tokens: int,
) -> Generation:
    """Greedy generation for a batch: prompts with reduced visual tokens [k_b, D] spliced in."""
    inputs_embeds, attention_mask = splice_visual_tokens(model, processor.tokenizer, prompts, visual_tokens)
    ids = model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    # the mask covers each row's text and visual tokens: what is not visual is text
    text_tokens = [int(n) - len(v) for n, v in zip(attention_mask.sum(dim=1), visual_tokens)]
    return Generation(ids, text_tokens, generated_lengths(ids, model.generation_config.eos_token_id))


@torch.no_grad()
def generate_ids_pruned(
    model: LlavaForConditionalGeneration,
    processor,
    prompts: list[str],
    visual_tokens: list[torch.Tensor],
    max_new_tokens: int,
    plan,
) -> Generation:
    """`generate_ids` for a method that prunes inside the language model (`vtc.models.inllm`): the prompts get all
    N visual tokens, and the method's `plan` (`inllm.plan`) drops image tokens before its layer K."""
    inputs_embeds, attention_mask, image_mask = splice_with_image_mask(model, processor.tokenizer, prompts, visual_tokens)
    output = inllm.generate_pruned(
        model,
        inputs_embeds,
        attention_mask,
        image_mask,
        plan,
        max_new_tokens,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    text_tokens = [int(n) - len(v) for n, v in zip(attention_mask.sum(dim=1), visual_tokens)]
    new_tokens = generated_lengths(output.ids, model.generation_config.eos_token_id)
    return Generation(output.ids, text_tokens, new_tokens, pruned_sources=output.sources)


def source_positions(sources: torch.Tensor) -> torch.Tensor:
    """[k, N] bool → [k] int64: each visual token's index in the unreduced sequence of N patches.

    A selected token has its patch's index. A merged token (several sources) has no single index: it gets the mean of
    its sources' indices rounded to the nearest integer, halves up (exact integer arithmetic), the centre of its
    patches in the flattened row-major grid, so two merged tokens may share an index.
    """
    count = sources.sum(dim=-1)
    if not bool((count > 0).all()):
        raise ValueError("every visual token needs at least one source patch to have an original position")
    total = (sources.long() * torch.arange(sources.shape[-1], device=sources.device)).sum(dim=-1)
    return torch.div(2 * total + count, 2 * count, rounding_mode="floor")


def original_positions(
    attention_mask: torch.Tensor, image_mask: torch.Tensor, offsets: list[torch.Tensor], num_patches: int
) -> torch.Tensor:
    """Position ids [B, L] that put each visual token where its source patches were in the unreduced prompt.

    attention_mask [B, L] and image_mask [B, L] as `splice_with_image_mask` makes them (left padding, one contiguous
    block of k_b visual tokens per row); offsets: per row [k_b] int64, each token's index among the N patches
    (`source_positions`), in feed order. Positions count from each row's first valid token, as `model.generate`
    does: text before the image 0 … s − 1, visual token i at s + offsets[i], and the text after the image from
    s + N on, as if all N patches were there (FastV's gapped positions).
    """
    positions = inllm.padded_positions(attention_mask.bool())
    counts = image_mask.sum(dim=1, keepdim=True)
    after_image = (image_mask.long().cumsum(dim=1) == counts) & ~image_mask
    positions = positions + after_image * (num_patches - counts)
    starts = positions.gather(1, image_mask.int().argmax(dim=1, keepdim=True))[:, 0]  # argmax: the first True
    positions[image_mask] = torch.cat([start + offset.to(positions.device) for start, offset in zip(starts, offsets)])
    return positions


@torch.no_grad()
def generate_ids_original_positions(
    model: LlavaForConditionalGeneration,
    processor,
    prompts: list[str],
    visual_tokens: list[torch.Tensor],
    sources: list[torch.Tensor],
    max_new_tokens: int,
) -> Generation:
    """`generate_ids` with each visual token [k_b, D] at its original position (`original_positions`) given its
    sources [k_b, N] bool, decoded greedily by `inllm.generate_at_positions` (left padding, stops at EOS)."""
    spliced = splice_with_image_mask(model, processor.tokenizer, prompts, visual_tokens)
    inputs_embeds, attention_mask, image_mask = spliced
    offsets = [source_positions(s) for s in sources]
    positions = original_positions(attention_mask, image_mask, offsets, sources[0].shape[-1])
    eos_token_id = model.generation_config.eos_token_id
    ids = inllm.generate_at_positions(
        model, inputs_embeds, attention_mask, positions, max_new_tokens, eos_token_id, processor.tokenizer.pad_token_id
    )
    text_tokens = [int(n) - len(v) for n, v in zip(attention_mask.sum(dim=1), visual_tokens)]
    return Generation(ids, text_tokens, generated_lengths(ids, eos_token_id))


def decode(processor, ids: torch.Tensor) -> list[str]:
    """Answer strings of generated ids [B, T], special tokens (EOS, padding) dropped."""
    return [text.strip() for text in processor.batch_decode(ids, skip_special_tokens=True)]


def attention_implementation(model: LlavaForConditionalGeneration) -> str:
    """The language model's attention kernel (eager, sdpa, flash_attention_2); the vision tower may use another."""
    return model.config.text_config._attn_implementation
