from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from vtc.methods import get_method

cluster = get_method("cluster")
VARIANTS = [
    {"init": init, "distance": distance, "space": space}
    for init, distance, space in itertools.product(["kmeans++", "grid"], ["l2", "cosine"], ["projected", "features"])
]


def members(reduced, b=0):
    return [row.nonzero().flatten().tolist() for row in reduced.sources[b]]


@pytest.mark.parametrize("hparams", VARIANTS)
def test_one_cluster_per_token_returns_the_input(make_tokens, hparams):
    tokens = make_tokens(2, (4, 5), 6)
    reduced = cluster(tokens, 20, **hparams)
    # Singleton clusters in order of their (only) member's index: the input itself.
    assert torch.equal(reduced.tokens, tokens.projected)
    assert torch.equal(reduced.sources, torch.eye(20, dtype=torch.bool).expand(2, 20, 20))


# Three well-separated tight blobs on a 3 × 4 grid, by patch (row-major). Mean member indices:
# blob 0 {0, 1, 4, 11} → 4, blob 1 {2, 3, 6, 7} → 4.5, blob 2 {5, 8, 9, 10} → 8: fed in that order.
BLOB_OF_PATCH = [0, 0, 1, 1, 0, 2, 1, 1, 2, 2, 2, 0]
BLOBS = [[0, 1, 4, 11], [2, 3, 6, 7], [5, 8, 9, 10]]
CENTRES = torch.tensor([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, -10.0]])


def blob_tokens(make_tokens, seeds):
    noise = 0.01 * torch.randn(len(seeds), 12, 3, generator=torch.Generator().manual_seed(3))
    return make_tokens(projected=CENTRES[BLOB_OF_PATCH] + noise, grid=(3, 4), seeds=seeds)


def test_recovers_well_separated_blobs(make_tokens):
    tokens = blob_tokens(make_tokens, seeds=list(range(8)))
    reduced = cluster(tokens, 3)
    for b in range(8):
        assert members(reduced, b) == BLOBS
        expected = torch.stack([tokens.projected[b, blob].mean(dim=0) for blob in BLOBS])
        torch.testing.assert_close(reduced.tokens[b], expected)


def test_clusters_in_feature_space_but_feeds_projected_means(make_tokens):
    tokens = make_tokens(2, (3, 4), 5, seeds=[1, 2])
    blobs = CENTRES[BLOB_OF_PATCH] + 0.01 * torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(4))
    tokens = dataclasses.replace(tokens, features=blobs)
    reduced = cluster(tokens, 3, space="features")
    for b in range(2):
        assert members(reduced, b) == BLOBS
        expected = torch.stack([tokens.projected[b, blob].mean(dim=0) for blob in BLOBS])
        torch.testing.assert_close(reduced.tokens[b], expected)


def test_cosine_groups_by_direction_l2_does_not(make_tokens):
    # Patches alternate between directions a = (1, 0) and b = (0, 1), with norms 1, 5 and 10.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    projected = torch.stack([a, b, 5 * a, 5 * b, 10 * a, 10 * b])[None]
    tokens = make_tokens(projected=projected, grid=(2, 3))
    by_direction = cluster(tokens, 2, distance="cosine")
    assert members(by_direction) == [[0, 2, 4], [1, 3, 5]]
    torch.testing.assert_close(by_direction.tokens[0], torch.tensor([[16 / 3, 0.0], [0.0, 16 / 3]]))
    # L2 from the grid seeds 5b and 10b (patches 3, 5): only 10b stays nearer 10b than the mean of the rest
    # ((16, 6) / 5; 5b is 4.97 from it against 5 from 10b).
    by_magnitude = cluster(tokens, 2, distance="l2", init="grid")
    assert members(by_magnitude) == [[0, 1, 2, 3, 4], [5]]


@pytest.mark.parametrize("hparams", VARIANTS)
@pytest.mark.parametrize("budget", [1, 5, 13, 24])
def test_sources_partition_the_patches(make_tokens, hparams, budget):
    reduced = cluster(make_tokens(3, (4, 6), 4), budget, **hparams)
    assert reduced.tokens.shape == (3, budget, 4)
    assert torch.equal(reduced.sources.sum(dim=1), torch.ones(3, 24, dtype=torch.long))
    assert (reduced.sources.sum(dim=2) >= 1).all()


@pytest.mark.parametrize("hparams", VARIANTS)
def test_batch_gives_each_image_its_own_clusters(make_tokens, one_image, hparams):
    # 30 patches: above the 25 rows from which cdist switches to its matrix-product kernel.
    tokens = make_tokens(4, (5, 6), 8, seeds=[3, 4, 5, 3])
    batched = cluster(tokens, 7, **hparams)
    for b in range(4):
        alone = cluster(one_image(tokens, b), 7, **hparams)
        assert torch.equal(batched.sources[b], alone.sources[0])
        torch.testing.assert_close(batched.tokens[b], alone.tokens[0], rtol=0, atol=1e-6)


def test_kmeans_plus_plus_follows_the_seed_and_grid_init_ignores_it(make_tokens):
    def run(seed, init):
        return cluster(make_tokens(1, (6, 6), 4, seeds=[seed]), 6, init=init, iters=2).sources
    assert torch.equal(run(1, "kmeans++"), run(1, "kmeans++"))
    assert any(not torch.equal(run(1, "kmeans++"), run(seed, "kmeans++")) for seed in range(2, 6))
    assert torch.equal(run(1, "grid"), run(2, "grid"))


def test_empty_cluster_takes_the_point_farthest_from_its_centroid(make_tokens):
    # Grid seeds for 2 clusters of a 2 × 2 grid are patches 2 and 3, both 0: every point goes to cluster 0,
    # leaving cluster 1 empty; it takes patch 1 (value 6, the farthest from 0).
    tokens = make_tokens(projected=torch.tensor([[[5.0], [6.0], [0.0], [0.0]]]), grid=(2, 2))
    first = cluster(tokens, 2, init="grid", iters=1)
    # {1} (mean index 1) comes before {0, 2, 3} (mean index 5/3).
    assert members(first) == [[1], [0, 2, 3]]
    torch.testing.assert_close(first.tokens[0, :, 0], torch.tensor([6.0, 5 / 3]))
    # Lloyd then moves patch 0 (5 is nearer 6 than 5/3) and settles.
    settled = cluster(tokens, 2, init="grid")
    assert members(settled) == [[0, 1], [2, 3]]
    torch.testing.assert_close(settled.tokens[0, :, 0], torch.tensor([5.5, 0.0]))


@pytest.mark.parametrize("init", ["kmeans++", "grid"])
@pytest.mark.parametrize("budget", [3, 16])
def test_identical_tokens_still_fill_every_cluster(make_tokens, init, budget):
    reduced = cluster(make_tokens(projected=torch.ones(2, 16, 3), grid=(4, 4)), budget, init=init)
    assert (reduced.sources.sum(dim=2) >= 1).all()
    assert torch.equal(reduced.sources.sum(dim=1), torch.ones(2, 16, dtype=torch.long))
    torch.testing.assert_close(reduced.tokens, torch.ones(2, budget, 3))


def test_equal_mean_positions_go_by_first_member(make_tokens):
    # {0, 3} and {1, 2} both have mean index 1.5.
    tokens = make_tokens(projected=torch.tensor([[[0.0], [10.0], [10.0], [0.0]]]), grid=(1, 4))
    reduced = cluster(tokens, 2)
    assert members(reduced) == [[0, 3], [1, 2]]


@pytest.mark.parametrize(
    ("hparams", "message"),
    [({"space": "keys"}, "space"), ({"init": "random"}, "init"), ({"distance": "l1"}, "distance"), ({"iters": 0}, "iters")],
)
def test_bad_hyperparameters_are_rejected(make_tokens, hparams, message):
    with pytest.raises(ValueError, match=message):
        cluster(make_tokens(1, (2, 2)), 2, **hparams)


def test_attention_weighted_aggregate_weights_members_by_cls_attention(make_tokens):
    tokens = blob_tokens(make_tokens, seeds=[0])
    # Head means: patch 0 gets 0.5, every other patch 0.1 (two heads disagreeing on the split).
    attention = torch.full((1, 2, 12), 0.1)
    attention[0, :, 0] = torch.tensor([0.8, 0.2])
    tokens = dataclasses.replace(tokens, cls_attention=attention)
    reduced = cluster(tokens, 3, aggregate="attention_weighted")
    assert members(reduced) == BLOBS
    p = tokens.projected[0]
    # Blob 0 = {0, 1, 4, 11}: weights 0.5, 0.1, 0.1, 0.1 over a total of 0.8; the others are plain means.
    first = (0.5 * p[0] + 0.1 * (p[1] + p[4] + p[11])) / 0.8
    expected = torch.stack([first, p[BLOBS[1]].mean(dim=0), p[BLOBS[2]].mean(dim=0)])
    torch.testing.assert_close(reduced.tokens[0], expected)


def test_attention_weighted_falls_back_to_the_mean_without_attention(make_tokens):
    tokens = blob_tokens(make_tokens, seeds=[0])
    tokens = dataclasses.replace(tokens, cls_attention=torch.zeros(1, 2, 12))
    weighted = cluster(tokens, 3, aggregate="attention_weighted")
    torch.testing.assert_close(weighted.tokens, cluster(tokens, 3).tokens)


def test_unknown_aggregate_is_rejected(make_tokens):
    with pytest.raises(ValueError, match="aggregate"):
        cluster(make_tokens(1, (2, 2)), 2, aggregate="size_weighted")
