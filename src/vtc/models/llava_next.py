"""LLaVA-NeXT (`llava-hf/llava-v1.6-vicuna-7b-hf`) through `transformers`: the model-family adapter of issue 17.

How the model builds its visual tokens (transformers' `LlavaNextModel.get_image_features` / `pack_image_features`):
the image processor makes a *base* view (the whole image resized to the tower's square input) and *crops* (the
image resized to the best of `image_grid_pinpoints`, padded, cut into tower-sized squares). Each goes through the
CLIP tower; the penultimate layer's patch features (CLS dropped) are projected. The base view gives g × g tokens.
The crops' g × g grids are stitched into one (rows·g) × (cols·g) grid and *unpadded* (the rows or columns that
covered the processor's padding are dropped, `unpad_image`), giving an H × W high-resolution grid; the LLM gets the
base tokens, then the high-resolution tokens row by row, each row followed by the learned `image_newline` vector.

What the pipeline sees (`encode_images`): two views per image, reduced independently (methods never see the
newlines):

- view 0, the base view, g × g: projected tokens, penultimate-layer features, CLS→patch attention and keys, exactly
  as `vtc.models.llava.encode` computes them for LLaVA-1.5 (the CLS attention is the softmax row of the feature
  layer with its CLS entry dropped, so it sums to 1 minus the CLS's attention to itself);
- view 1, the high-resolution view, H × W, unpadded exactly as the model does it, without newlines: projected
  tokens, features and keys stitched from the crops; its CLS attention is each crop's own CLS→patch attention,
  first renormalised to sum to 1 over that crop's patches (crops are separate tower passes, each with its own CLS,
  so their rows are only comparable as distributions over their own patches), stitched, unpadded, and renormalised
  to sum to 1 per head over the H·W tokens that remain.

What the model gets back (`generate`): per image, view 0's reduced tokens, then view 1's with newlines re-inserted:
the `image_newline` vector after each view-1 token whose next view-1 token (in feed order) lies in another
high-resolution row, and after view 1's last token. A token's row is that of its source position in view 1's grid
(the rounded mean of its sources' row-major indices, `vtc.models.llava.source_positions`). With nothing reduced this
is the model's own sequence. The newlines are structural: they are not in the budget, and `Generation` reports them
per row in `structural_tokens`. Positions are `renumbered` (consecutive, `model.generate` with `inputs_embeds`) or
`original`: each token where it sat in the unreduced packed sequence (base, then high-resolution rows with their
newlines), a re-inserted newline at the end of its row, the text after the image as in the unreduced prompt
(`vtc.models.inllm.generate_at_positions`).

In-LLM methods (`generate_pruned`): the LLM's image block is the visual sequence above, the reduced tokens *and* the
row-end newlines, as in the model's own sequence; FastV-style methods rank and prune all of its entries (a newline is
a token of the LLM's sequence like any other), so the plan is made for the block length k + newlines and its layer
average counts newlines. The decoder is Llama, run by `vtc.models.inllm` unchanged, at the renumbered (consecutive)
prompt positions as for LLaVA-1.5 (with every token given, they are the unreduced prompt's). `Generation.pruned_sources`
maps the entries the last layers keep back to the row's k reduced tokens (a kept newline covers none).

Not supported (NotImplementedError at load and encode): `vision_feature_select_strategy` other than "default" (the
tower's CLS would be a token) and several `vision_feature_layer`s (LLaVA-OneVision-style concatenation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from vtc.models import EncodedView, ReducedImage, inllm, llava
from vtc.models.llava import (  # the parts LLaVA-NeXT shares with LLaVA-1.5
    Generation,
    attention_implementation,
    decode,
    generated_lengths,
    pretrained,
    processor_from_config,
    source_positions,
    vision_tower,
    with_cls_attention,
)

# The LLM gets the CLS-free feature layer behind a projector (no patch merger): every method that selects or merges
# tokens applies; in-LLM methods run through `vtc.models.inllm` unchanged (the decoder is Llama, under
# `model.model.language_model`), with the newlines inside the image block (`generate_pruned`).
PROVIDES = {"cls_attention": "cls", "encoder_methods": False, "in_llm": True, "positions": "renumbered"}
POSITIONS = ("renumbered", "original")
# Keys of a `models.<name>` entry this family reads; it defines no family options of its own.
CONFIG_KEYS = ("path", "revision", "dtype", "device", "attn_implementation", "trust_remote_code")


def check_supported(config) -> None:
    """Raises NotImplementedError naming the setting of a LLaVA-NeXT config this adapter does not handle."""
    if config.vision_feature_select_strategy != "default":
        raise NotImplementedError(
            f"llava_next: vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not supported "
            "(only 'default', which drops the tower's CLS token)"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise NotImplementedError(
            f"llava_next: several vision_feature_layer ({config.vision_feature_layer!r}) are not supported (one layer)"
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
    """Model and processor from a hub id or a local directory, ready for inference."""
    if family_options:
        raise ValueError(f"llava_next takes no family options, got {sorted(family_options)}")
    model = pretrained(
        LlavaNextForConditionalGeneration, path, revision, dtype, device, attn_implementation, trust_remote_code
    )
    check_supported(model.config)
    processor = AutoProcessor.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return model, processor


def load_from_config(model_cfg: dict):
    """`load_model` with a `models.<name>` entry of config.yaml: its keys in `CONFIG_KEYS` (`family` is the
    caller's)."""
    return load_model(**{key: model_cfg[key] for key in CONFIG_KEYS if key in model_cfg})


def user_turn(processor, text: str) -> str:
    """One image placeholder and the question through the model's own chat template (llava-hf 1.6-vicuna:
    "USER: <image>\\n{text} ASSISTANT:").

    This is the prompt lmms-eval 0.7.3 builds for `--model llava_hf`, which resolves to its chat class
    (`lmms_eval/models/chat/llava_hf.py`): a user turn of the image(s) then the task text
    (`api/task.py::_build_user_turn`) through `processor.apply_chat_template`. Its simple class (`--force_simple`)
    would use the tokenizer's template or a Vicuna fallback with a system prompt instead."""
    return llava.user_turn(processor, text)


def encode_key_extras(model_cfg: dict, processor, model_config) -> dict:
    """What the cached views depend on besides the weights: the image processor (resize backend, sizes, pinpoints,
    normalisation), the pinpoints and feature layer the model packs with."""
    image_processor = processor.image_processor.to_dict()
    return {
        "image_processor": {k: v for k, v in sorted(image_processor.items()) if not k.startswith("_")},
        "image_grid_pinpoints": [list(p) for p in model_config.image_grid_pinpoints],
        "vision_feature_layer": model_config.vision_feature_layer,
        "vision_feature_select_strategy": model_config.vision_feature_select_strategy,
    }


def stitch(crops: torch.Tensor, grid_shape: tuple[int, int], image_size) -> torch.Tensor:
    """The crops' token grids as the model packs them: [rows·cols, g·g, C] (crops row-major, tokens row-major) →
    [H, W, C], stitched into one (rows·g) × (cols·g) grid and unpadded by transformers' own `unpad_image` for the
    image's original size (height, width)."""
    rows, cols = grid_shape
    side = int(round(crops.shape[1] ** 0.5))
    full = crops.reshape(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).reshape(-1, rows * side, cols * side)
    return unpad_image(full, image_size).permute(1, 2, 0)


@torch.no_grad()
def encode_images(model: LlavaNextForConditionalGeneration, processor, images: list, model_cfg: dict | None = None):
    """Per image its two views (`EncodedView`): the base view (g × g) and the unpadded high-resolution view (H × W),
    in one tower pass over all images' base views and crops. The CLS→patch attention is recomputed from the feature
    layer's queries and keys (softmax(q·kᵀ/√d_h), eager attention's row), so the tower keeps a fused kernel."""
    config = model.config
    check_supported(config)
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    processor_pinpoints = [list(p) for p in processor.image_processor.image_grid_pinpoints]
    if processor_pinpoints != pinpoints:
        raise ValueError(
            f"llava_next: the image processor's image_grid_pinpoints {processor_pinpoints} differ from the model "
            f"config's {pinpoints}"
        )
    inputs = processor.image_processor(images, return_tensors="pt")
    image_sizes = inputs["image_sizes"].tolist()
    tile = config.vision_config.image_size
    counts = [image_size_to_num_patches(size, pinpoints, tile) for size in image_sizes]
    # the processor pads every image's stack to the batch's most crops; the model drops that padding the same way
    pixel_values = torch.cat([stack[:count] for stack, count in zip(inputs["pixel_values"], counts)])

    output, attention, keys = with_cls_attention(
        model, lambda: vision_tower(model)(pixel_values.to(model.device, model.dtype), output_hidden_states=True)
    )
    features = output.hidden_states[config.vision_feature_layer][:, 1:]  # [P, g², C], CLS dropped ("default")
    projected = model.model.multi_modal_projector(features)
    heads = attention.shape[1]
    attention, keys = attention[:, :, 1:], keys[:, 1:]  # [P, heads, g²], [P, g², C]
    side = tile // config.vision_config.patch_size

    encoded, start = [], 0
    for size, count in zip(image_sizes, counts):
        crops = slice(start + 1, start + count)
        grid_shape = get_anyres_image_grid_shape(size, pinpoints, tile)
        if count - 1 != grid_shape[0] * grid_shape[1] or count < 2:
            raise ValueError(
                f"llava_next: an image of size {size} gave {count - 1} crops for a {grid_shape} crop grid; "
                f"image_grid_pinpoints {pinpoints} must be multiples of the tower's {tile}-pixel input"
            )
        base = EncodedView(
            projected=projected[start],
            features=features[start],
            cls_attention=attention[start],
            keys=keys[start],
            grid=(side, side),
        )
        hires = [stitch(x[crops], grid_shape, size) for x in (projected, features, keys)]
        crop_attention = attention[crops] / attention[crops].sum(dim=-1, keepdim=True)
        hires_attention = stitch(crop_attention.transpose(1, 2), grid_shape, size)  # [H, W, heads]
        height, width = hires_attention.shape[:2]
        hires_attention = hires_attention.reshape(height * width, heads).T
        high = EncodedView(
            projected=hires[0].reshape(height * width, -1),
            features=hires[1].reshape(height * width, -1),
            cls_attention=hires_attention / hires_attention.sum(dim=-1, keepdim=True),
            keys=hires[2].reshape(height * width, -1),
            grid=(height, width),
        )
        # each tensor its own contiguous storage: slices of the batch would share it (safetensors refuses that)
        encoded.append([_owned(base), _owned(high)])
        start += count
    return encoded


def _owned(view: EncodedView) -> EncodedView:
    fields = ("projected", "features", "cls_attention", "keys")
    copies = {name: getattr(view, name).clone(memory_format=torch.contiguous_format) for name in fields}
    return EncodedView(**copies, grid=view.grid)


def full_image(views: list[EncodedView]) -> ReducedImage:
    """The `ReducedImage` of all of an image's tokens (method `full`): every token its own source."""
    tokens = torch.cat([view.projected for view in views])
    return ReducedImage(
        tokens=tokens,
        sources=torch.eye(len(tokens), dtype=torch.bool, device=tokens.device),
        views=[(*view.grid, len(view.projected)) for view in views],
    )


class _Layout(NamedTuple):
    """Where a reduced image's entries go (`visual_sequence`). k0: view 0's tokens; n0: view 0's grid size; h1, w1:
    view 1's grid; base [k0]: view-0 tokens' source indices; row, col [k1]: each view-1 token's source row and column;
    row_end [k1] bool: a newline follows it; at [k1]: its slot among view 1's entries; end [k1]: the slot of its last
    entry, itself or the newline after it."""

    k0: int
    n0: int
    h1: int
    w1: int
    base: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    row_end: torch.Tensor
    at: torch.Tensor
    end: torch.Tensor


def _layout(image: ReducedImage) -> _Layout:
    """The `_Layout` of a reduced image, its views and sources checked."""
    if len(image.views) != 2:
        raise ValueError(f"llava_next: an image has 2 views (base, high resolution), got {len(image.views)}")
    (h0, w0, k0), (h1, w1, k1) = image.views
    n0, n1 = h0 * w0, h1 * w1
    k = k0 + k1
    if image.tokens.shape[0] != k or tuple(image.sources.shape) != (k, n0 + n1):
        raise ValueError(
            f"llava_next: views {image.views} need tokens [{k}, D] and sources [{k}, {n0 + n1}], got "
            f"{tuple(image.tokens.shape)} and {tuple(image.sources.shape)}"
        )
    sources = image.sources.bool()
    if bool(sources[:k0, n0:].any()) or bool(sources[k0:, :n0].any()):
        raise ValueError("llava_next: a view's reduced tokens must cover tokens of that view only")
    base = source_positions(sources[:k0, :n0])
    position = source_positions(sources[k0:, n0:])
    row, col = torch.div(position, w1, rounding_mode="floor"), position % w1
    row_end = torch.ones_like(row, dtype=torch.bool)
    row_end[:-1] = row[1:] != row[:-1]
    slots = 1 + row_end.long()
    end = slots.cumsum(0) - 1  # where each view-1 token's last slot (itself, or the newline after it) lands
    at = end - row_end.long()
    return _Layout(k0, n0, h1, w1, base, row, col, row_end, at, end)


def token_slots(image: ReducedImage) -> torch.Tensor:
    """[k] int64: where each of the image's k reduced tokens sits in its visual sequence (`visual_sequence`)."""
    layout = _layout(image)
    return torch.cat([torch.arange(layout.k0, device=layout.at.device), layout.k0 + layout.at])


def visual_sequence(model: LlavaNextForConditionalGeneration, image: ReducedImage):
    """What the LLM gets for one reduced image: (sequence [m, D], original [m] int64 each entry's position in the
    unreduced packed sequence, newlines inserted, packed length of the unreduced image).

    m = k + newlines: view 0's tokens, then view 1's with `image_newline` after each token whose next view-1 token
    lies in another row of view 1's grid, and after its last. Each token must have sources, all in its own view."""
    k0, n0, h1, w1, base, row, col, row_end, at, end = _layout(image)
    length = int(row_end.sum()) + len(row)
    tokens = image.tokens
    newline = model.model.image_newline.to(tokens.device, tokens.dtype)
    hires = tokens.new_empty(length, tokens.shape[-1])
    hires[at.to(tokens.device)] = tokens[k0:]
    hires[end[row_end].to(tokens.device)] = newline
    stride = w1 + 1  # a packed high-resolution row: its w1 tokens and its newline
    original = torch.empty(length, dtype=torch.long, device=row.device)
    original[at] = n0 + row * stride + col
    original[end[row_end]] = n0 + row[row_end] * stride + w1
    return (
        torch.cat([tokens[:k0], hires]),
        torch.cat([base.to(original.device), original]),
        int(row_end.sum()),
        n0 + h1 * stride,
    )


def original_positions(
    attention_mask: torch.Tensor, image_mask: torch.Tensor, offsets: list[torch.Tensor], packed: list[int]
) -> torch.Tensor:
    """Position ids [B, L] of a left-padded batch (`llava.splice_with_image_mask`) that put each visual entry at its
    position in the unreduced prompt: text before the image 0 … s − 1, entry i at s + offsets[b][i], the text after
    the image from s + packed[b] on (packed: the row's unreduced image length, newlines included)."""
    positions = inllm.padded_positions(attention_mask.bool())
    counts = image_mask.sum(dim=1, keepdim=True)
    after_image = (image_mask.long().cumsum(dim=1) == counts) & ~image_mask
    total = torch.tensor(packed, device=positions.device)[:, None]
    positions = positions + after_image * (total - counts)
    starts = positions.gather(1, image_mask.int().argmax(dim=1, keepdim=True))[:, 0]  # argmax: the first True
    positions[image_mask] = torch.cat([start + offset.to(positions.device) for start, offset in zip(starts, offsets)])
    return positions


def splice(model: LlavaNextForConditionalGeneration, processor, prompts: list[str], images: list[ReducedImage]):
    """The left-padded prompt batch with each row's visual sequence (`visual_sequence`) in place of its `<image>`:
    (inputs_embeds [B, L, D], attention_mask [B, L], image_mask [B, L] the visual entries newlines included,
    original position ids [B, L], newlines per row)."""
    if len(prompts) != len(images):
        raise ValueError(f"llava_next: {len(prompts)} prompts for {len(images)} images")
    sequences = [visual_sequence(model, image) for image in images]
    inputs_embeds, attention_mask, image_mask = llava.splice_with_image_mask(
        model, processor.tokenizer, prompts, [sequence for sequence, *_ in sequences]
    )
    positions = original_positions(
        attention_mask, image_mask, [offsets for _, offsets, *_ in sequences], [packed for *_, packed in sequences]
    )
    return inputs_embeds, attention_mask, image_mask, positions, [newlines for _, _, newlines, _ in sequences]


@torch.no_grad()
def generate(
    model: LlavaNextForConditionalGeneration,
    processor,
    prompts: list[str],
    images: list[ReducedImage],
    max_new_tokens: int,
    positions: str = "renumbered",
) -> Generation:
    """Greedy generation for a left-padded batch of prompts, each with one `<image>` replaced by its reduced image's
    visual sequence (`visual_sequence`); `positions` "renumbered" (consecutive) or "original" (`original_positions`)."""
    if positions not in POSITIONS:
        raise ValueError(f"llava_next: positions must be one of {POSITIONS}, got {positions!r}")
    inputs_embeds, attention_mask, image_mask, original, newlines = splice(model, processor, prompts, images)
    eos_token_id = model.generation_config.eos_token_id
    pad_token_id = processor.tokenizer.pad_token_id
    if positions == "renumbered":
        ids = model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    else:
        ids = inllm.generate_at_positions(
            model, inputs_embeds, attention_mask, original, max_new_tokens, eos_token_id, pad_token_id
        )
    # the mask covers text and visual entries; the visual ones are the reduced tokens plus the newlines
    text_tokens = (attention_mask.sum(dim=1) - image_mask.sum(dim=1)).tolist()
    return Generation(ids, text_tokens, generated_lengths(ids, eos_token_id), structural_tokens=newlines)


@torch.no_grad()
def generate_pruned(
    model: LlavaNextForConditionalGeneration,
    processor,
    prompts: list[str],
    images: list[ReducedImage],
    max_new_tokens: int,
    plan_for,
) -> Generation:
    """Greedy answers of an in-LLM method (`vtc.models.inllm`): each image's visual sequence (`visual_sequence`, its
    reduced tokens and row-end newlines) spliced in and pruned inside the LLM by the plan `plan_for(m)` gives for an
    image block of m entries (the rows of a batch must share m). `Generation.pruned_sources` [B, V, k]: which of the
    row's k reduced tokens each of the V image entries of the last layers covers (a newline none); `plan` the plan,
    `structural_tokens` the newlines per row."""
    inputs_embeds, attention_mask, image_mask, _, newlines = splice(model, processor, prompts, images)
    lengths = image_mask.sum(dim=1).tolist()
    counts = [image.tokens.shape[0] for image in images]
    if len(set(lengths)) != 1 or len(set(counts)) != 1:
        raise ValueError(
            "llava_next: in-LLM pruning takes a batch whose image blocks have one length (reduced tokens + newlines); "
            f"got blocks of {lengths} entries ({counts} tokens, {newlines} newlines)"
        )
    plan = plan_for(lengths[0])
    eos_token_id = model.generation_config.eos_token_id
    output = inllm.generate_pruned(
        model, inputs_embeds, attention_mask, image_mask, plan, max_new_tokens, eos_token_id,
        processor.tokenizer.pad_token_id,
    )  # fmt: skip
    # per row, [m, k]: the block entry each reduced token sits at (a newline's entry: no token)
    entry_token = torch.zeros(len(images), lengths[0], counts[0], device=output.sources.device)
    for row, image in enumerate(images):
        slots = token_slots(image).to(entry_token.device)
        entry_token[row, slots, torch.arange(counts[0], device=entry_token.device)] = 1
    pruned_sources = (output.sources.float() @ entry_token) > 0
    text_tokens = (attention_mask.sum(dim=1) - image_mask.sum(dim=1)).tolist()
    return Generation(
        output.ids, text_tokens, generated_lengths(output.ids, eos_token_id), pruned_sources=pruned_sources,
        structural_tokens=newlines, plan=plan,
    )  # fmt: skip
