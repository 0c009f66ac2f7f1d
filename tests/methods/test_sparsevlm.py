import math

import pytest
import torch

from vtc.methods import HparamError, LayerState, Selection, get_method, in_llm, method_stage
from vtc.methods.sparsevlm import (
    align_tail,
    density_peak_clusters,
    recycle_counts,
    sparsevlm_select,
    text_raters,
)
from vtc.models import inllm, llava
from vtc.pipeline.evaluate import in_llm_record


def test_text_raters_are_the_text_tokens_after_the_image_above_the_mean_relevance():
    # Row 0: position 0 system text, 1..2 image v1 = (1, 0), v2 = (0, 1), 3..5 text t3 = (2, 0), t4 = (0, 2), t5 = 0.
    # softmax over t3, t4, t5 of v1·t = (2, 0, 0) is (e², 1, 1) / (e² + 2), of v2·t = (0, 2, 0) is (1, e², 1) / (e²+2);
    # mean over v1, v2: t3 = t4 = (e² + 1) / (2(e² + 2)) = 0.447, t5 = 1 / (e² + 2) = 0.107; mean 1/3 -> raters t3, t4.
    # Position 0 is text before the image: never a rater, however relevant.
    prompt = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    relevant = (math.e**2 + 1) / (2 * (math.e**2 + 2))
    assert relevant > 1 / 3 > 1 / (math.e**2 + 2)
    # Row 1: the same behind one position of left padding, its last text token cut (t3, t4 alone: equally relevant,
    # none above the mean, so both rate).
    row1 = torch.cat([torch.zeros(1, 2), prompt[:5]])
    raters = text_raters(torch.stack([prompt, row1]), torch.tensor([[1, 2], [2, 3]]))
    assert raters.tolist() == [[False] * 3 + [True, True, False], [False] * 4 + [True, True]]


def test_raters_map_to_the_current_sequence_by_its_tail():
    # the prompt had 6 positions, the sequence after pruning 4: the last 4 columns are the same tokens
    assert align_tail(torch.tensor([[False, True, False, False, True, True]]), 4).tolist() == [
        [False, False, True, True]
    ]
    assert align_tail(torch.tensor([[True, False]]), 3).tolist() == [[False, True, False]]


def test_recycling_counts_are_the_references():
    # LLaVA-1.5 "192": 576 -> 300 prunes 276: int(0.3 * 276) + 1 = 83 recycled, int(83 / 10) + 1 = 9 merged tokens;
    # 309 -> 200 prunes 109: 33 and 4; 204 -> 110 prunes 94: 29 and 3
    assert [recycle_counts(p) for p in (276, 109, 94)] == [(83, 9), (33, 4), (29, 3)]
    assert recycle_counts(0) == (0, 0) and recycle_counts(50, recycle=0) == (0, 0)
    assert recycle_counts(1) == (1, 1) and recycle_counts(4, recycle=1.0, cluster_size=1) == (4, 4)


def test_density_peaks_pick_dense_isolated_centres():
    # 1-D tokens (C = 1, so distances are plain) at 0, 0.1, 0.3 and 5, 5.2, 5.35; 3 clusters, density from the 3 nearest
    # (itself included): exp(-mean d²) with mean d² 0.033, 0.017, 0.043, 0.054, 0.021, 0.048.
    # Distance to the nearest denser token: token 1 (densest) the largest, 5.35; token 4: 5.1 (to token 1);
    # token 2: 0.2; token 3: 0.2; token 5: 0.15; token 0: 0.1. Times density: 1 (5.26), 4 (4.99), 2 (0.1915), 3 (0.1895), ...
    # Centres 1, 4, 2 are clusters 0, 1, 2; tokens 0 -> 1 (0.1), 3 and 5 -> 4.
    tokens = torch.tensor([0.0, 0.1, 0.3, 5.0, 5.2, 5.35])[None, :, None]
    assert density_peak_clusters(tokens, 3).tolist() == [[0, 0, 2, 1, 1, 1]]
    assert density_peak_clusters(tokens, 1).tolist() == [[0] * 6]


def test_stage_keeps_the_best_scored_and_merges_the_best_pruned():
    # 6 image tokens scored 0.1, 0.5, 0.05, 0.3, 0.2, 0.0; keep 2 -> tokens 1 and 3. 4 pruned: int(0.3 * 4) + 1 = 2
    # recycled, the best scored of them (tokens 4 and 0), into int(2 / 10) + 1 = 1 token, their mean.
    scores = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.2, 0.0]])
    tokens = torch.arange(12.0).view(1, 6, 2)
    selection = sparsevlm_select(scores, tokens, 2)
    assert selection.kept.tolist() == [[1, 3]]
    assert torch.equal(selection.merged, ((tokens[:, 4] + tokens[:, 0]) / 2)[:, None])
    assert selection.members.tolist() == [[[True, False, False, False, True, False]]]
    # keep all: nothing pruned, nothing added; recycle 0: pruned tokens are dropped
    everything = sparsevlm_select(scores, tokens, 6)
    assert everything.kept.tolist() == [list(range(6))] and everything.merged.shape == (1, 0, 2)
    assert sparsevlm_select(scores, tokens, 2, recycle=0).members.shape == (1, 0, 6)


def test_sparsevlm_scores_with_the_raters_attention():
    # 1 row: 0 system, 1..3 image, 4..5 text; the raters (from the prompt) are 4 and 5 (equally relevant: both rate).
    prompt = torch.tensor([[[1.0], [0.0], [0.0], [0.0], [1.0], [1.0]]])
    asked = []

    def attention(rows):
        asked.append(rows)
        return torch.tensor([[0.0, 0.2, 0.5, 0.3, 0.0, 0.0]])

    state = LayerState(
        hidden=torch.arange(6.0).view(1, 6, 1), normed=None, keys=None, last_attention=None,
        image=torch.tensor([[1, 2, 3]]), text=None, valid=torch.ones(1, 6, dtype=torch.bool), attention=attention,
        prompt=prompt, prompt_image=torch.tensor([[1, 2, 3]]),
    )  # fmt: skip
    selection = get_method("sparsevlm")(state, 1, layer=3)
    assert asked[0].tolist() == [[False] * 4 + [True, True]]
    # keeps image token 1 (0.5); 2 pruned -> 1 recycled (token 2, 0.3, the hidden state 3.0), 1 merged token
    assert isinstance(selection, Selection) and selection.kept.tolist() == [[1]]
    assert selection.merged.tolist() == [[[3.0]]] and selection.members.tolist() == [[[False, False, True]]]


def test_reference_schedules_and_their_per_layer_counts():
    assert method_stage("sparsevlm") == "llm" and in_llm("sparsevlm").positions == "renumbered"
    # "192" on LLaVA-1.5-7B (32 layers): stages at K = 3, 7, 16 (pruning_loc 2, 6, 15) select 300, 200, 110 and add
    # 9, 4, 3 (test above): layers 0-2 see 576, 3-6 309, 7-15 204, 16-31 113; average 6608 / 32 = 206.5
    plan = inllm.plan("sparsevlm", 192, {}, 32, 576)
    assert [(s.layer, s.keep, s.merged) for s in plan.stages] == [(3, 300, 9), (7, 200, 4), (16, 110, 3)]
    assert plan.per_layer == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16 and plan.layer_average == 206.5
    assert (plan.layer, plan.keep, plan.positions) == (3, 113, "renumbered")
    # "128": 303 + 9, 110 + 7, 36 + 3; "64": 66 + 16, 30 + 2, 17 + 1
    assert inllm.plan("sparsevlm", 128, {}, 32, 576).per_layer[2:] == [576] + [312] * 4 + [117] * 9 + [39] * 16
    assert inllm.plan("sparsevlm", 64, {}, 32, 576).layer_average == (3 * 576 + 4 * 82 + 9 * 32 + 16 * 18) / 32
    # an explicit schedule on 4 layers: 576 -> 100 (+15: 476 pruned, 143 recycled), then at layer 3 115 -> 50 (+3)
    explicit = inllm.plan("sparsevlm", 100, {"layers": [1, 3], "keep": [100, 50]}, 4, 576)
    assert explicit.per_layer == [576, 115, 115, 53]
    record = in_llm_record(explicit)
    assert record["stages"] == [{"layer": 1, "kept": 100, "added": 15}, {"layer": 3, "kept": 50, "added": 3}]
    assert record["visual_tokens_per_layer"] == [576, 115, 115, 53] and record["prune_layer"] == 1


def test_fitted_schedules_meet_the_budget():
    # layer average 300 on 4 layers: (576 + 332 + 187 + 105) / 4 = 300
    fit = inllm.plan("sparsevlm", 300, {"layers": [1, 2, 3], "keep": "fit"}, 4, 576)
    assert fit.per_layer == [576, 332, 187, 105] and fit.layer_average == 300
    kept = inllm.plan("sparsevlm", 64, {"layers": [1, 2, 3], "keep": "fit", "budget_mode": "kept"}, 4, 576)
    assert kept.per_layer[0] == 576 and kept.per_layer[-1] == 64 and kept.per_layer == sorted(kept.per_layer)[::-1]
    # the whole budget: nothing pruned; no recycling: original positions allowed
    assert inllm.plan("sparsevlm", 40, {"layers": [1, 2], "keep": "fit"}, 4, 40).per_layer == [40] * 4
    assert inllm.plan("sparsevlm", 400, {"layers": [2], "keep": "fit", "recycle": 0, "positions": "original"}, 4, 576)


@pytest.mark.parametrize(
    ("hparams", "budget", "key", "message"),
    [
        ({}, 192, "layers", "layers must be increasing layers between 1 and 3"),
        ({"layers": [2, 2]}, 192, "layers", "got [2, 2]"),
        ({"layers": [1, 2, 3]}, 192, "keep", "the reference's lists are for budgets 192, 128, 64"),
        ({"layers": [1, 2], "keep": [100]}, 192, "keep", "one count per layer"),
        ({"layers": [1, 2], "keep": [100, 200]}, 192, "keep", "selects more than"),
        ({"layers": [2, 3], "keep": "fit"}, 192, None, "between 292.75 and 576"),
        ({"layers": [1, 2], "keep": [100, 50], "budget_mode": "kept"}, 64, "budget_mode", "needs keep: fit"),
        ({"layers": [1], "keep": [10], "positions": "original"}, 64, "positions", "use positions: renumbered"),
        ({"layers": [1], "keep": [10], "recycle": 1.5}, 64, "recycle", "between 0 and 1"),
        ({"layers": [1], "keep": [10], "cluster_size": 0}, 64, "cluster_size", "positive integer"),
        ({"layer": 2}, 64, "layer", "has no hyperparameter 'layer'"),
    ],
)
def test_impossible_schedules_name_their_key(hparams, budget, key, message):
    with pytest.raises(HparamError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        inllm.plan("sparsevlm", budget, hparams, 4, 576)
    assert error.value.key == key


def test_stage_order_lays_out_kept_then_added_tokens_where_the_image_was():
    # row 0: image at 2..5 of 8, keep image tokens 1, 3 (positions 3, 5), one added token (index 8), then 6, 7;
    # row 1 (one more position of padding): image at 3..6, keep 0, 2 (positions 3, 5), added 8, then 7
    order = inllm.stage_order(torch.tensor([[2, 3, 4, 5], [3, 4, 5, 6]]), torch.tensor([[1, 3], [0, 2]]), 1, 8)
    assert order.tolist() == [[0, 1, 3, 5, 8, 6, 7], [0, 1, 2, 3, 5, 8, 7]]
    assert inllm.stage_order(torch.tensor([[2, 3, 4, 5]]), torch.zeros(1, 0, dtype=torch.long), 2, 8).tolist() == [
        [0, 1, 8, 9, 6, 7]
    ]


N = 40  # visual tokens per row, as tests/pipeline/test_inllm.py


def test_keeping_every_token_generates_what_hf_generate_does(loaded):
    model, processor, prompts, visual = loaded
    reference = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=5)
    plan = inllm.plan("sparsevlm", N, {"layers": [1, 2, 3], "keep": [N, N, N]}, 4, N)
    assert plan.per_layer == [N] * 4
    pruned = llava.generate_ids_pruned(model, processor, prompts, visual, 5, plan)
    assert torch.equal(pruned.ids, reference.ids)


def test_pruned_and_recycled_batch_generates_what_each_row_does_alone(loaded):
    model, processor, prompts, visual = loaded
    # 40 -> 20 (+ 1 merged: 20 pruned, 7 recycled), then 21 -> 10 (+ 1: 11 pruned, 4 recycled), then 11 -> 6 (+ 1)
    plan = inllm.plan("sparsevlm", 0, {"layers": [1, 2, 3], "keep": [20, 10, 6]}, 4, N)
    assert plan.per_layer == [40, 21, 11, 7]
    eos, pad = model.generation_config.eos_token_id, processor.tokenizer.pad_token_id
    spliced = llava.splice_with_image_mask(model, processor.tokenizer, prompts, visual)
    assert (spliced[1] == 0).any()  # a left-padded batch
    batch = inllm.generate_pruned(model, *spliced, plan, 4, eos, pad)
    assert batch.kept.shape == (2, 6) and batch.sources.shape == (2, 7, N)
    # every visual token covers its own patches (a merged one, kept or added, several), no patch is covered twice
    assert (batch.sources.sum(dim=-1) >= 1).all() and (batch.sources.sum(dim=1) <= 1).all()
    assert (batch.sources[:, 6].sum(dim=-1) > 1).all()  # the last stage's merged token: 2 recycled tokens or more
    for row, (prompt, tokens) in enumerate(zip(prompts, visual)):
        one = llava.splice_with_image_mask(model, processor.tokenizer, [prompt], [tokens])
        alone = inllm.generate_pruned(model, *one, plan, 4, eos, pad)
        assert torch.equal(batch.ids[row, : alone.ids.shape[1]], alone.ids[0])
        assert torch.equal(alone.kept[0], batch.kept[row]) and torch.equal(alone.sources[0], batch.sources[row])


def test_first_stage_keeps_what_eager_attention_of_the_raters_ranks_first(loaded):
    """The raters' head-averaged attention at layer K-1 in an eager forward of the full prompt (the reference's source
    of weights), averaged over the raters, ranks first the tokens the loop keeps on SDPA."""
    model, processor, prompts, visual = loaded
    plan = inllm.plan("sparsevlm", 0, {"layers": [2], "keep": [5], "recycle": 0}, 4, N)
    inputs, mask, image_mask = llava.splice_with_image_mask(model, processor.tokenizer, prompts[1:], visual[1:])
    kept = inllm.generate_pruned(model, inputs, mask, image_mask, plan, 1).kept
    language_model = model.model.language_model
    language_model.set_attn_implementation("eager")
    try:
        attentions = language_model(inputs_embeds=inputs, attention_mask=mask, output_attentions=True).attentions
    finally:
        language_model.set_attn_implementation("sdpa")
    image = image_mask.nonzero()[:, 1][None]
    raters = text_raters(inputs, image)[0]
    scores = attentions[1][0].mean(dim=0)[raters].mean(dim=0)[image_mask[0]]  # layer K-1 = 1
    assert kept[0].tolist() == scores.topk(5).indices.sort().values.tolist()


def test_sparsevlm_run_through_the_pipeline_records_its_stages(run_in_llm_method):
    # the shapes-zoo setting at 64: 576 -> 272 (+10), 282 -> 128 (+5), 133 -> 61 (+3)
    metrics, manifest, _ = run_in_llm_method("sparsevlm", 64, {"layers": [1, 2, 3], "keep": "fit", "budget_mode": "kept"})
    assert manifest["num_tokens"] == [576]  # the LLM gets every token; its hyperparameters are the loop's
    assert (
        metrics["in_llm"]["visual_tokens_per_layer"]
        == [576, 282, 133, 64]
        == metrics["cost"]["visual_tokens_per_layer"]
    )
    assert metrics["in_llm"]["stages"] == [
        {"layer": 1, "kept": 272, "added": 10},
        {"layer": 2, "kept": 128, "added": 5},
        {"layer": 3, "kept": 61, "added": 3},
    ]
    assert metrics["in_llm"]["positions"] == "renumbered" and metrics["in_llm"]["visual_tokens_after_pruning"] == 64
