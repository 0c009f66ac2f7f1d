"""The in-LLM pruning decoder loop (`vtc.models.inllm`) against transformers' own greedy `generate`."""

import pytest
import torch

from vtc.models import inllm, llava

N = 40  # visual tokens per row: small, so the tests stay fast on CPU


@pytest.mark.parametrize(("method", "positions"), [("fastv", "original"), ("dart", "renumbered")])
def test_keeping_every_token_generates_what_hf_generate_does(loaded, method, positions):
    model, processor, prompts, visual = loaded
    reference = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=5)
    _, mask, image_mask = llava.splice_with_image_mask(model, processor.tokenizer, prompts, visual)
    assert (mask == 0).any() and image_mask.sum(dim=1).tolist() == [N] * 2  # a left-padded batch
    plan = inllm.plan(method, N, {"positions": positions}, 4, N)
    assert plan.keep == N
    pruned = llava.generate_ids_pruned(model, processor, prompts, visual, 5, plan)
    assert torch.equal(pruned.ids, reference.ids)
    assert pruned.new_tokens == reference.new_tokens and pruned.text_tokens == reference.text_tokens


@pytest.mark.parametrize(
    ("method", "positions"), [("fastv", "original"), ("fastv", "renumbered"), ("dart", "original")]
)
def test_pruned_batch_generates_what_each_row_does_alone(loaded, method, positions):
    model, processor, prompts, visual = loaded
    plan = inllm.plan(method, 12, {"budget_mode": "kept", "positions": positions}, 4, N)
    eos, pad = model.generation_config.eos_token_id, processor.tokenizer.pad_token_id
    batch = inllm.generate_pruned(model, *llava.splice_with_image_mask(model, processor.tokenizer, prompts, visual),
                                  plan, 4, eos, pad)  # fmt: skip
    assert batch.kept.shape == (2, 12)
    for row, (prompt, tokens) in enumerate(zip(prompts, visual)):
        one = llava.splice_with_image_mask(model, processor.tokenizer, [prompt], [tokens])
        alone = inllm.generate_pruned(model, *one, plan, 4, eos, pad)
        assert torch.equal(batch.ids[row, : alone.ids.shape[1]], alone.ids[0])
        assert torch.equal(alone.kept[0], batch.kept[row])
    # what target_recall scores: the patches of the tokens the last layers keep, one each for a selection
    generation = llava.generate_ids_pruned(model, processor, prompts, visual, 4, plan)
    assert generation.pruned_sources.shape == (2, 12, N)
    for row in range(2):
        assert generation.pruned_sources[row].nonzero()[:, 1].tolist() == batch.kept[row].tolist()


def test_eager_attention_gets_additive_masks_and_the_same_ids(loaded):
    model, processor, prompts, visual = loaded
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        reference = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=3)
        plan = inllm.plan("fastv", N, {}, 4, N)
        assert torch.equal(llava.generate_ids_pruned(model, processor, prompts, visual, 3, plan).ids, reference.ids)
    finally:
        language_model.set_attn_implementation("sdpa")
    mask = inllm.causal_mask(torch.tensor([[False, True, True]]), 3, "eager", torch.float32)
    assert mask.dtype == torch.float32 and mask[0, 0, 2].tolist() == [torch.finfo(torch.float32).min, 0.0, 0.0]
    assert inllm.causal_mask(torch.tensor([[False, True]]), 2, "sdpa", torch.float32)[0, 0].tolist() == [
        [True, False],  # a padding query attends to itself only (no all-masked row)
        [False, True],
    ]
    with pytest.raises(NotImplementedError, match="flash_attention_2"):
        inllm.causal_mask(torch.tensor([[True]]), 1, "flash_attention_2", torch.float32)


def test_fastv_keeps_the_tokens_eager_attention_ranks_first(loaded):
    """The tokens FastV keeps are the top 2 of the last prompt token's head-averaged attention at layer K-1 in an
    eager forward of the full prompt (the reference's source of weights), though the loop runs on SDPA."""
    model, processor, prompts, visual = loaded
    plan = inllm.plan("fastv", 2, {"budget_mode": "kept"}, 4, N)
    inputs, mask, image_mask = llava.splice_with_image_mask(model, processor.tokenizer, prompts[:1], visual[:1])
    kept = inllm.generate_pruned(model, inputs, mask, image_mask, plan, 1).kept
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        attentions = language_model(inputs_embeds=inputs, attention_mask=mask, output_attentions=True).attentions
    finally:
        language_model.set_attn_implementation("sdpa")
    last_row = attentions[plan.layer - 1][0].mean(dim=0)[-1]  # [L]
    expected = last_row[image_mask[0]].topk(2).indices.sort().values
    assert kept[0].tolist() == expected.tolist()


def test_fastv_run_through_the_pipeline_records_its_per_layer_tokens(tiny_model_dir, run_in_llm_method):
    from vtc.pipeline.efficiency import predicted_cost

    # budget 400 = the layer average on the 4-layer model: layers 0, 1 see 576, layers 2, 3 see (4*400 - 2*576)/2
    metrics, manifest, _ = run_in_llm_method("fastv", 400, {})
    assert manifest["num_tokens"] == [576]  # the LLM gets every token; it prunes them itself
    assert metrics["in_llm"]["visual_tokens_per_layer"] == [576, 576, 224, 224]
    assert metrics["in_llm"]["visual_tokens_after_pruning"] == 224 and metrics["in_llm"]["prune_layer"] == 2
    assert metrics["in_llm"]["visual_tokens_layer_avg"] == 400 and metrics["in_llm"]["positions"] == "original"
    assert metrics["attn_implementation"] == "sdpa" and metrics["vision_tower_calls"] == 0
    assert metrics["cost"]["kind"] == "in-LLM" and metrics["cost"]["visual_tokens_per_layer"] == [576, 576, 224, 224]
    assert metrics["cost"]["visual_tokens_layer_avg"] == 400
    text_mean = metrics["cost"]["text_tokens_mean"]
    pre_llm = predicted_cost(model_cfg_text(tiny_model_dir), "float32", 576, text_mean, 1, "H100")
    assert metrics["cost"]["prefill_flops"] < pre_llm["prefill_flops"]  # fewer tokens in layers 2, 3 than `full`


def model_cfg_text(path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).text_config


def test_tables_count_an_in_llm_run_at_its_layer_average():
    from vtc.pipeline.aggregate import visual_tokens

    assert visual_tokens({"num_visual_tokens": [576], "in_llm": {"visual_tokens_layer_avg": 191.625}}) == 192
    assert visual_tokens({"num_visual_tokens": [64]}) == 64


def test_explicit_renumbered_positions_generate_what_generate_ids_does(loaded):
    """The loop with explicit positions (`positions: original` of pre-LLM methods) gives `generate_ids`' greedy ids
    when the positions are the renumbered ones, in a left-padded batch whose rows stop at EOS at different steps."""
    model, processor, prompts, visual = loaded
    free = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=6)
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [eos, free.ids[0, 2].item()]  # row 0 now stops after 3 tokens
    try:
        reference = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=6)
        embeds, mask, _ = llava.splice_with_image_mask(model, processor.tokenizer, prompts, visual)
        renumbered = inllm.padded_positions(mask.bool())
        pad = processor.tokenizer.pad_token_id
        ids = inllm.generate_at_positions(model, embeds, mask, renumbered, 6, model.generation_config.eos_token_id, pad)
        # every token its own patch, in order: the original positions are the renumbered ones
        identity = [torch.eye(N, dtype=torch.bool)] * len(prompts)
        original = llava.generate_ids_original_positions(model, processor, prompts, visual, identity, 6)
    finally:
        model.generation_config.eos_token_id = eos
    assert reference.new_tokens[0] == 3 < reference.ids.shape[1]
    assert torch.equal(ids, reference.ids) and torch.equal(original.ids, reference.ids)
    assert original.new_tokens == reference.new_tokens and original.text_tokens == reference.text_tokens


def test_a_merged_token_sits_at_its_sources_rounded_mean_index():
    sources = torch.zeros(4, 50, dtype=torch.bool)
    sources[0, 7] = True  # selected: its patch
    sources[1, [2, 3]] = True  # mean 2.5: rounded half up
    sources[2, [0, 1, 24, 25]] = True  # a 2 × 2 pooling window of a 24-wide grid: 12.5
    sources[3, [4, 5, 9]] = True  # 6
    assert llava.source_positions(sources).tolist() == [7, 3, 13, 6]
    with pytest.raises(ValueError, match="at least one source patch"):
        llava.source_positions(torch.zeros(1, 50, dtype=torch.bool))


def test_original_positions_are_the_unreduced_prompt_positions_the_decoder_layers_get(loaded):
    """Hand-made case: 3 of N = 40 tokens fed in score order, one merged; the rotary embedding gets the gapped ids."""
    model, processor, prompts, visual = loaded
    sources = torch.zeros(3, N, dtype=torch.bool)
    sources[0, 7] = True
    sources[1, [2, 3]] = True  # → 3
    sources[2, 30] = True
    tokens = [v[:3] for v in visual]
    embeds, mask, image_mask = llava.splice_with_image_mask(model, processor.tokenizer, prompts, tokens)
    ids = [processor.tokenizer(p)["input_ids"] for p in prompts]
    before = [i.index(model.config.image_token_id) for i in ids]  # text tokens before the image
    after = [len(i) - b - 1 for i, b in zip(ids, before)]
    expected = []
    for b, a in zip(before, after):  # each row from its first valid token, as model.generate counts
        expected.append(list(range(b)) + [b + 7, b + 3, b + 30] + list(range(b + N, b + N + a)))
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    try:
        llava.generate_ids_original_positions(model, processor, prompts, tokens, [sources] * 2, max_new_tokens=3)
    finally:
        hook.remove()
    valid = mask.bool()
    assert [seen[0][row][valid[row]].tolist() for row in range(2)] == expected
    assert image_mask.sum(dim=1).tolist() == [3, 3] and (~valid).any()  # left padding
    # the decode steps continue from each row's last prompt position: b + N + a, then + 1
    decoded = [[b + N + a + step for b, a in zip(before, after)] for step in (0, 1)]
    assert [positions[:, 0].tolist() for positions in seen[1:]] == decoded


def test_fastv_runs_on_llava_next_through_the_pipeline(shapes_dir, tmp_path):
    """LLaVA-NeXT's `generate_pruned` from the pipeline: the plan is made for the LLM's image block (the image's N
    tokens and its high-resolution rows' newlines), and target recall is scored on the tokens the last layers keep."""
    import json

    from vtc.models.tiny_llava_next import build
    from vtc.pipeline.encode import encode_dataset, expected_encode_key
    from vtc.pipeline.evaluate import generate_predictions
    from vtc.pipeline.prepare import prepare_dataset
    from vtc.pipeline.reduce import reduce_dataset

    model_cfg = {"path": str(build(tmp_path / "tiny-next")), "dtype": "float32", "device": "cpu",
                 "attn_implementation": "sdpa", "family": "llava_next"}  # fmt: skip
    dataset = tmp_path / "shapes.parquet"
    prepare_dataset("shapes", str(shapes_dir), "test", None, 4, 0, dataset)
    encode_dataset(dataset, model_cfg, tmp_path / "encode", batch_size=4, shard_size=8)
    manifest = reduce_dataset(tmp_path / "encode", expected_encode_key(model_cfg), "fastv", 200, {}, 0, tmp_path / "r")
    predictions, stats_path = tmp_path / "0.jsonl", tmp_path / "0.json"
    stats = generate_predictions(dataset, "shapes", tmp_path / "r", model_cfg, 4, 0, 1, predictions, stats_path)
    (n,) = set(manifest["num_tokens"])  # the shapes images share one size: one block length
    [(count, entry)] = stats["in_llm"].items()  # the plan per image block length, and the questions it answered
    record = entry["record"]
    block, *_, keep = record["visual_tokens_per_layer"]
    assert int(count) == block > n and entry["questions"] == 4  # the newlines are in the block the method prunes
    assert record["visual_tokens_per_layer"] == [block, block, keep, keep] and keep == (4 * 200 - 2 * block) // 2
    assert stats["vision_tower_calls"] == 0 and stats["n"] == 4
    recalls = [json.loads(line)["target_recall"] for line in predictions.read_text().splitlines()]
    assert len(recalls) == 4 and all(r is None or 0 <= r <= 1 for r in recalls) and any(r is not None for r in recalls)
