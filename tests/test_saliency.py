"""The saliency study (`vtc.saliency`): recorded rows against eager attention, the comparison functions on hand-worked
cases, and selection by saliency at a layer against FastV."""

import math

import pytest
import torch

from vtc import saliency
from vtc.models import llava

QUESTIONS = ["what color is the square?", "how many circles are there?", "is there a red triangle?"]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    sdpa, processor = llava.load_model(str(tiny_model_dir), device="cpu", attn_implementation="sdpa")
    eager, _ = llava.load_model(str(tiny_model_dir), device="cpu", attn_implementation="eager")
    return sdpa, eager, processor


def spliced(model, processor, questions, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompts = [llava.user_turn(processor, q) for q in questions]
    width = model.config.text_config.hidden_size
    visual = [torch.randn(576, width, generator=generator) for _ in questions]
    embeds, mask, image_mask = llava.splice_with_image_mask(model, processor.tokenizer, prompts, visual)
    rows = saliency.question_rows(processor.tokenizer, prompts, questions, image_mask)
    return embeds, mask, image_mask, rows


def test_question_rows_mark_exactly_the_question_tokens(models):
    sdpa, _, processor = models
    questions = ["what color is the square?", "is there a red triangle?"]  # different lengths: left padding
    embeds, mask, image_mask, rows = spliced(sdpa, processor, questions)
    for row, question in enumerate(questions):
        ids = processor.tokenizer(question, add_special_tokens=False)["input_ids"]
        marked = rows[row].nonzero().flatten()
        assert len(marked) == len(ids)
        assert bool((marked.diff() == 1).all()) and int(marked[0]) > int(image_mask[row].nonzero().max())
        assert not bool((rows & ~mask.bool()).any()) and not bool((rows & image_mask).any())


def test_recorded_rows_equal_eager_attention_weights(models):
    sdpa, eager, processor = models
    embeds, mask, image_mask, rows = spliced(sdpa, processor, QUESTIONS)
    layers = list(range(sdpa.config.text_config.num_hidden_layers))
    recorded = saliency.record_batch(sdpa, embeds, mask, image_mask, rows, layers)
    from vtc.models.inllm import padded_positions

    out = eager.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=padded_positions(mask.bool()), output_attentions=True
    )
    image = image_mask.nonzero()[:, 1].view(len(QUESTIONS), -1)
    for index, weights in enumerate(out.attentions):  # [B, H, L, L]
        for b in range(len(QUESTIONS)):
            last = weights[b, :, -1, image[b]]  # [H, N]
            question = weights[b][:, rows[b]][:, :, image[b]].mean(dim=1)
            torch.testing.assert_close(recorded["last"][b, index], last.mean(dim=0), atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(recorded["question"][b, index], question.mean(dim=0), atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(recorded["head_share"][b, index], last.sum(dim=-1), atol=1e-6, rtol=1e-4)
            p = last / last.sum(dim=-1, keepdim=True)
            expected = -(p * p.log()).sum(dim=-1) / math.log(p.shape[-1])
            torch.testing.assert_close(recorded["head_entropy"][b, index], expected, atol=1e-5, rtol=1e-4)
    # a subset of layers stops the prefill early and gives the same rows
    some = saliency.record_batch(sdpa, embeds, mask, image_mask, rows, [1])
    torch.testing.assert_close(some["last"][:, 0], recorded["last"][:, 1])


def test_spearman_on_hand_worked_cases():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert saliency.spearman(a, a * 10 + 3).item() == pytest.approx(1.0)
    assert saliency.spearman(a, -a).item() == pytest.approx(-1.0)
    # ranks [0,1,2,3] vs [1,0,3,2]: d² = 4 → 1 − 6·4 / (4·15) = 0.6
    assert saliency.spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0])).item() == pytest.approx(0.6)
    # ties share their average rank: [5,5,1] → ranks [1.5,1.5,0]; against [3,2,1] (ranks [2,1,0]) Pearson = √3/2
    assert saliency.spearman(torch.tensor([5.0, 5.0, 1.0]), torch.tensor([3.0, 2.0, 1.0])).item() == pytest.approx(
        math.sqrt(3) / 2
    )
    torch.testing.assert_close(
        saliency.average_ranks(torch.tensor([[5.0, 5.0, 1.0, 7.0]])), torch.tensor([[1.5, 1.5, 0.0, 3.0]], dtype=torch.float64)
    )


def test_layer_correlation_matrix_is_pairwise_spearman():
    maps = torch.rand(3, 4, 50, generator=torch.Generator().manual_seed(0))
    maps[0, 2] = maps[0, 1] ** 2  # a monotone transform: correlation 1
    matrix = saliency.layer_correlation(maps)
    assert matrix.shape == (3, 4, 4)
    for s in range(3):
        for i in range(4):
            for j in range(4):
                assert matrix[s, i, j].item() == pytest.approx(saliency.spearman(maps[s, i], maps[s, j]).item(), abs=1e-6)
    assert matrix[0, 1, 2].item() == pytest.approx(1.0)


def test_topk_overlap_entropy_and_top_share_on_hand_worked_cases():
    a = torch.tensor([9.0, 8.0, 7.0, 1.0, 0.0])
    b = torch.tensor([9.0, 0.0, 7.0, 8.0, 1.0])
    assert saliency.topk_overlap(a, b, 3).item() == pytest.approx(2 / 3)  # {0,1,2} vs {0,2,3}
    assert saliency.topk_overlap(a, b, 1).item() == 1.0
    # ties go to the lower index, as every method's stable sort
    assert saliency.top_indices(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1).tolist() == [1]
    assert saliency.entropy(torch.ones(8)).item() == pytest.approx(1.0)
    assert saliency.entropy(torch.tensor([0.0, 3.0, 0.0, 0.0])).item() == pytest.approx(0.0)
    assert saliency.entropy(torch.tensor([1.0, 1.0, 0.0, 0.0])).item() == pytest.approx(0.5)  # log 2 / log 4
    maps = torch.ones(200)
    maps[:2] = 49.0  # top 1 % of 200 = 2 positions hold 98 of 296
    assert saliency.top_share(maps).item() == pytest.approx(98 / 296)
    assert saliency.top_count(576) == 6
    assert saliency.same_image_pairs(["a", "b", "a", "a"]) == [(0, 2), (0, 3), (2, 3)]


def test_selection_at_a_layer_equals_fastv_there_and_the_recorded_top_k(models):
    """saliency_select at prune layer K gives FastV's answers at K (same row of layer K−1, same ranking) and keeps the
    top-k of the map the saliency pass records for layer K−1."""
    from vtc.models import inllm

    sdpa, _, processor = models
    embeds, mask, image_mask, rows = spliced(sdpa, processor, QUESTIONS, seed=1)
    recorded = saliency.record_batch(sdpa, embeds, mask, image_mask, rows, [0, 1])
    kept = {}
    for layer in (1, 2):
        hparams = {"layer": layer, "budget_mode": "kept"}
        ours = inllm.generate_pruned(sdpa, embeds, mask, image_mask, inllm.plan("saliency_select", 40, hparams, 4, 576), 2)
        fastv = inllm.generate_pruned(sdpa, embeds, mask, image_mask, inllm.plan("fastv", 40, hparams, 4, 576), 2)
        assert torch.equal(ours.ids, fastv.ids) and torch.equal(ours.kept, fastv.kept)
        expected = saliency.top_indices(recorded["last"][:, layer - 1], 40).sort(dim=-1).values
        assert torch.equal(ours.kept, expected)
        kept[layer] = ours.kept
    question = inllm.generate_pruned(
        sdpa, embeds, mask, image_mask, inllm.plan("saliency_select", 40, {"layer": 2, "query": "after_image", "budget_mode": "kept"}, 4, 576), 1
    )
    assert not torch.equal(question.kept, kept[2])  # another query ranks the tokens differently


def test_volatility_and_grounding_rows_on_hand_made_maps():
    """Two questions about one image, two layers: layer 0 puts everything on the targets, layer 1 ranks in reverse."""
    n = 10
    up = torch.arange(1.0, n + 1)  # highest at positions 8, 9
    maps = {
        "last": torch.stack([up, up.flip(0)])[None].repeat(2, 1, 1),  # [S=2, Y=2, N]
        "question": torch.stack([up, up])[None].repeat(2, 1, 1),
        "cls": up.flip(0)[None].repeat(2, 1),
    }
    maps["last"][:, 0] = torch.tensor([0.0] * 8 + [0.5, 0.5])
    info = {"layers": [0, 1], "image_ids": ["a", "a"]}
    rows = saliency.volatility_rows(maps, info, [2], grounded=[1])
    value = {(r["query"], r["layer"], r["versus"], r["metric"], r["k"]): r["value"] for r in rows}
    assert value["last", 0, "layer 1", "topk_overlap", 2] == 0.0  # {8, 9} vs {0, 1}
    assert value["question", 0, "layer 1", "spearman", None] == pytest.approx(1.0)
    assert value["last", 1, "cls", "spearman", None] == pytest.approx(1.0)
    assert value["last", 0, "", "top1pct_share", None] == pytest.approx(0.5)  # top 1 % of 10 = 1 position
    assert value["last", 1, "other question", "spearman", None] == pytest.approx(1.0)
    assert value["random", None, "other question", "topk_overlap", 2] == pytest.approx(0.2)
    assert {r["grounded"] for r in rows if r["layer"] == 1} == {True}
    grounding = saliency.grounding_rows(maps, info, [[8, 9], []], [2, 4], grounded=[1])
    value = {(r["query"], r["layer"], r["metric"], r["k"]): (r["value"], r["n"]) for r in grounding}
    assert value["last", 0, "target_share", None] == (1.0, 1)  # the sample without targets is skipped
    assert value["last", 0, "precision", 4] == (0.5, 1) and value["last", 0, "recall", 4] == (1.0, 1)
    assert value["cls", None, "recall", 2][0] == 0.0
    assert value["random", None, "precision", 2][0] == pytest.approx(0.2) and value["random", None, "recall", 4][0] == pytest.approx(0.4)


def test_a_bad_saliency_setting_stops_before_any_job_and_names_the_key(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "config.yaml").read_text())
    config["models"] = {"tiny": {"path": str(tiny_model_dir), "dtype": "float32", "device": "cpu"}}
    config["saliency"] = {"datasets": ["shapes"], "oracle_layers": [2, 5]}  # the tiny model has 4 layers
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake = Path(sys.executable).parent / "snakemake"
    result = subprocess.run(
        [str(snakemake), "-s", str(repo / "Snakefile"), "-d", str(tmp_path), "-n"],
        capture_output=True, text=True, env={**os.environ, "WANDB_API_KEY": ""}, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "config key 'saliency.oracle_layers': prune layers must lie in 1 … 4" in result.stdout + result.stderr
