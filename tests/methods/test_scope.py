from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.scope import saliency_coverage_greedy

scope = get_method("scope")

# Features of 4 patches: 0 and 1 along e1 (duplicates), 2 along e2, 3 halfway between. With r = cos 45° ≈ .707:
#   s = [[1, 1, 0, r], [1, 1, 0, r], [0, 0, 1, r], [r, r, r, 1]].
FEATURES = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
R = math.cos(math.pi / 4)


def similarity():
    unit = FEATURES[0] / FEATURES[0].norm(dim=-1, keepdim=True)
    return (unit @ unit.T)[None]


def kept(reduced, b=0):
    return reduced.sources[b].int().argmax(dim=-1).tolist()


def test_equal_saliency_picks_by_coverage_gain():
    # Step 1 (coverage 0): gains are the column sums 2 + r, 2 + r, 1 + r, 1 + 3r: 3 first; coverage r, r, r, 1.
    # Step 2: 0 and 1 gain 2(1 − r) ≈ .59, 2 gains 1 − r: 0 (the lower of the tie); coverage 1, 1, r, 1.
    # Step 3: 1 gains 0, 2 gains 1 − r: 2. Step 4: 1.
    assert saliency_coverage_greedy(similarity(), torch.ones(1, 4), 4).tolist() == [[3, 0, 2, 1]]


def test_saliency_multiplies_the_gain():
    # Saliency 1 1 3 1: step 1 scores 2 + r, 2 + r, 3(1 + r) ≈ 5.1, 1 + 3r ≈ 3.1: 2 first; coverage 0, 0, 1, r.
    # Step 2: 0 and 1 gain 2, 3 gains 2r + (1 − r) ≈ 1.71: 0. Step 3: 3 gains 1 − r > 0 = 1's gain: 3.
    assert saliency_coverage_greedy(similarity(), torch.tensor([[1.0, 1, 3, 1]]), 3).tolist() == [[2, 0, 3]]


def test_method_uses_features_and_head_summed_attention_and_feeds_raster_order(make_tokens):
    # Heads .1 .1 .9 .1 and .4 .4 .6 .4 sum to 1:1:3 ratios .5 .5 1.5 .5 (their mean would rank the same).
    attention = torch.tensor([[[0.1, 0.1, 0.9, 0.1], [0.4, 0.4, 0.6, 0.4]]])
    tokens = make_tokens(projected=torch.randn(1, 4, 3), cls_attention=attention, grid=(2, 2))
    tokens = dataclasses.replace(tokens, features=FEATURES)
    reduced = scope(tokens, 3)
    assert kept(reduced) == [0, 2, 3]  # picked 2, 0, 3
    assert torch.equal(reduced.tokens[0], tokens.projected[0, [0, 2, 3]])
    # alpha = 0 ignores saliency: picks 3, 0.
    assert kept(scope(tokens, 2, alpha=0.0)) == [0, 3]
    # Budget 2: the first two picks, 2 and 0.
    assert kept(scope(tokens, 2)) == [0, 2]


def reference_scope(features, attention, k, alpha=1.0):
    """The reference's batched `SCOPE` selection in its own form (masked_fill before the gain, argmax)."""
    unit = features / features.norm(dim=-1, keepdim=True)
    sim = unit @ unit.transpose(1, 2)
    batch_size, n = features.shape[:2]
    selected = torch.zeros(batch_size, n, dtype=torch.bool)
    cur_max = torch.zeros(batch_size, n)
    saliency = attention.sum(dim=1) ** alpha
    picks = []
    for _ in range(k):
        gains = torch.maximum(torch.zeros(1), sim.masked_fill(selected[:, None, :], 0) - cur_max[:, :, None]).sum(dim=1)
        best = (gains * saliency).masked_fill(selected, float("-inf")).argmax(dim=1)
        selected[torch.arange(batch_size), best] = True
        picks.append(best)
        cur_max = torch.maximum(cur_max, sim[torch.arange(batch_size), best])
    return torch.stack(picks, dim=1).sort(dim=1).values


@pytest.mark.parametrize(("budget", "alpha"), [(64, 1.0), (192, 1.0), (64, 0.5)])
def test_matches_the_reference_on_llava_sized_inputs(make_tokens, budget, alpha):
    tokens = make_tokens(2, (24, 24), 4, channels=16, generator_seed=budget)
    reduced = scope(tokens, budget, alpha=alpha)
    expected = reference_scope(tokens.features, tokens.cls_attention, budget, alpha)
    assert reduced.sources.int().argmax(dim=-1).tolist() == expected.tolist()


@pytest.mark.parametrize("budget", [5, 30])
def test_batch_equals_one_at_a_time(make_tokens, one_image, budget):
    tokens = make_tokens(3, (6, 6), 5, channels=3)  # few channels: many near-equal similarities
    batched = scope(tokens, budget)
    for b in range(3):
        assert torch.equal(batched.sources[b], scope(one_image(tokens, b), budget).sources[0])


def test_nothing_pruned_is_full(make_tokens):
    tokens = make_tokens(2, (4, 4), 3)
    reduced = scope(tokens, 16)
    assert torch.equal(reduced.tokens, tokens.projected)
    assert torch.equal(reduced.sources, torch.eye(16, dtype=torch.bool).expand(2, -1, -1))
