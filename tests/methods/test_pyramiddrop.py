import pytest
import torch

from vtc.methods import HparamError, LayerState, get_method, in_llm, method_stage
from vtc.methods.pyramiddrop import fitted_ratio, stage_keeps
from vtc.models import inllm, llava

N = 40  # visual tokens per row of the `loaded` fixture


def test_repository_setting_keeps_half_a_quarter_an_eighth():
    # layers 8, 16, 24 of 32 with λ = 0.5: 576 -> 288 -> 144 -> 72; 8 layers each: (576 + 288 + 144 + 72) / 4 = 270
    plan = inllm.plan("pyramiddrop", 0, {"layers": [8, 16, 24], "ratio": 0.5}, 32, 576)
    assert [(s.layer, s.keep) for s in plan.stages] == [(8, 288), (16, 144), (24, 72)]
    assert plan.layer_average == 270 and plan.positions == "renumbered"
    # the reference truncates int(N * ratio): 10 * 0.3 = 3, 10 * 0.09 = 0.9 -> 0
    assert stage_keeps(10, [0.3, 0.09]) == [3, 0]
    explicit = inllm.plan("pyramiddrop", 0, {"layers": [8, 16, 24], "ratio": [0.5, 0.3, 0.1]}, 32, 576)
    assert [s.keep for s in explicit.stages] == [288, 172, 57]


def test_fitted_lambda_meets_the_layer_average_and_matches_the_authors_recipe_at_64():
    # the authors' recipe for 64 on 32 layers: layers 2, 8, 16 with λ ≈ 0.19 (2·576 + 6·111 + 8·21 + 16·4 = 2050 = 32·64.06)
    ratio = fitted_ratio(64, "layer_average", [2, 8, 16], 32, 576)
    assert 0.185 < ratio < 0.2
    plans = {b: inllm.plan("pyramiddrop", b, {}, 32, 576) for b in (192, 128, 64)}
    assert [s.keep for s in plans[64].stages] == [111, 21, 4]
    for budget, plan in plans.items():
        assert [s.layer for s in plan.stages] == [2, 8, 16]
        assert abs(plan.layer_average - budget) < 0.5
    # the demo model's setting: layer 3 processes exactly the budget, λ³·576 = 64 -> λ = 1/3 -> 192, then 64
    demo = inllm.plan("pyramiddrop", 64, {"layers": [1, 2, 3], "budget_mode": "kept"}, 4, 576)
    assert demo.per_layer[-1] == 64 and demo.per_layer[0] == 576
    assert demo.per_layer[1] >= demo.per_layer[2] >= 64


@pytest.mark.parametrize(
    ("hparams", "budget", "key", "message"),
    [
        ({"layers": [8, 16, 24]}, 128, None, "between 144 and 576"),
        ({"layers": [2, 40]}, 64, "layers", "increasing layers between 1 and 31"),
        ({"ratio": 1.5}, 64, "ratio", "ratio must be fit"),
        ({"ratio": [0.5, 0.6, 0.1]}, 64, "ratio", "non-increasing"),
        ({"ratio": 0.5, "budget_mode": "kept"}, 64, "budget_mode", "needs ratio: fit"),
    ],
)
def test_impossible_schedules_name_their_key(hparams, budget, key, message):
    with pytest.raises(HparamError, match=message) as error:
        inllm.plan("pyramiddrop", budget, hparams, 32, 576)
    assert error.value.key == key


def test_stage_keeps_what_layer_k_attention_of_the_last_token_ranks_first():
    # image at positions 1..4 of a row of 6; the last token's attention under layer K's projections
    asked = []

    def layer_attention(rows):
        asked.append(rows)
        return torch.tensor([[0.1, 0.3, 0.05, 0.3, 0.2, 0.05]])

    state = LayerState(
        hidden=None, normed=None, keys=None, last_attention=torch.zeros(1, 6), image=torch.tensor([[1, 2, 3, 4]]),
        text=None, valid=torch.ones(1, 6, dtype=torch.bool), layer_attention=layer_attention,
    )  # fmt: skip
    # 0.3, 0.05, 0.3, 0.2 over image tokens 0..3: the tie 0/2 keeps both at keep 2, then 3
    assert get_method("pyramiddrop")(state, 2, layer=1).tolist() == [[0, 2]]
    assert get_method("pyramiddrop")(state, 3, layer=1).tolist() == [[0, 2, 3]]
    assert asked[0].tolist() == [[False] * 5 + [True]]  # the last prompt token only
    assert method_stage("pyramiddrop") == "llm" and in_llm("pyramiddrop").positions == "renumbered"


def test_ratio_one_generates_what_hf_generate_does(loaded):
    model, processor, prompts, visual = loaded
    reference = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=5)
    plan = inllm.plan("pyramiddrop", 0, {"layers": [1, 2, 3], "ratio": 1.0}, 4, N)
    assert plan.per_layer == [N] * 4
    assert torch.equal(llava.generate_ids_pruned(model, processor, prompts, visual, 5, plan).ids, reference.ids)


def test_batch_generates_what_each_row_does_alone(loaded):
    model, processor, prompts, visual = loaded
    plan = inllm.plan("pyramiddrop", 0, {"layers": [1, 2, 3], "ratio": [0.5, 0.25, 0.1]}, 4, N)
    assert plan.per_layer == [40, 20, 10, 4]
    eos, pad = model.generation_config.eos_token_id, processor.tokenizer.pad_token_id
    spliced = llava.splice_with_image_mask(model, processor.tokenizer, prompts, visual)
    assert (spliced[1] == 0).any()  # a left-padded batch
    batch = inllm.generate_pruned(model, *spliced, plan, 4, eos, pad)
    assert batch.kept.shape == (2, 4) and batch.sources.shape == (2, 4, N)
    for row, (prompt, tokens) in enumerate(zip(prompts, visual)):
        one = llava.splice_with_image_mask(model, processor.tokenizer, [prompt], [tokens])
        alone = inllm.generate_pruned(model, *one, plan, 4, eos, pad)
        assert torch.equal(batch.ids[row, : alone.ids.shape[1]], alone.ids[0])
        assert torch.equal(alone.sources[0], batch.sources[row])


def test_first_stage_keeps_what_eager_attention_of_layer_k_ranks_first(loaded):
    """The reference ranks with layer K's own weights (rank_layer = layer_idx + 1): the last token's head-averaged row of
    layer K in an eager forward of the full prompt ranks first the tokens the loop keeps at its first stage."""
    model, processor, prompts, visual = loaded
    plan = inllm.plan("pyramiddrop", 0, {"layers": [2], "ratio": [0.125]}, 4, N)
    inputs, mask, image_mask = llava.splice_with_image_mask(model, processor.tokenizer, prompts[1:], visual[1:])
    kept = inllm.generate_pruned(model, inputs, mask, image_mask, plan, 1).kept
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        attentions = language_model(inputs_embeds=inputs, attention_mask=mask, output_attentions=True).attentions
    finally:
        language_model.set_attn_implementation("sdpa")
    scores = attentions[2][0].mean(dim=0)[-1][image_mask[0]]  # layer K = 2, the last prompt token's row
    assert kept[0].tolist() == scores.topk(5).indices.sort().values.tolist()
    layer_k_minus_1 = attentions[1][0].mean(dim=0)[-1][image_mask[0]]
    assert kept[0].tolist() != layer_k_minus_1.topk(5).indices.sort().values.tolist()  # not FastV's row


def test_pyramiddrop_runs_through_the_pipeline(run_in_llm_method):
    metrics, manifest, _ = run_in_llm_method("pyramiddrop", 64, {"layers": [1, 2, 3], "budget_mode": "kept"})
    assert manifest["num_tokens"] == [576]
    assert metrics["in_llm"]["visual_tokens_per_layer"][-1] == 64 == metrics["in_llm"]["visual_tokens_after_pruning"]
    assert [s["layer"] for s in metrics["in_llm"]["stages"]] == [1, 2, 3]
