"""The in-LLM pruning decoder loop (`vtc.models.inllm`) against transformers' own greedy `generate`."""

import pytest
import torch

from vtc.models import inllm, llava

QUESTIONS = ["how many circles are there ?", "where is the circle relative to the green object ?"]
N = 40  # visual tokens per row: small, so the tests stay fast on CPU


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    prompts = [llava.user_turn(processor, q) for q in QUESTIONS]
    g = torch.Generator().manual_seed(0)
    visual = [torch.randn(N, model.config.text_config.hidden_size, generator=g) for _ in QUESTIONS]
    return model, processor, prompts, visual


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
