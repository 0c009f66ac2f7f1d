from __future__ import annotations

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.holov import allocate, region_sizes

holov = get_method("holov")


def kept(reduced, b=0):
    return reduced.sources[b].int().argmax(dim=-1).tolist()


def two_regions(make_tokens, attention):
    # Region 0 (patches 0–3): orthogonal projected tokens, so every similarity variance is 0 and the region scores
    # its mean scaled attention. Region 1 (4–7): four equal tokens, similarities 0 (own, zeroed) and 1 1 1: mean 1,
    # variance (1 + 0) / 3 for each, so the region scores (1 + alpha) × its mean scaled attention.
    projected = torch.cat([torch.eye(4), torch.eye(4)[[0, 0, 0, 0]]])[None]
    return make_tokens(projected=projected, cls_attention=torch.tensor(attention)[None, None], grid=(2, 4))


def test_regions_share_the_budget_by_score_and_keep_their_most_attended_patches(make_tokens):
    # Both regions have mean attention .25. alpha = 1 scores them 250 and 500: weights 1/3 and 2/3 of 4 tokens,
    # 1.33 → 1 and 2.67 → 2, the one left over to region 1: shares 1 and 3. Region 0 keeps its top patch 1 (.4),
    # region 1 its top three by decreasing attention, 6 (.4), 4 (.3), 7 (.2).
    tokens = two_regions(make_tokens, [0.1, 0.4, 0.2, 0.3, 0.3, 0.1, 0.4, 0.2])
    reduced = holov(tokens, 4, regions=2, alpha=1.0)
    assert kept(reduced) == [1, 6, 4, 7]
    assert torch.equal(reduced.tokens[0], tokens.projected[0, [1, 6, 4, 7]])
    assert kept(holov(tokens, 4, regions=2, alpha=1.0, order="spatial")) == [1, 4, 6, 7]
    # alpha = 0: attention alone, equal scores, two tokens each.
    assert kept(holov(tokens, 4, regions=2, alpha=0.0)) == [1, 3, 6, 4]


def test_a_share_above_the_region_size_goes_to_the_other_regions(make_tokens):
    # Region 0 holds nearly all attention (mean .75 against .025): 6 tokens split 5.8 → 5 and 0.19 → 0, the left-over
    # one to region 0: 6 > 4. Region 0 is kept whole, in raster order; its 2 extra tokens go to region 1, whose
    # two most attended patches are 7 (.04) and 6 (.03). (The reference would feed 2 zero vectors instead.)
    tokens = two_regions(make_tokens, [0.9, 0.8, 0.7, 0.6, 0.01, 0.02, 0.03, 0.04])
    assert kept(holov(tokens, 6, regions=2, alpha=0.0)) == [0, 1, 2, 3, 7, 6]


def test_without_any_attention_the_budget_still_fills(make_tokens):
    # All scores 0: the weights are 0, one token each to regions 0 and 1 (equal weights, lower index first), then the
    # 3 missing go to region 0 (score order, ties to the lower index) up to its size: shares 4 and 1.
    tokens = two_regions(make_tokens, [0.0] * 8)
    assert kept(holov(tokens, 5, regions=2)) == [0, 1, 2, 3, 4]


def test_allocation_refills_until_no_region_overflows():
    # Weights .1 .2 .7 of 10: 1 2 7 less a hair → 0 1 6, three left over, one each → 1 2 7 > 4. Region 2 is fixed at
    # 4; the other 6 split by weights 1/3, 2/3: 2 and 4 less a hair → 1 and 3, two left over, one each → 2 and 4.
    shares = allocate(torch.tensor([[1.0, 2.0, 7.0], [7.0, 2.0, 1.0]]), torch.tensor([4, 4, 4]), 10)
    assert shares.tolist() == [[2, 4, 4], [4, 4, 2]]


def test_regions_are_runs_of_consecutive_patches():
    assert region_sizes(576, 16).tolist() == [36] * 16
    assert region_sizes(10, 4).tolist() == [3, 3, 2, 2]
    assert region_sizes(3, 16).tolist() == [1, 1, 1]


def reference_holov(projected, attention, regions, budget, alpha=0.09, eps=1e-6):
    """The reference's `HoloV` for one image, in its own form (loops over regions, topk), returning patch indices."""
    n = projected.shape[0]
    base, extra = divmod(n, regions)
    bounds, start = [], 0
    for p in range(regions):
        size = base + (1 if p < extra else 0)
        if size > 0:
            bounds.append((start, start + size))
        start += size
    scores = []
    for s, e in bounds:
        a = attention[s:e]
        if e - s <= 1:
            scores.append(a.mean())
            continue
        f = projected[s:e] / (projected[s:e].norm(dim=1, keepdim=True) + eps)
        sim = (f @ f.T) * (1 - torch.eye(e - s))
        mean = sim.sum(dim=1) / (e - s - 1)
        var = ((sim - mean[:, None]) ** 2).sum(dim=1) / (e - s - 1)
        a_scaled = a * 1e3
        var_scaled = var * (a_scaled.abs().mean() / (var.abs().mean() + eps))
        scores.append((a_scaled + alpha * var_scaled).mean())
    scores = torch.stack(scores)
    weights = scores / (scores.sum() + eps)
    shares = (weights * budget).floor().long()
    remaining = budget - shares.sum()
    if remaining > 0:
        shares[torch.topk(weights, k=min(remaining.item(), len(weights))).indices[:remaining]] += 1
    keep = []
    for (s, e), share in zip(bounds, shares.tolist()):
        if share >= e - s:
            keep += range(s, e)
        elif share > 0:
            keep += (s + torch.topk(attention[s:e], k=share).indices).tolist()
    return keep


@pytest.mark.parametrize(("budget", "regions"), [(64, 16), (128, 16), (192, 16), (40, 7)])
def test_matches_the_reference_on_llava_sized_inputs(make_tokens, budget, regions):
    tokens = make_tokens(3, (24, 24), 6, generator_seed=budget)
    attention = tokens.cls_attention.float().mean(dim=1)
    reduced = holov(tokens, budget, regions=regions)
    for b in range(3):
        expected = reference_holov(tokens.projected[b], attention[b], regions, budget)
        assert len(expected) == budget  # no region overflows here, so the reference needs no padding
        assert kept(reduced, b) == expected


@pytest.mark.parametrize("budget", [9, 20, 30])
def test_batch_equals_one_at_a_time_with_overflowing_regions(make_tokens, one_image, budget):
    tokens = make_tokens(3, (6, 6), 5)
    # Concentrated attention: at 20 a region overflows in image 1 only, at 30 in every image, at 9 in none.
    attention = tokens.cls_attention**20
    tokens = make_tokens(
        projected=tokens.projected, cls_attention=attention / attention.sum(-1, keepdim=True), grid=(6, 6)
    )
    batched = holov(tokens, budget, regions=5)
    for b in range(3):
        assert torch.equal(batched.sources[b], holov(one_image(tokens, b), budget, regions=5).sources[0])


@pytest.mark.parametrize(("hparams", "key"), [({"regions": 0}, "regions"), ({"order": "score"}, "order")])
def test_bad_hyperparameters_are_rejected(make_tokens, hparams, key):
    with pytest.raises(ValueError, match=key):
        holov(make_tokens(1, (2, 2)), 2, **hparams)


def test_nothing_pruned_is_full(make_tokens):
    tokens = make_tokens(2, (4, 4), 3)
    reduced = holov(tokens, 16)
    assert torch.equal(reduced.tokens, tokens.projected)
    assert torch.equal(reduced.sources, torch.eye(16, dtype=torch.bool).expand(2, -1, -1))
