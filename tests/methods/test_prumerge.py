from __future__ import annotations

import dataclasses

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.prumerge import adaptive_selection, fixed_selection, iqr_outliers

prumerge = get_method("prumerge")
prumerge_plus = get_method("prumerge_plus")


def covered(reduced, b=0):
    return [row.nonzero().flatten().tolist() for row in reduced.sources[b]]


def test_iqr_outliers_on_a_known_spread():
    # Sorted: 1 2 3 4 5 6 7 20 30. With 9 values the quartiles fall on order statistics 2 and 6: Q1 = 3,
    # Q3 = 7, IQR = 4, fence 7 + 1.5 · 4 = 13. Above it: 30 (patch 1) and 20 (patch 6).
    scores = torch.tensor([[3.0, 30, 1, 5, 7, 2, 20, 4, 6]])
    assert iqr_outliers(scores)[0].nonzero().flatten().tolist() == [1, 6]
    # A value exactly on the fence is not an outlier.
    on_fence = torch.tensor([[3.0, 30, 1, 5, 7, 2, 13, 4, 6]])
    assert iqr_outliers(on_fence)[0].nonzero().flatten().tolist() == [1]
    # Sorted 1 2 3 4 5 6 7 8 100: Q1 = 3, Q3 = 7 again; 8 is below the fence of 13, 100 above it.
    assert iqr_outliers(torch.tensor([[100.0, 1, 2, 3, 4, 5, 6, 7, 8]]))[0].nonzero().flatten().tolist() == [0]


def test_quartiles_interpolate_like_numpy():
    # 4 values 0 1 2 10: Q1 at position 0.75 → 0.75, Q3 at 2.25 → 2 + 0.25 · 8 = 4; fence 4 + 1.5 · 3.25 = 8.875.
    assert iqr_outliers(torch.tensor([[10.0, 0, 1, 2]])).tolist() == [[True, False, False, False]]
    # 0 1 2 9: Q3 = 2 + 0.25 · 7 = 3.75, Q1 = 0.75, fence 8.25: 9 is out.
    assert iqr_outliers(torch.tensor([[0.0, 1, 2, 9]])).tolist() == [[False, False, False, True]]
    # 0 1 2 8: fence 3.5 + 1.5 · 2.75 = 7.625: 8 is out; 0 1 2 7: fence 3.25 + 1.5 · 2.5 = 7: 7 is not.
    assert iqr_outliers(torch.tensor([[0.0, 1, 2, 8], [0.0, 1, 2, 7]])).tolist() == [
        [False, False, False, True],
        [False, False, False, False],
    ]


def peaked(peaks: dict[int, float], num_patches: int = 25) -> torch.Tensor:
    # A flat background of 1 has Q1 = Q3 = 1 (while peaks are under a quarter), so the outliers are the peaks.
    scores = torch.ones(1, num_patches)
    for patch, value in peaks.items():
        scores[0, patch] = value
    return scores


def test_adaptive_selection_prumerge_and_plus():
    scores = peaked({8: 5.0, 13: 9.0})
    assert [s.tolist() for s in adaptive_selection(scores)] == [[13, 8]]
    # PruMerge+: 2 outliers of 25, step ⌊⌊25 / 2⌋ / 3⌋ = 4, range(0, 24, 4) = 0 4 8 12 16 20 less 8.
    assert [s.tolist() for s in adaptive_selection(scores, plus=True)] == [[13, 8, 0, 4, 12, 16, 20]]
    # Per image: the second image has no outliers at all.
    both = torch.cat([scores, torch.ones(1, 25)])
    assert [s.tolist() for s in adaptive_selection(both)] == [[13, 8], []]
    assert [s.tolist() for s in adaptive_selection(both, plus=True)] == [[13, 8, 0, 4, 12, 16, 20], []]


def test_adaptive_plus_on_a_tiny_image():
    # One outlier (9, see test_quartiles_interpolate_like_numpy) of 4: step ⌊⌊4 / 1⌋ / 3⌋ = 1, range(0, 3).
    scores = torch.tensor([[0.0, 1, 2, 9]])
    assert [s.tolist() for s in adaptive_selection(scores, plus=True)] == [[3, 0, 1, 2]]


def test_fixed_selection_fills_by_attention_or_uniformly():
    scores = peaked({8: 5.0, 13: 9.0})
    # Attention fill: top-k; the flat background goes to the lowest indices.
    assert fixed_selection(scores, 3, "attention").tolist() == [[13, 8, 0]]
    # Uniform fill of 4 among the 23 others (0..24 less 8, 13): positions ⌊i · 23 / 4⌋ = 0, 5, 11, 17 of that
    # list, i.e. patches 0, 5, 12, 19.
    assert fixed_selection(scores, 6, "uniform").tolist() == [[13, 8, 0, 5, 12, 19]]
    # More outliers than the budget: the most attended ones.
    assert fixed_selection(scores, 1, "uniform").tolist() == [[13]]
    # No outliers: all uniform, ⌊i · 25 / 5⌋ = 0 5 10 15 20.
    assert fixed_selection(torch.ones(1, 25), 5, "uniform").tolist() == [[0, 5, 10, 15, 20]]


def test_fixed_selection_uniform_is_per_image():
    scores = torch.cat([peaked({8: 5.0, 13: 9.0}), torch.ones(1, 25)])
    assert fixed_selection(scores, 6, "uniform").tolist() == [[13, 8, 0, 5, 12, 19], [0, 4, 8, 12, 16, 20]]


def merge_example(make_tokens):
    # One head; attention 0.1 0.2 0.3 0.4. Keys: patch 3 = (1, 0), its nearest is patch 1 = (1, 0.1), then
    # patch 0 = (0, 1) (cosine 0), then patch 2 = (-1, 0). Projected tokens are one-hot, so sums read off.
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    tokens = make_tokens(projected=torch.eye(4)[None], cls_attention=attention, grid=(2, 2))
    keys = torch.tensor([[[0.0, 1.0], [1.0, 0.1], [-1.0, 0.0], [1.0, 0.0]]])
    return dataclasses.replace(tokens, keys=keys)


def test_kept_token_absorbs_its_key_neighbours_weighted_by_attention(make_tokens):
    tokens = merge_example(make_tokens)
    one = prumerge(tokens, 2, neighbours=1)
    # Kept: patch 3 (most attended). It becomes P3 + 0.2 · P1; the summary is 0.1 P0 + 0.2 P1 + 0.3 P2 (unkept).
    torch.testing.assert_close(one.tokens[0], torch.tensor([[0.0, 0.2, 0.0, 1.0], [0.1, 0.2, 0.3, 0.0]]))
    assert covered(one) == [[1, 3], [0, 1, 2]]
    two = prumerge(tokens, 2, neighbours=2)
    torch.testing.assert_close(two.tokens[0, 0], torch.tensor([0.1, 0.2, 0.0, 1.0]))
    assert covered(two) == [[0, 1, 3], [0, 1, 2]]


def test_kept_tokens_may_absorb_each_other_and_order_follows_the_hparam(make_tokens):
    tokens = merge_example(make_tokens)
    # Keep 3, 2, 1 (by attention). Nearest: 3 → 1 (kept), 2 → 0 (cosine 0 beats -0.995 and -1), 1 → 3.
    by_score = prumerge(tokens, 3, neighbours=1, summary_token=False)
    expected = {3: [0.0, 0.2, 0.0, 1.0], 2: [0.1, 0.0, 1.0, 0.0], 1: [0.0, 1.0, 0.0, 0.4]}
    torch.testing.assert_close(by_score.tokens[0], torch.tensor([expected[3], expected[2], expected[1]]))
    assert covered(by_score) == [[1, 3], [0, 2], [1, 3]]
    by_space = prumerge(tokens, 3, neighbours=1, summary_token=False, order="spatial")
    torch.testing.assert_close(by_space.tokens[0], torch.tensor([expected[1], expected[2], expected[3]]))


def test_summary_token_is_last_in_spatial_order_too(make_tokens):
    tokens = merge_example(make_tokens)
    reduced = prumerge(tokens, 3, neighbours=0, order="spatial")
    # Kept 3 and 2, fed as 2, 3, then the summary of 0 and 1.
    torch.testing.assert_close(
        reduced.tokens[0], torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.0, 0.0]])
    )
    assert covered(reduced) == [[2], [3], [0, 1]]


def test_budget_one_is_the_summary_of_everything(make_tokens):
    tokens = merge_example(make_tokens)
    reduced = prumerge(tokens, 1)
    torch.testing.assert_close(reduced.tokens[0], torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert covered(reduced) == [[0, 1, 2, 3]]


def test_plus_keeps_outliers_and_uniform_patches(make_tokens):
    attention = peaked({8: 5.0, 13: 9.0})[:, None, :] / 40
    tokens = make_tokens(1, (5, 5), 3, cls_attention=attention)
    reduced = prumerge_plus(tokens, 7, neighbours=0)
    # 6 kept (see test_fixed_selection...) plus the summary; with no neighbours a kept token is its patch.
    kept = [13, 8, 0, 5, 12, 19]
    assert covered(reduced)[:6] == [[p] for p in kept]
    torch.testing.assert_close(reduced.tokens[0, :6], tokens.projected[0, kept])
    assert torch.equal(prumerge(tokens, 7, neighbours=0, fill="uniform").tokens, reduced.tokens)


@pytest.mark.parametrize("method", [prumerge, prumerge_plus])
@pytest.mark.parametrize("budget", [1, 5, 16])
@pytest.mark.parametrize("summary_token", [True, False])
def test_sources_are_self_plus_neighbours_and_summary_is_the_rest(make_tokens, method, budget, summary_token):
    tokens = make_tokens(3, (4, 4), 5)
    reduced = method(tokens, budget, neighbours=3, summary_token=summary_token)
    assert reduced.tokens.shape == (3, budget, 5)
    kept = budget - 1 if summary_token else budget
    counts = reduced.sources.sum(dim=-1)
    # A kept token covers its own patch and 3 neighbours.
    assert (counts[:, :kept] == 4).all()
    if summary_token:
        # The summary covers the 16 − kept unkept patches; with the kept ones, that is every patch.
        assert (counts[:, -1] == 16 - kept).all()
        assert reduced.sources.any(dim=1).all()


def test_neighbour_count_is_capped(make_tokens):
    reduced = prumerge(make_tokens(2, (2, 2), 3), 2, summary_token=False)
    assert (reduced.sources.sum(dim=-1) == 4).all()


@pytest.mark.parametrize(
    ("hparams", "message"),
    [({"fill": "random"}, "fill"), ({"order": "selection"}, "order"), ({"neighbours": -1}, "neighbours")],
)
def test_bad_hyperparameters_are_rejected(make_tokens, hparams, message):
    with pytest.raises(ValueError, match=message):
        prumerge(make_tokens(1, (2, 2)), 2, **hparams)


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
def test_bfloat16_inputs_are_computed_in_float32(make_tokens, name):
    tokens = make_tokens(2, (6, 6), 5)
    low = dataclasses.replace(
        tokens, **{f: getattr(tokens, f).bfloat16() for f in ("projected", "features", "cls_attention", "keys")}
    )
    high = dataclasses.replace(
        low, **{f: getattr(low, f).float() for f in ("projected", "features", "cls_attention", "keys")}
    )
    reduced, reference = get_method(name)(low, 9), get_method(name)(high, 9)
    assert reduced.tokens.dtype == torch.bfloat16
    assert torch.equal(reduced.sources, reference.sources)
    assert torch.equal(reduced.tokens, reference.tokens.bfloat16())
