from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.cluster_agglomerative import grid_adjacency

agglomerative = get_method("cluster_agglomerative")
VARIANTS = [
    {"linkage": linkage, "distance": distance, "connectivity": connectivity}
    for linkage, distance, connectivity in itertools.product(["ward", "average"], ["l2", "cosine"], [False, True])
]


def members(reduced, b=0):
    return [row.nonzero().flatten().tolist() for row in reduced.sources[b]]


def line(values):
    return torch.tensor(values)[None, :, None]


# 1 × 6 patches on a line: the pairs {0, 2} (0.1 apart), {1, 3} (0.5) and {4, 5} (1.5) are far from each other.
PAIRS = [0.0, 10.0, 0.1, 10.5, 30.0, 31.5]


@pytest.mark.parametrize("linkage", ["ward", "average"])
def test_merges_the_obvious_pairs_closest_first(make_tokens, linkage):
    tokens = make_tokens(projected=line(PAIRS), grid=(1, 6))
    # Clusters are fed by mean member index, ties ({0, 2} and {1} both 1) by first member.
    assert members(agglomerative(tokens, 5, linkage=linkage)) == [[0, 2], [1], [3], [4], [5]]
    assert members(agglomerative(tokens, 4, linkage=linkage)) == [[0, 2], [1, 3], [4], [5]]
    three = agglomerative(tokens, 3, linkage=linkage)
    assert members(three) == [[0, 2], [1, 3], [4, 5]]
    torch.testing.assert_close(three.tokens[0, :, 0], torch.tensor([0.05, 10.25, 30.75]))


def test_ward_and_average_disagree_where_ward_penalises_size(make_tokens):
    # A tight group A = {0, 1, 2, 3} near 0, x = 2 (patch 4), y = 4.2 (patch 5). Average linkage: A is 1.985 from
    # x on average, x is 2.2 from y, so x joins A. Ward: merging x into A raises the sum of squares by
    # 4 · 1 / 5 · 1.985² ≈ 3.15, merging x and y by 1 / 2 · 2.2² = 2.42, so x joins y.
    tokens = make_tokens(projected=line([0.0, 0.01, 0.02, 0.03, 2.0, 4.2]), grid=(2, 3))
    assert members(agglomerative(tokens, 2, linkage="ward")) == [[0, 1, 2, 3], [4, 5]]
    assert members(agglomerative(tokens, 2, linkage="average")) == [[0, 1, 2, 3, 4], [5]]


@pytest.mark.parametrize("linkage", ["ward", "average"])
def test_cosine_groups_by_direction(make_tokens, linkage):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    projected = torch.stack([a, b, 5 * a, 5 * b, 10 * a, 10 * b])[None]
    reduced = agglomerative(make_tokens(projected=projected, grid=(2, 3)), 2, linkage=linkage, distance="cosine")
    assert members(reduced) == [[0, 2, 4], [1, 3, 5]]
    torch.testing.assert_close(reduced.tokens[0], torch.tensor([[16 / 3, 0.0], [0.0, 16 / 3]]))


@pytest.mark.parametrize("linkage", ["ward", "average"])
def test_connectivity_merges_only_neighbours(make_tokens, linkage):
    # 0 and 2 are alike, so are 1 and 3, but on a 1 × 4 strip neither pair touches. With connectivity the
    # closest touching pair is {1, 2} (9.9 apart); then 0 is nearer {1, 2} than 3 is (5.05 against 5.15 on
    # average; Ward 2/3 · 5.05² against 2/3 · 5.15²).
    tokens = make_tokens(projected=line([0.0, 10.0, 0.1, 10.2]), grid=(1, 4))
    assert members(agglomerative(tokens, 2, linkage=linkage)) == [[0, 2], [1, 3]]
    assert members(agglomerative(tokens, 3, linkage=linkage, connectivity=True)) == [[0], [1, 2], [3]]
    assert members(agglomerative(tokens, 2, linkage=linkage, connectivity=True)) == [[0, 1, 2], [3]]


def test_grid_adjacency():
    adjacency = grid_adjacency((2, 3))
    # 0 1 2
    # 3 4 5
    expected = {0: [1, 3], 1: [0, 2, 4], 2: [1, 5], 3: [0, 4], 4: [1, 3, 5], 5: [2, 4]}
    assert {p: adjacency[p].nonzero().flatten().tolist() for p in range(6)} == expected


def connected(patches, width):
    patches = set(patches)
    seen, todo = set(), [min(patches)]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        row, col = divmod(p, width)
        for q in (p - width, p + width, p - 1 if col > 0 else -1, p + 1 if col < width - 1 else -1):
            if q in patches:
                todo.append(q)
    return seen == patches


@pytest.mark.parametrize("linkage", ["ward", "average"])
def test_connectivity_gives_connected_regions(make_tokens, linkage):
    reduced = agglomerative(make_tokens(3, (4, 5), 6), 4, linkage=linkage, connectivity=True)
    for b in range(3):
        assert all(connected(cluster, 5) for cluster in members(reduced, b))


@pytest.mark.parametrize("hparams", VARIANTS)
@pytest.mark.parametrize("budget", [1, 5, 20])
def test_sources_partition_and_tokens_are_member_means(make_tokens, hparams, budget):
    tokens = make_tokens(3, (4, 5), 4)
    reduced = agglomerative(tokens, budget, **hparams)
    assert reduced.tokens.shape == (3, budget, 4)
    assert torch.equal(reduced.sources.sum(dim=1), torch.ones(3, 20, dtype=torch.long))
    counts = reduced.sources.sum(dim=-1)
    assert (counts >= 1).all()
    torch.testing.assert_close(reduced.tokens, reduced.sources.float() @ tokens.projected / counts[..., None])


@pytest.mark.parametrize("hparams", VARIANTS)
def test_batch_gives_each_image_its_own_clusters(make_tokens, one_image, hparams):
    tokens = make_tokens(3, (5, 6), 8)
    batched = agglomerative(tokens, 6, **hparams)
    for b in range(3):
        alone = agglomerative(one_image(tokens, b), 6, **hparams)
        assert torch.equal(batched.sources[b], alone.sources[0])
        torch.testing.assert_close(batched.tokens[b], alone.tokens[0], rtol=0, atol=1e-6)


def test_clusters_in_feature_space_but_feeds_projected_means(make_tokens):
    tokens = make_tokens(1, (1, 6), 3)
    tokens = dataclasses.replace(tokens, features=line(PAIRS))
    reduced = agglomerative(tokens, 3, space="features")
    assert members(reduced) == [[0, 2], [1, 3], [4, 5]]
    p = tokens.projected[0]
    torch.testing.assert_close(
        reduced.tokens[0], torch.stack([p[[0, 2]].mean(0), p[[1, 3]].mean(0), p[[4, 5]].mean(0)])
    )


def test_attention_weighted_aggregate(make_tokens):
    attention = torch.tensor([[[0.3, 0.1, 0.1, 0.3, 0.1, 0.1]]])
    tokens = make_tokens(projected=line(PAIRS), cls_attention=attention, grid=(1, 6))
    reduced = agglomerative(tokens, 3, aggregate="attention_weighted")
    # {0, 2}: (0.3 · 0 + 0.1 · 0.1) / 0.4; {1, 3}: (0.1 · 10 + 0.3 · 10.5) / 0.4; {4, 5}: plain mean (equal).
    torch.testing.assert_close(reduced.tokens[0, :, 0], torch.tensor([0.025, 10.375, 30.75]))


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"linkage": "single"}, "linkage"),
        ({"distance": "l1"}, "distance"),
        ({"space": "keys"}, "space"),
        ({"aggregate": "size_weighted"}, "aggregate"),
    ],
)
def test_bad_hyperparameters_are_rejected(make_tokens, hparams, message):
    with pytest.raises(ValueError, match=message):
        agglomerative(make_tokens(1, (2, 2)), 2, **hparams)
