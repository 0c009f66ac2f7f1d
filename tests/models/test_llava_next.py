"""The LLaVA-NeXT adapter (`vtc.models.llava_next`) against transformers' own `LlavaNextForConditionalGeneration`, on a
tiny random model (`vtc.models.tiny_llava_next`) and images of different aspect ratios, so that each has its own
crop grid, unpadded high-resolution grid and token count."""

import numpy as np
import pytest
import torch
from PIL import Image

from vtc.models import ReducedImage, inllm, llava, llava_next
from vtc.models.llava import generated_lengths
from vtc.models.tiny_llava_next import GRID, build

# (height, width) → crop grid and unpadded high-resolution grid of the tiny model (8 × 8 tokens per crop):
# 24×60: 1×2 crops, 8×16 → 6×16 (rows dropped); 70×50: 2×2, 16×16 → 16×12 (columns dropped);
# 20×20: one crop, 8×8; 40×90: 1×2, 8×16 (nothing to drop).
SIZES = [(24, 60), (70, 50), (20, 20), (40, 90)]
HIRES = [(6, 16), (16, 12), (8, 8), (8, 16)]
QUESTIONS = [
    "how many circles are there ?",
    "where is the circle relative to the green object ?",
    "what color is the circle ?",
    "how many squares are there ?",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return llava_next.load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # smooth gradients plus noise, so that neighbouring patches differ but not wildly
    out = []
    for height, width in SIZES:
        ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
        pixels = ramp + rng.normal(0, 30, (height, width, 3))
        out.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def prompts(tiny):
    _, processor = tiny
    out = [llava_next.user_turn(processor, q) for q in QUESTIONS]
    unknown = processor.tokenizer.unk_token_id
    assert all(unknown not in processor.tokenizer(p)["input_ids"] for p in out)
    return out


@pytest.fixture(scope="module")
def encoded(tiny, images):
    model, processor = tiny
    return llava_next.encode_images(model, processor, images, {})


def model_inputs(processor, image, prompt):
    return processor(images=[image], text=[prompt], return_tensors="pt")


def test_views_have_the_unpadded_grids_and_ragged_counts(encoded):
    assert [[view.grid for view in views] for views in encoded] == [[(GRID, GRID), hires] for hires in HIRES]
    counts = {sum(len(view.projected) for view in views) for views in encoded}
    assert len(counts) == len(SIZES)  # every image its own token count
    for views in encoded:
        for view in views:
            n = view.grid[0] * view.grid[1]
            assert view.projected.shape[0] == view.features.shape[0] == view.keys.shape[0] == n
            assert view.cls_attention.shape == (4, n)
        tensors = [getattr(view, name) for view in views for name in ("projected", "features", "cls_attention", "keys")]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 8  # no shared storage (safetensors)
        assert all(t.is_contiguous() for t in tensors)
        # the high-resolution view is renormalised over what remains after unpadding
        torch.testing.assert_close(views[1].cls_attention.sum(dim=1), torch.ones(4))


@pytest.mark.parametrize("positions", ["renumbered", "original"])
def test_full_generates_what_model_generate_does_in_one_ragged_batch(tiny, images, prompts, encoded, positions):
    model, processor = tiny
    full = [llava_next.full_image(views) for views in encoded]
    batch = llava_next.generate(model, processor, prompts, full, max_new_tokens=6, positions=positions)
    image_token = model.config.image_token_id
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        inputs = model_inputs(processor, image, prompt)
        reference = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        assert torch.equal(batch.ids[row, : len(reference)], reference), row
        assert (
            batch.new_tokens[row]
            == len(reference)
            == generated_lengths(reference[None], model.config.text_config.eos_token_id)[0]
        )
        # the processor's placeholders = the visual tokens + one newline per high-resolution row
        assert batch.structural_tokens[row] == HIRES[row][0]
        assert len(full[row].tokens) + batch.structural_tokens[row] == (inputs["input_ids"] == image_token).sum()
        assert batch.text_tokens[row] == (inputs["input_ids"] != image_token).sum()
    assert len(set(batch.text_tokens)) > 1 and len(set(batch.structural_tokens)) > 1


def test_full_prefill_logits_and_positions_equal_the_models_own(tiny, images, prompts, encoded):
    """Stronger than equal greedy ids: the last prompt position's logits, row by row in the padded batch."""
    model, processor = tiny
    full = [llava_next.full_image(views) for views in encoded]
    embeds, mask, image_mask, original, _ = llava_next.splice(model, processor, prompts, full)
    assert (mask == 0).any()  # left padded
    # nothing reduced: each entry sits where it sat, so original positions are the consecutive ones
    assert torch.equal(original, inllm.padded_positions(mask.bool()))
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=original).logits[:, -1]
        for row, (image, prompt) in enumerate(zip(images, prompts)):
            reference = model(**model_inputs(processor, image, prompt)).logits[0, -1]
            torch.testing.assert_close(logits[row], reference, rtol=1e-4, atol=1e-5)


def test_projected_is_what_the_models_forward_feeds_the_llm(tiny, images, prompts, encoded):
    model, processor = tiny
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.__setitem__("embeds", kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        for image, prompt, batched, (height, width) in zip(images, prompts, encoded, HIRES):
            inputs = model_inputs(processor, image, prompt)
            with torch.no_grad():
                model(**inputs)
            fed = seen["embeds"][0][inputs["input_ids"][0] == model.config.image_token_id]
            alone = llava_next.encode_images(model, processor, [image], {})[0]
            base, hires = fed[: GRID * GRID], fed[GRID * GRID :].view(height, width + 1, -1)
            assert torch.equal(alone[0].projected, base)  # the same crops in one tower call: the same numbers
            assert torch.equal(alone[1].projected, hires[:, :width].reshape(height * width, -1))
            assert torch.equal(hires[:, width], model.model.image_newline[None].expand(height, -1))
            for view, other in zip(alone, batched):  # several images in one tower call
                torch.testing.assert_close(view.projected, other.projected)
                torch.testing.assert_close(view.cls_attention, other.cls_attention)
    finally:
        hook.remove()


@pytest.mark.parametrize("index", [0, 1])  # rows unpadded, columns unpadded
def test_cls_attention_keys_and_features_come_from_the_stitched_unpadded_crops(tiny_dir, images, encoded, index):
    """Against eager attention maps and hidden states of the tower, cell by cell: each high-resolution cell (r, c)
    is cell (r + top, c + left) of the stitched crops, i.e. one patch of one crop."""
    model, processor = llava_next.load_model(str(tiny_dir), device="cpu", attn_implementation="eager")
    inputs = processor.image_processor([images[index]], return_tensors="pt")
    crops = inputs["pixel_values"][0]
    layer = llava.feature_layer_index(model)
    tower = model.model.vision_tower
    encoder_layer = getattr(tower, "vision_model", tower).encoder.layers[layer]
    with torch.no_grad():
        output = model.model.vision_tower(crops, output_attentions=True, output_hidden_states=True)
        keys = encoder_layer.self_attn.k_proj(encoder_layer.layer_norm1(output.hidden_states[layer]))
    attention = output.attentions[layer][:, :, 0, 1:]  # [crops, heads, 64]
    features = output.hidden_states[model.config.vision_feature_layer]
    base, hires = encoded[index]
    torch.testing.assert_close(base.cls_attention, attention[0])
    torch.testing.assert_close(base.features, features[0, 1:])
    torch.testing.assert_close(base.keys, keys[0, 1:])

    height, width = hires.grid
    rows, cols = {0: (1, 2), 1: (2, 2)}[index]
    assert len(crops) == 1 + rows * cols
    top, left = (rows * GRID - height) // 2, (cols * GRID - width) // 2
    assert (top, left) == {0: (1, 0), 1: (0, 2)}[index]
    expected_attention = torch.empty(4, height * width)
    for r in range(height):
        for c in range(width):
            big_r, big_c = r + top, c + left
            crop = 1 + (big_r // GRID) * cols + big_c // GRID
            patch = (big_r % GRID) * GRID + big_c % GRID
            cell = r * width + c
            expected_attention[:, cell] = attention[crop, :, patch] / attention[crop].sum(dim=-1)
            torch.testing.assert_close(hires.features[cell], features[crop, 1 + patch])
            torch.testing.assert_close(hires.keys[cell], keys[crop, 1 + patch])
    expected_attention /= expected_attention.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(hires.cls_attention, expected_attention)


def hand_made(views, picks_base, picks_hires, seed=0):
    """A ReducedImage keeping base tokens `picks_base` and one high-resolution token per entry of `picks_hires`
    (a list of view-1 indices it covers, merged when several), with random token vectors."""
    n0 = views[0].grid[0] * views[0].grid[1]
    total = n0 + views[1].grid[0] * views[1].grid[1]
    sources = torch.zeros(len(picks_base) + len(picks_hires), total, dtype=torch.bool)
    for row, index in enumerate(picks_base):
        sources[row, index] = True
    for row, covered in enumerate(picks_hires, start=len(picks_base)):
        sources[row, [n0 + i for i in covered]] = True
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(sources), views[0].projected.shape[1], generator=generator)
    return ReducedImage(tokens, sources, [(*views[0].grid, len(picks_base)), (*views[1].grid, len(picks_hires))])


def test_newlines_and_original_positions_of_a_hand_made_reduction(tiny, images, prompts, encoded):
    model, processor = tiny
    views = encoded[0]  # base 8 × 8, high resolution 6 × 16: a packed row is 16 tokens + its newline
    assert views[1].grid == (6, 16)
    # view 1: (row 0, col 3), (0, 10), a merge of (2, 0) and (3, 1) (indices 32, 49: mean 40.5 → 41 = (2, 9)), (5, 15)
    image = hand_made(views, [0, 5, 63], [[3], [10], [32, 49], [95]])
    sequence, original, newlines, packed = llava_next.visual_sequence(model, image)
    newline = model.model.image_newline
    t = image.tokens
    expected = [t[0], t[1], t[2], t[3], t[4], newline, t[5], newline, t[6], newline]
    assert newlines == 3 and len(sequence) == len(expected)
    for got, want in zip(sequence, expected):
        assert torch.equal(got, want)
    base, stride = 64, 17
    assert original.tolist() == [
        0, 5, 63,
        base + 3, base + 10, base + 16,  # the newline closing row 0
        base + 2 * stride + 9, base + 2 * stride + 16,
        base + 5 * stride + 15, base + 5 * stride + 16,
    ]  # fmt: skip
    placeholders = model_inputs(processor, images[0], prompts[0])["input_ids"] == model.config.image_token_id
    assert packed == base + 6 * stride == placeholders.sum()

    # feed order that returns to an earlier row: a newline wherever the next token's row differs
    back = hand_made(views, [], [[3], [95], [10]])
    _, original, newlines, _ = llava_next.visual_sequence(model, back)
    assert newlines == 3
    assert original.tolist() == [
        base + 3,
        base + 16,
        base + 5 * stride + 15,
        base + 5 * stride + 16,
        base + 10,
        base + 16,
    ]

    # a view reduced to nothing: no newline without a high-resolution token
    sequence, original, newlines, _ = llava_next.visual_sequence(model, hand_made(views, [7, 2], []))
    assert newlines == 0 and len(sequence) == 2 and original.tolist() == [7, 2]
    _, original, newlines, _ = llava_next.visual_sequence(model, hand_made(views, [], [[95]]))
    assert newlines == 1 and original.tolist() == [base + 5 * stride + 15, base + 5 * stride + 16]

    # in the prompt: text before the image 0 … s − 1, the entries at s + original, the text after from s + packed
    prompt = prompts[1]
    ids = processor.tokenizer(prompt)["input_ids"]
    s = ids.index(model.config.image_token_id)
    _, mask, image_mask, positions, structural = llava_next.splice(
        model, processor, [prompt, prompts[2]], [image, image]
    )
    _, original, _, _ = llava_next.visual_sequence(model, image)
    valid = mask[0].bool()
    after = len(ids) - s - 1
    assert positions[0, valid].tolist() == (
        list(range(s)) + (s + original).tolist() + list(range(s + packed, s + packed + after))
    )
    assert image_mask[0].sum() == len(original) and structural == [3, 3]
    for mode in ("renumbered", "original"):
        out = llava_next.generate(model, processor, [prompt], [image], max_new_tokens=3, positions=mode)
        assert out.ids.shape[0] == 1 and 1 <= out.ids.shape[1] <= 3
        assert out.structural_tokens == [3] and out.text_tokens == [len(ids) - 1]


def reductions(encoded):
    """Ragged reductions: per image a different number of base and high-resolution tokens, one merged token each,
    high-resolution tokens in shuffled order for one image."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for index, views in enumerate(encoded[:3]):
        n1 = views[1].grid[0] * views[1].grid[1]
        base = torch.randperm(64, generator=generator)[: 5 + 3 * index].sort().values.tolist()
        picked = torch.randperm(n1, generator=generator)[: 7 + 4 * index]
        hires = picked.tolist() if index == 1 else picked.sort().values.tolist()
        merged = [[i] for i in hires[:-2]] + [hires[-2:]]
        out.append(hand_made(views, base, merged, seed=index))
    return out


@pytest.mark.parametrize("positions", ["renumbered", "original"])
def test_batched_equals_one_at_a_time_with_ragged_k(tiny, prompts, encoded, positions):
    model, processor = tiny
    images = reductions(encoded)
    assert len({len(image.tokens) for image in images}) == 3
    free = llava_next.generate(model, processor, prompts[:3], images, max_new_tokens=6, positions=positions)
    eos = model.generation_config.eos_token_id
    # make row 0's third token a second EOS: that row stops early and is padded while the others go on
    model.generation_config.eos_token_id = [eos, free.ids[0, 2].item()]
    try:
        batch = llava_next.generate(model, processor, prompts[:3], images, max_new_tokens=6, positions=positions)
        assert batch.new_tokens[0] == 3 < batch.ids.shape[1]
        for row, (prompt, image) in enumerate(zip(prompts, images)):
            alone = llava_next.generate(model, processor, [prompt], [image], max_new_tokens=6, positions=positions)
            assert torch.equal(batch.ids[row, : alone.ids.shape[1]], alone.ids[0]), row
            assert batch.new_tokens[row] == alone.new_tokens[0] == alone.ids.shape[1]
            assert batch.text_tokens[row] == alone.text_tokens[0] == len(processor.tokenizer(prompt)["input_ids"]) - 1
            assert batch.structural_tokens[row] == alone.structural_tokens[0]
    finally:
        model.generation_config.eos_token_id = eos


def test_in_llm_pruning_runs_on_the_language_model_unchanged(tiny, images, prompts, encoded):
    """`PROVIDES["in_llm"]`: `inllm.generate_pruned` keeping every entry generates `model.generate`'s ids; one row,
    because the loop takes the same image-block length in every row."""
    model, processor = tiny
    full = [llava_next.full_image(encoded[0])]
    embeds, mask, image_mask, _, _ = llava_next.splice(model, processor, prompts[:1], full)
    length = int(image_mask.sum())
    eos, pad = model.generation_config.eos_token_id, processor.tokenizer.pad_token_id
    reference = llava_next.generate(model, processor, prompts[:1], full, max_new_tokens=5)
    kept_all = inllm.plan("fastv", length, {"budget_mode": "kept"}, 4, length)
    assert torch.equal(inllm.generate_pruned(model, embeds, mask, image_mask, kept_all, 5, eos, pad).ids, reference.ids)
    pruned = inllm.generate_pruned(
        model, embeds, mask, image_mask, inllm.plan("fastv", 20, {"budget_mode": "kept"}, 4, length), 5, eos, pad
    )
    assert pruned.kept.shape == (1, 20) and pruned.ids.shape[0] == 1


def test_bad_input_is_refused_with_the_setting_named(tiny, images, encoded):
    model, processor = tiny
    for name, value in [("vision_feature_select_strategy", "full"), ("vision_feature_layer", [-2, -1])]:
        saved = getattr(model.config, name)
        setattr(model.config, name, value)
        try:
            with pytest.raises(NotImplementedError, match=name):
                llava_next.encode_images(model, processor, images[:1], {})
        finally:
            setattr(model.config, name, saved)
    views = encoded[0]
    image = hand_made(views, [0], [[3]])
    image.sources[1, 0] = True  # a high-resolution token covering a base token
    with pytest.raises(ValueError, match="own view|that view only"):
        llava_next.visual_sequence(model, image)
    with pytest.raises(ValueError, match="positions"):
        llava_next.generate(model, processor, ["x"], [hand_made(views, [0], [[3]])], 2, positions="gapped")
    with pytest.raises(ValueError, match="family options"):
        llava_next.load_model("unused", min_pixels=4)


def test_encode_key_extras_names_what_the_views_depend_on(tiny):
    model, processor = tiny
    extras = llava_next.encode_key_extras({}, processor, model.config)
    assert extras["image_grid_pinpoints"] == [[32, 32], [32, 64], [64, 32], [64, 64]]
    assert extras["image_processor"]["image_grid_pinpoints"] == extras["image_grid_pinpoints"]
    assert extras["vision_feature_layer"] == -2 and extras["vision_feature_select_strategy"] == "default"
    import json

    json.dumps(extras)  # goes into a cache key
    assert llava_next.vision_tower(model) is model.model.vision_tower
    assert llava_next.attention_implementation(model) == "sdpa"


def fastv_plans(keep=None, **hparams):
    """plan_for of FastV at layer 2 of the tiny model's 4: keeping `keep` block entries (None: all of them)."""
    return lambda m: inllm.plan("fastv", m if keep is None else keep, {"budget_mode": "kept", **hparams}, 4, m)


def same_block(encoded):
    """Two hand-made reductions of different images whose blocks have one length: 4 base tokens, 5 high-resolution
    tokens (one merged) over 3 rows of view 1 → 3 newlines, 12 entries."""
    # encoded[0]: 6 × 16 (rows 0, 0, 1, 2, 2); encoded[1]: 16 × 12 (rows 0, 1, 1, 8, 8), one merge within row 1
    first = hand_made(encoded[0], [0, 5, 9, 63], [[3], [10], [20], [40], [41]], seed=3)
    second = hand_made(encoded[1], [1, 2, 30, 40], [[0], [13, 14], [15], [100], [101]], seed=4)
    return [first, second]


def test_generate_pruned_keeping_everything_is_generate(tiny, prompts, encoded):
    """`generate_pruned` with a plan that keeps every entry of the block (tokens and newlines) == `generate`, for the
    full image and for two reduced images in one left-padded batch; its pruned_sources map each block entry back to
    its reduced token, a newline to none."""
    model, processor = tiny
    full = llava_next.full_image(encoded[0])
    for images in ([full, full], same_block(encoded)):
        reference = llava_next.generate(model, processor, prompts[:2], images, max_new_tokens=5)
        out = llava_next.generate_pruned(model, processor, prompts[:2], images, 5, fastv_plans())
        block = len(images[0].tokens) + reference.structural_tokens[0]
        assert out.plan.keep == block and out.plan.per_layer == [block] * 4
        assert torch.equal(out.ids, reference.ids)
        assert out.new_tokens == reference.new_tokens and out.text_tokens == reference.text_tokens
        assert out.structural_tokens == reference.structural_tokens
        k = len(images[0].tokens)
        assert out.pruned_sources.shape == (2, block, k)
        for row, image in enumerate(images):
            expected = torch.zeros(block, k, dtype=torch.bool)
            expected[llava_next.token_slots(image), torch.arange(k)] = True
            assert torch.equal(out.pruned_sources[row], expected)
            assert int(expected.any(dim=1).logical_not().sum()) == out.structural_tokens[row]  # newlines cover none


@pytest.mark.parametrize(("method", "positions"), [("fastv", "original"), ("dart", "renumbered")])
def test_generate_pruned_prunes_and_batched_equals_one_at_a_time(tiny, prompts, encoded, method, positions):
    model, processor = tiny
    images = same_block(encoded)

    def plan_for(m):
        return inllm.plan(method, 5, {"budget_mode": "kept", "positions": positions}, 4, m)

    batch = llava_next.generate_pruned(model, processor, prompts[:2], images, 5, plan_for)
    assert batch.plan.per_layer == [12, 12, 5, 5] and batch.structural_tokens == [3, 3]
    assert batch.pruned_sources.shape == (2, 5, 9)
    assert bool((batch.pruned_sources.sum(dim=-1) <= 1).all())  # a kept entry is one token or a newline
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = llava_next.generate_pruned(model, processor, [prompt], [image], 5, plan_for)
        assert torch.equal(batch.ids[row, : alone.ids.shape[1]], alone.ids[0]), row
        assert torch.equal(batch.pruned_sources[row], alone.pruned_sources[0])
        assert batch.new_tokens[row] == alone.new_tokens[0] and batch.text_tokens[row] == alone.text_tokens[0]
    # what the pipeline's target_recall scores: kept tokens' sources over the image's input tokens
    covered = (batch.pruned_sources[0].float() @ images[0].sources.float()) > 0
    assert covered.shape == (5, images[0].sources.shape[1]) and 0 < int(covered.sum()) <= 5


def test_generate_pruned_refuses_a_batch_of_two_block_lengths(tiny, prompts, encoded):
    model, processor = tiny
    images = [llava_next.full_image(encoded[0]), llava_next.full_image(encoded[2])]
    with pytest.raises(ValueError, match="one length"):
        llava_next.generate_pruned(model, processor, prompts[:2], images, 2, fastv_plans())
