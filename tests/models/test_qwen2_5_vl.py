"""Qwen2.5-VL family (`vtc.models.qwen2_5_vl`) on a tiny random Qwen2.5-VL (`vtc.models.tiny_qwen2_5_vl`)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vtc.models import ReducedImage, inllm
from vtc.models import qwen2_5_vl as qwen
from vtc.models import tiny_qwen2_5_vl as tiny

# (height, width) in pixels → merged grids 4 × 4, 3 × 5, 5 × 2 (16, 15 and 10 tokens); windows of 2 × 2 tokens, so the
# tower's window permutation is not the identity and the 3 × 5 and 5 × 2 grids have ragged border windows
SIZES = [(56, 56), (42, 70), (70, 28)]
QUESTIONS = ["how many circles are there ?", "where is the circle relative to the green object ?", "is it red ?"]
MAX_NEW = 8


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="module")
def qwen_loaded(tiny_qwen_dir):
    model, processor = qwen.load_model(str(tiny_qwen_dir), device="cpu")
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in SIZES]
    prompts = [qwen.user_turn(processor, q) for q in QUESTIONS]
    views = qwen.encode_images(model, processor, images, {})
    return model, processor, images, prompts, views


def full(view) -> ReducedImage:
    n = view.projected.shape[0]
    return ReducedImage(view.projected, torch.eye(n, dtype=torch.bool), [(*view.grid, n)])


def own_generate(model, processor, image, prompt, **kwargs):
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, **kwargs)
    return inputs, out[0, inputs["input_ids"].shape[1] :]


def assert_rows_equal(batch, references, pad_token_id):
    for row, reference in enumerate(references):
        assert batch.new_tokens[row] == len(reference)  # alone, generate stops right after EOS
        assert batch.ids[row, : len(reference)].tolist() == reference.tolist(), row
        assert bool((batch.ids[row, len(reference) :] == pad_token_id).all())


@pytest.mark.parametrize("penalty", [1.05, 1.6])
def test_full_original_positions_generate_what_model_generate_does(qwen_loaded, penalty):
    """ADAPTER 1: all tokens at original positions, one left-padded ragged batch == model.generate per row, with the
    checkpoint's repetition penalty (the 7B's 1.05, and a strong one that changes the tokens)."""
    model, processor, images, prompts, views = qwen_loaded
    model.generation_config.repetition_penalty = penalty
    try:
        batch = qwen.generate(model, processor, prompts, [full(v[0]) for v in views], MAX_NEW, "original")
        references, text_tokens = [], []
        for image, prompt in zip(images, prompts):
            inputs, reference = own_generate(model, processor, image, prompt)
            references.append(reference)
            text_tokens.append(int((inputs["input_ids"] != model.config.image_token_id).sum()))
        model.generation_config.repetition_penalty = 1.0
        unpenalized = qwen.generate(model, processor, prompts, [full(v[0]) for v in views], MAX_NEW, "original")
    finally:
        model.generation_config.repetition_penalty = 1.05
    assert [v[0].projected.shape[0] for v in views] == [16, 15, 10]
    assert_rows_equal(batch, references, processor.tokenizer.pad_token_id)
    assert batch.text_tokens == text_tokens
    if penalty == 1.05:
        assert any(len(r) < MAX_NEW for r in references)  # some row stops at EOS and is padded after it
    else:
        assert not torch.equal(batch.ids, unpenalized.ids)  # the penalty is applied, as model.generate applies it


def test_full_renumbered_is_one_dimensional_positions_and_differs(qwen_loaded):
    """renumbered with all tokens == the model fed the same embeddings with 1-D positions (no image_grid_thw), and
    differs from original: positions matter in the tiny model, so the original-parity test has teeth."""
    model, processor, images, prompts, views = qwen_loaded
    model.generation_config.repetition_penalty = 1.0  # generate(inputs_embeds=...) has no prompt ids to penalise
    try:
        reduced = [full(v[0]) for v in views]
        renumbered = qwen.generate(model, processor, prompts, reduced, MAX_NEW, "renumbered")
        original = qwen.generate(model, processor, prompts, reduced, MAX_NEW, "original")
        references = []
        for image, prompt in zip(images, prompts):
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            embeds = model.model.get_input_embeddings()(inputs["input_ids"])
            projected = torch.cat(
                model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
            )
            embeds[inputs["input_ids"] == model.config.image_token_id] = projected
            out = model.generate(
                inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=MAX_NEW, do_sample=False
            )
            references.append(out[0])
    finally:
        model.generation_config.repetition_penalty = 1.05
    assert_rows_equal(renumbered, references, processor.tokenizer.pad_token_id)
    assert not torch.equal(renumbered.ids, original.ids)


def test_projected_is_what_the_model_feeds_its_language_model(qwen_loaded):
    """ADAPTER 2, and the other encoder outputs: grid, patch groups in merger order, mean_received attention."""
    model, processor, images, prompts, views = qwen_loaded
    captured = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    try:
        for image, prompt, (view,) in zip(images, prompts, views):
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            model(**inputs)
            fed = captured.pop()[0][inputs["input_ids"][0] == model.config.image_token_id]
            # one image encoded alone: the same numbers; within a batch of images the tower's matmuls have other shapes
            (alone,) = qwen.encode_images(model, processor, [image], {})[0]
            torch.testing.assert_close(alone.projected, fed, rtol=0, atol=0)
            torch.testing.assert_close(view.projected, fed)
            _, h, w = inputs["image_grid_thw"][0].tolist()
            assert view.grid == (h // 2, w // 2) and view.projected.shape[0] == h * w // 4
    finally:
        hook.remove()

    pixels = processor.image_processor(images=images, return_tensors="pt")
    projected, groups, keys, received = qwen.encode_patch_groups(
        model, pixels["pixel_values"], pixels["image_grid_thw"]
    )
    merger = model.model.visual.merger
    for (view,), p, g, k, r in zip(views, projected, groups, keys, received):
        torch.testing.assert_close(p, view.projected, rtol=0, atol=0)
        # the merger on our row-major patch groups gives the model's own (row-major) tokens: the groups are in order
        torch.testing.assert_close(merger(g.reshape(-1, g.shape[-1])), view.projected)
        torch.testing.assert_close(view.features, g.mean(dim=1))
        torch.testing.assert_close(view.keys, k.mean(dim=1))
        torch.testing.assert_close(view.cls_attention, r.sum(dim=-1))
        torch.testing.assert_close(view.cls_attention.sum(dim=-1), torch.ones(view.cls_attention.shape[0]))
        assert view.cls_attention.shape == (model.config.vision_config.num_heads, view.projected.shape[0])


def test_mean_received_equals_eager_attention_of_last_block(qwen_loaded, monkeypatch):
    """The recomputed attention equals the weights eager attention computes in the last (full-attention) block."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
    from transformers.vision_utils import get_vision_window_index

    model, processor, images, _, views = qwen_loaded
    weights = []
    eager = modeling.eager_attention_forward

    def recording(module, *args, **kwargs):
        output, attention = eager(module, *args, **kwargs)
        weights.append(attention)
        return output, attention

    visual = model.model.visual
    monkeypatch.setattr(modeling, "eager_attention_forward", recording)
    implementation = visual.config._attn_implementation
    visual.config._attn_implementation = "eager"
    try:
        pixels = processor.image_processor(images=images, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        visual(pixels["pixel_values"], grid_thw=grid)
    finally:
        visual.config._attn_implementation = implementation
    last = weights[-len(images) :]  # the last block attends per image: one call each, in image order
    assert [a.shape[-1] for a in last] == [4 * v[0].projected.shape[0] for v in views]
    window_index, _ = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    offset = 0
    for (view,), attention in zip(views, last):
        n = view.projected.shape[0]
        order = window_index[offset : offset + n] - offset  # the image's token groups, in the tower's window order
        per_patch = attention[0].mean(dim=1).view(-1, n, 4).sum(dim=-1)  # [heads, n] received, window order
        expected = torch.empty_like(per_patch)
        expected[:, order] = per_patch
        torch.testing.assert_close(view.cls_attention, expected)
        offset += n
    assert not torch.equal(window_index, torch.arange(len(window_index)))


def test_pruned_row_gets_its_source_positions(qwen_loaded):
    """ADAPTER 3: a hand-made pruned image (3 kept tokens, 1 merged of a 2 × 2 block) on the 3 × 5 grid."""
    model, processor, images, prompts, views = qwen_loaded
    (view,) = views[1]
    h, w = view.grid
    assert (h, w) == (3, 5)
    kept = [0, 7, 14]  # (0, 0), (1, 2), (2, 4)
    merged = [3, 4, 8, 9]  # rows 0, 0, 1, 1 → 0.5 → 1 (halves up); cols 3, 4, 3, 4 → 3.5 → 4
    sources = torch.zeros(4, h * w, dtype=torch.bool)
    for row, index in enumerate(kept):
        sources[row, index] = True
    sources[3, merged] = True
    tokens = torch.cat([view.projected[kept], view.projected[merged].mean(dim=0, keepdim=True)])
    image = ReducedImage(tokens, sources, [(h, w, 4)])
    ids, mask, positions, image_mask = qwen.build_inputs(model, processor, [prompts[1]], [image], "original")
    s = int(image_mask[0].int().argmax())
    text_after = ids.shape[1] - s - 4
    expected = torch.tensor(
        [
            list(range(s)) + [s] * 4 + [s + 5 + i for i in range(text_after)],
            list(range(s)) + [s + 0, s + 1, s + 2, s + 1] + [s + 5 + i for i in range(text_after)],
            list(range(s)) + [s + 0, s + 2, s + 4, s + 4] + [s + 5 + i for i in range(text_after)],
        ]
    )
    assert torch.equal(positions[:, 0], expected)
    assert ids[0, s : s + 4].tolist() == [model.config.image_token_id] * 4 and int(mask.sum()) == ids.shape[1]
    # the kept tokens and the text are where the model's own get_rope_index puts them in the unreduced prompt
    inputs = processor(images=[images[1]], text=[prompts[1]], return_tensors="pt")
    reference, delta = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"]
    )
    assert torch.equal(positions[:, 0, s : s + 3], reference[:, 0, s + torch.tensor(kept)])
    assert torch.equal(positions[:, 0, s + 4 :], reference[:, 0, s + h * w :])
    # decode continues where the unreduced prompt's would: largest position + 1 = rope_deltas + its length
    assert int(positions.max()) + 1 == int(delta) + inputs["input_ids"].shape[1]

    _, _, renumbered, _ = qwen.build_inputs(model, processor, [prompts[1]], [image], "renumbered")
    assert torch.equal(renumbered[:, 0], torch.arange(ids.shape[1]).expand(3, -1))

    for mode in qwen.POSITIONS:
        out = qwen.generate(model, processor, [prompts[1]], [image], MAX_NEW, mode)
        assert out.ids.shape[0] == 1 and 1 <= out.ids.shape[1] <= MAX_NEW
        assert out.text_tokens == [int((inputs["input_ids"] != model.config.image_token_id).sum())]


def pruned(view, keep: int, seed: int) -> ReducedImage:
    n = view.projected.shape[0]
    kept = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values
    return ReducedImage(view.projected[kept], torch.eye(n, dtype=torch.bool)[kept], [(*view.grid, keep)])


@pytest.mark.parametrize("positions", qwen.POSITIONS)
def test_batched_equals_one_at_a_time_with_ragged_k(qwen_loaded, positions):
    """ADAPTER 4: a left-padded batch of k = 5, 11, 3 gives each row what it gets alone, also where one row stops
    early at EOS while the others go on."""
    model, processor, _, prompts, views = qwen_loaded
    images = [pruned(v[0], keep, seed) for v, keep, seed in zip(views, (5, 11, 3), (0, 1, 2))]
    free = qwen.generate(model, processor, prompts, images, MAX_NEW, positions)
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos, int(free.ids[0, 2])]  # row 0 now stops after 3 tokens
    try:
        batch = qwen.generate(model, processor, prompts, images, MAX_NEW, positions)
        alone = [qwen.generate(model, processor, [p], [i], MAX_NEW, positions) for p, i in zip(prompts, images)]
    finally:
        model.generation_config.eos_token_id = eos
    assert batch.new_tokens[0] == 3 < batch.ids.shape[1]
    assert_rows_equal(batch, [a.ids[0] for a in alone], processor.tokenizer.pad_token_id)
    assert batch.text_tokens == [a.text_tokens[0] for a in alone]


def test_bad_input_is_refused_with_a_clear_error(qwen_loaded, tiny_qwen_dir):
    model, processor, _, prompts, views = qwen_loaded
    with pytest.raises(ValueError, match="allowed: \\['min_pixels', 'max_pixels'\\]"):
        qwen.load_model(str(tiny_qwen_dir), device="cpu", max_pixel=100)
    with pytest.raises(ValueError, match="exceeds max_pixels"):
        qwen.load_model(str(tiny_qwen_dir), device="cpu", min_pixels=2000, max_pixels=1000)
    with pytest.raises(ValueError, match="positions must be one of"):
        qwen.generate(model, processor, prompts[:1], [full(views[0][0])], 2, "1d")
    with pytest.raises(ValueError, match="max_pixels is 999"):
        qwen.encode_images(model, processor, [], {"max_pixels": 999})
    bad = full(views[0][0])
    bad.views = [(4, 4, 3)]
    with pytest.raises(ValueError, match="inconsistent"):
        qwen.generate(model, processor, prompts[:1], [bad], 2, "original")


def test_resolution_bounds_reach_the_image_processor_and_the_key(tiny_qwen_dir):
    cfg = {"path": str(tiny_qwen_dir), "revision": None, "dtype": "float32", "device": "cpu",
           "attn_implementation": "sdpa", "family": "qwen2_5_vl", "min_pixels": 14 * 14 * 9, "max_pixels": 14 * 14 * 16}  # fmt: skip
    model, processor = qwen.load_from_config(cfg)
    assert qwen.pixel_bounds(processor) == {"min_pixels": 14 * 14 * 9, "max_pixels": 14 * 14 * 16}
    big = Image.fromarray(np.zeros((140, 140, 3), dtype="uint8"))
    (view,) = qwen.encode_images(model, processor, [big], cfg)[0]
    assert view.projected.shape[0] <= 16  # max_pixels = 16 merged tokens of 14 × 14 pixels
    extras = qwen.encode_key_extras(cfg, processor, model.config)
    assert extras["max_pixels"] == 14 * 14 * 16 and extras["cls_attention"] == "mean_received"
    json.dumps(extras)
    assert qwen.vision_tower(model) is model.model.visual and qwen.attention_implementation(model) == "sdpa"


def test_prompt_is_lmms_evals_and_the_chat_template_is_found(qwen_loaded, tmp_path):
    _, processor, _, _, _ = qwen_loaded
    assert qwen.user_turn(processor, "is it red ?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>is it red ?<|im_end|>\n<|im_start|>assistant\n"
    )
    tokenizer = processor.tokenizer
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json {{ x }}"}))
    assert qwen._chat_template(str(tmp_path), None, tokenizer) == "json {{ x }}"  # the 7B's file
    (tmp_path / "chat_template.jinja").write_text("jinja {{ x }}")
    assert qwen._chat_template(str(tmp_path), None, tokenizer) == "jinja {{ x }}"
    empty = tmp_path / "empty"
    empty.mkdir()
    tokenizer.chat_template, template = None, tokenizer.chat_template
    try:
        with pytest.raises(ValueError, match="has no chat template"):
            qwen._chat_template(str(empty), None, tokenizer)
    finally:
        tokenizer.chat_template = template


# In-LLM pruning (`generate_pruned`, `vtc.models.inllm` with 3-D positions). The tiny model has 2 decoder layers, so
# FastV prunes at layer 1; the batches are ragged-free (every row k = 10 tokens, as the loop requires).
K_SAME = 10


def same_count(views):
    """One 10-token image per test image (the 4 × 4 and 3 × 5 grids pruned at random, the 5 × 2 grid whole)."""
    return [pruned(v[0], K_SAME, seed) for seed, v in enumerate(views)]


def fastv_plans(keep=None, positions="original"):
    hparams = {"budget_mode": "kept", "layer": 1, "positions": positions}
    return lambda k: inllm.plan("fastv", k if keep is None else keep, hparams, 2, k)


@pytest.mark.parametrize("penalty", [1.05, 1.6])
def test_pruned_loop_keeping_everything_generates_what_generate_does(qwen_loaded, penalty):
    """Keep everything: the pruning loop at 3-D original positions == the adapter's `generate` (original), token for
    token, with the checkpoint's repetition penalty and a strong one."""
    model, processor, _, prompts, views = qwen_loaded
    images = same_count(views)
    model.generation_config.repetition_penalty = penalty
    try:
        reference = qwen.generate(model, processor, prompts, images, MAX_NEW, "original")
        out = qwen.generate_pruned(model, processor, prompts, images, MAX_NEW, fastv_plans())
        model.generation_config.repetition_penalty = 1.0
        unpenalized = qwen.generate_pruned(model, processor, prompts, images, MAX_NEW, fastv_plans())
    finally:
        model.generation_config.repetition_penalty = 1.05
    assert out.plan.per_layer == [K_SAME, K_SAME]
    assert torch.equal(out.ids, reference.ids)
    assert out.new_tokens == reference.new_tokens and out.text_tokens == reference.text_tokens
    assert torch.equal(out.pruned_sources, torch.eye(K_SAME, dtype=torch.bool).expand(3, -1, -1))
    if penalty == 1.6:
        assert not torch.equal(out.ids, unpenalized.ids)  # the loop applies the penalty
    # 1-D positions everywhere give other tokens: the loop's 3-D positions are not a no-op
    renumbered = qwen.generate(model, processor, prompts, images, MAX_NEW, "renumbered")
    assert not torch.equal(out.ids, renumbered.ids)


def rotary_positions(model):
    """Records the position ids of every call of the language model's rotary embedding."""
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    return seen, hook


@pytest.mark.parametrize("positions", ["original", "renumbered"])
def test_fastv_prunes_with_3d_positions_and_batched_equals_one_at_a_time(qwen_loaded, positions):
    model, processor, _, prompts, views = qwen_loaded
    images, keep = same_count(views), 3
    seen, hook = rotary_positions(model)
    try:
        batch = qwen.generate_pruned(model, processor, prompts, images, MAX_NEW, fastv_plans(keep, positions))
    finally:
        hook.remove()
    assert batch.plan.per_layer == [K_SAME, keep] and batch.pruned_sources.shape == (3, keep, K_SAME)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = qwen.generate_pruned(model, processor, [prompt], [image], MAX_NEW, fastv_plans(keep, positions))
        assert batch.ids[row, : alone.ids.shape[1]].tolist() == alone.ids[0].tolist(), row
        assert torch.equal(batch.pruned_sources[row], alone.pruned_sources[0])
        assert batch.new_tokens[row] == alone.new_tokens[0] and batch.text_tokens[row] == alone.text_tokens[0]

    # the positions layer 1 got: the prompt's (t, row, col) with only the kept image tokens, or a 1-D run
    _, mask, prompt_positions, image_mask = qwen.build_inputs(model, processor, prompts, images, "original")
    prefill, after = seen[0], seen[1]
    assert torch.equal(prefill, prompt_positions)
    kept = batch.pruned_sources.int().argmax(dim=-1)  # [B, keep] each kept token's index among the row's k
    for row in range(3):
        valid = mask[row].bool()
        start = int(image_mask[row].int().argmax())
        order = torch.cat([torch.arange(start), start + kept[row], torch.arange(start + K_SAME, mask.shape[1])])
        pruned_valid = valid[order]
        got = after[:, row][:, pruned_valid]
        if positions == "original":
            expected = prompt_positions[:, row, order][:, pruned_valid]
        else:
            expected = torch.arange(int(pruned_valid.sum())).expand(3, -1)
        assert torch.equal(got, expected), row
    # decode: layer 0 continues after the unpruned prompt's largest id; layer 1 too with original positions, and after
    # the pruned sequence's length with renumbered ones
    largest = prompt_positions.amax(dim=(0, 2))
    step0, step1 = seen[2][:, :, 0], seen[3][:, :, 0]
    assert torch.equal(step0, (largest + 1).expand(3, -1))
    pruned_length = mask.sum(dim=1) - K_SAME + keep
    assert torch.equal(step1, (largest + 1 if positions == "original" else pruned_length).expand(3, -1))


def test_recomputed_attention_rows_are_eager_attention_of_the_qwen_layers(qwen_loaded, monkeypatch):
    """The rows the loop recomputes at FastV's layer K = 1 (with M-RoPE positions): the last prompt token's
    head-averaged attention of layer 0 (from the cached keys) and of layer 1 before it runs (PyramidDrop's
    `layer_attention`), equal eager attention's maps of the full prompt; FastV keeps eager attention's top 4."""
    model, processor, _, prompts, views = qwen_loaded
    image = same_count(views)[1]
    states = []
    real = inllm.LayerState
    monkeypatch.setattr(inllm, "LayerState", lambda **fields: states.append(real(**fields)) or states[-1])
    out = qwen.generate_pruned(model, processor, prompts[1:2], [image], 1, fastv_plans(4))
    ids, mask, positions, image_mask = qwen.build_inputs(model, processor, prompts[1:2], [image], "original")
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = language_model(
                inputs_embeds=qwen._embedded(model, ids, image_mask, [image]), attention_mask=mask,
                position_ids=positions, output_attentions=True,
            ).attentions  # fmt: skip
    finally:
        language_model.set_attn_implementation("sdpa")
    (state,) = states
    last = torch.zeros_like(mask, dtype=torch.bool)
    last[:, -1] = True
    torch.testing.assert_close(state.last_attention[0], attentions[0][0].mean(dim=0)[-1])
    torch.testing.assert_close(state.layer_attention(last)[0], attentions[1][0].mean(dim=0)[-1])
    expected = attentions[0][0].mean(dim=0)[-1][image_mask[0]].topk(4).indices.sort().values
    assert out.pruned_sources[0].int().argmax(dim=-1).tolist() == expected.tolist()


def test_pruned_loop_refuses_ragged_batches_and_sliding_windows(qwen_loaded):
    model, processor, _, prompts, views = qwen_loaded
    with pytest.raises(ValueError, match="one token count"):
        qwen.generate_pruned(model, processor, prompts[:2], [full(v[0]) for v in views[:2]], 2, fastv_plans())
    config = model.model.language_model.config
    saved = config.layer_types
    config.layer_types = ["full_attention", "sliding_attention"]  # use_sliding_window with max_window_layers 1
    try:
        with pytest.raises(NotImplementedError, match="sliding"):
            qwen.generate_pruned(model, processor, prompts[:1], [full(views[0][0])], 2, fastv_plans())
    finally:
        config.layer_types = saved


@pytest.mark.parametrize(
    ("method", "budget", "hparams"),
    [
        ("dart", 4, {"budget_mode": "kept", "layer": 1}),
        ("sparsevlm", 8, {"layers": [1], "keep": "fit"}),  # adds recycled tokens: renumbered positions
        ("pyramiddrop", 7, {"layers": [1]}),
    ],
)
def test_other_in_llm_methods_run_with_3d_positions_batched_as_alone(qwen_loaded, method, budget, hparams):
    model, processor, _, prompts, views = qwen_loaded
    images = same_count(views)

    def plan_for(k):
        return inllm.plan(method, budget, hparams, 2, k)

    batch = qwen.generate_pruned(model, processor, prompts, images, 4, plan_for)
    assert batch.plan.per_layer[0] == K_SAME > batch.plan.per_layer[1]
    assert batch.pruned_sources.shape == (3, batch.plan.per_layer[1], K_SAME)
    for row, (prompt, image) in enumerate(zip(prompts, images)):
        alone = qwen.generate_pruned(model, processor, [prompt], [image], 4, plan_for)
        assert batch.ids[row, : alone.ids.shape[1]].tolist() == alone.ids[0].tolist(), row
        assert torch.equal(batch.pruned_sources[row], alone.pruned_sources[0])
