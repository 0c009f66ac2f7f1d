from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.cluster import clusters_in_spatial_order

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
    [
        ({"space": "keys"}, "space"),
        ({"init": "random"}, "init"),
        ({"distance": "l1"}, "distance"),
        ({"iters": 0}, "iters"),
    ],
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


# ----------------------------------------------------------------------------------------------------------------------
# The implementation before issue 19, frozen: k-means++ drew its seeds with one matrix-vector product over all [B, N, C]
# points per step. The current one takes every distance from one Gram matrix; only the rounding of the dot products
# differs, so it must give the same clusters and the same tokens, bit for bit, wherever no draw falls within that
# rounding of a boundary (about 1e-6 per step).


def reference_assignment(tokens, budget, *, space="projected", iters=3, init="kmeans++", distance="l2"):
    """[B, N] cluster ids, as `cluster` computed them before the Gram-matrix seeding."""
    from vtc.methods.cluster import _cluster_means, _fill_empty
    from vtc.methods.grid import grid_indices

    points = (tokens.projected if space == "projected" else tokens.features).float()
    if distance == "cosine":
        points = torch.nn.functional.normalize(points, dim=-1)
    if init == "grid":
        centroids = points[:, grid_indices(budget, tokens.grid)]
    else:
        centroids = reference_kmeans_plus_plus(points, budget, tokens.seeds)
    assignment = None
    for _ in range(iters):
        distances = torch.cdist(points, centroids)
        new = _fill_empty(distances.argmin(dim=-1), distances, budget)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = _cluster_means(points, assignment, budget)
        if distance == "cosine":
            centroids = torch.nn.functional.normalize(centroids, dim=-1)
    return assignment


def reference_kmeans_plus_plus(points, k, seeds):
    batch_size, num_patches, _ = points.shape
    batch = torch.arange(batch_size)
    uniforms = torch.stack(
        [torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in seeds.tolist()]
    )
    first = (uniforms[:, 0] * num_patches).long().clamp(max=num_patches - 1)
    chosen_indices = [first]
    chosen = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    chosen[batch, first] = True
    squared_norms = points.square().sum(dim=-1)

    def squared_distance_to(index):
        dots = torch.bmm(points, points[batch, index][:, :, None]).squeeze(-1)
        return (squared_norms + squared_norms[batch, index][:, None] - 2 * dots).clamp_min(0)

    nearest = squared_distance_to(first)
    for step in range(1, k):
        weights = nearest.double().masked_fill(chosen, 0)
        cumulative = weights.cumsum(dim=-1)
        target = uniforms[:, step] * cumulative[:, -1]
        drawn = torch.searchsorted(cumulative, target[:, None], right=True).squeeze(1).clamp(max=num_patches - 1)
        first_unchosen = (~chosen).int().argmax(dim=-1)
        drawn = torch.where(weights[batch, drawn] > 0, drawn, first_unchosen)
        chosen_indices.append(drawn)
        chosen[batch, drawn] = True
        nearest = torch.minimum(nearest, squared_distance_to(drawn))
    return points[batch[:, None], torch.stack(chosen_indices, dim=1)]


def generated_points(kind, batch_size, num_patches, dim, seed):
    """Inputs of different structure: Gaussian, tight blobs, low rank, many exact duplicates, small integers (exact
    distance ties), large norms (cancellation in |x|² + |c|² − 2 x·c, its rounding still far below the distances:
    with norms ~1000 times the distances the rounding is as large as the distances, and both implementations draw
    from rounding noise, each its own)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(batch_size, num_patches, dim, generator=g)
    if kind == "blobs":
        centres = 5 * torch.randn(batch_size, 7, dim, generator=g)
        which = torch.randint(0, 7, (batch_size, num_patches), generator=g)
        blobs = centres.gather(1, which[..., None].expand(-1, -1, dim))
        return blobs + 0.1 * torch.randn(batch_size, num_patches, dim, generator=g)
    if kind == "low_rank":
        return torch.randn(batch_size, num_patches, 2, generator=g) @ torch.randn(batch_size, 2, dim, generator=g)
    if kind == "duplicates":
        distinct = torch.randn(batch_size, 5, dim, generator=g)
        return distinct.gather(1, torch.randint(0, 5, (batch_size, num_patches, 1), generator=g).expand(-1, -1, dim))
    if kind == "integers":
        return torch.randint(-2, 3, (batch_size, num_patches, dim), generator=g).float()
    if kind == "large_norms":
        return 30 + torch.randn(batch_size, num_patches, dim, generator=g)
    raise ValueError(kind)


KINDS = ("gaussian", "blobs", "low_rank", "duplicates", "integers", "large_norms")


@pytest.mark.parametrize("kind", KINDS)
def test_same_clusters_and_tokens_as_the_frozen_reference(make_tokens, kind):
    """8 variants × 2 aggregates × 4 shapes × up to 6 budgets: up to 384 clusterings of 2 images per kind."""
    shapes = [((4, 6), 5), ((5, 6), 16), ((6, 8), 3), ((3, 3), 40)]
    for s, (grid, dim) in enumerate(shapes):
        n = grid[0] * grid[1]
        tokens = make_tokens(
            2, grid, dim, projected=generated_points(kind, 2, n, dim, seed=s), seeds=[7 * s, 7 * s + 1]
        )
        tokens = dataclasses.replace(tokens, features=generated_points(kind, 2, n, 6, seed=100 + s))
        for budget in sorted({1, 2, n // 4, n // 2, n - 1, n}):
            for hparams in VARIANTS:
                expected = reference_assignment(tokens, budget, **hparams)
                for aggregate in ("mean", "attention_weighted"):
                    ours = cluster(tokens, budget, aggregate=aggregate, **hparams)
                    reference = clusters_in_spatial_order(tokens, expected, budget, aggregate)
                    assert torch.equal(ours.sources, reference.sources), (grid, budget, hparams)
                    assert torch.equal(ours.tokens, reference.tokens), (grid, budget, hparams)


def test_same_clusters_as_the_frozen_reference_at_the_7b_width(make_tokens):
    """576 projected tokens of width 4096 (LLaVA-1.5-7B), the width the Gram matrix saves most at."""
    projected = generated_points("blobs", 2, 576, 4096, seed=0) + generated_points("gaussian", 2, 576, 4096, seed=1)
    tokens = make_tokens(projected=projected, grid=(24, 24), seeds=[11, 12])
    for budget in (192, 64):
        ours = cluster(tokens, budget)
        reference = clusters_in_spatial_order(tokens, reference_assignment(tokens, budget), budget, "mean")
        assert torch.equal(ours.sources, reference.sources) and torch.equal(ours.tokens, reference.tokens)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("num_patches", "k"), [(24, 5), (25, 25), (26, 3), (30, 7), (48, 30), (576, 64)])
def test_lloyd_distances_are_cdists_bit_for_bit(kind, num_patches, k):
    from vtc.methods.cluster import _Distances

    points = generated_points(kind, 3, num_patches, 16, seed=num_patches)
    distances = _Distances(points)
    for seed in range(3):
        centroids = generated_points(kind, 3, k, 16, seed=1000 + seed)
        assert torch.equal(distances(centroids), torch.cdist(points, centroids))


# ----------------------------------------------------------------------------------------------------------------------
# The two seeding paths (issue 19): one Gram matrix per image, or one matrix-vector product per step image by image
# (the frozen reference's arithmetic). `_seed_from_gram` chooses per call; here each is forced.


@pytest.fixture
def seeded_by(monkeypatch):
    """cluster(tokens, budget, **hparams) with k-means++ seeding forced onto the Gram (True) or per-step path."""
    import vtc.methods.cluster as module

    def run(gram, tokens, budget, **hparams):
        monkeypatch.setattr(module, "_seed_from_gram", lambda points, k: gram)
        return cluster(tokens, budget, **hparams)

    return run


@pytest.mark.parametrize("kind", KINDS)
def test_both_seeding_paths_give_the_same_clusters_and_tokens(make_tokens, seeded_by, kind):
    """5 shapes (batch 1 to 4, 9 to 144 patches, width 3 to 64) × up to 7 budgets × 4 k-means++ variants per kind.

    "duplicates" (5 distinct points) only up to 5 clusters: beyond, every weight left is the rounding of a distance
    between equal points (|x|² + |x|² − 2 x·x, not exactly 0), and each path draws from its own rounding noise."""
    shapes = [(1, (4, 6), 5), (3, (5, 6), 16), (2, (6, 8), 3), (4, (3, 3), 40), (2, (12, 12), 64)]
    for s, (batch_size, grid, dim) in enumerate(shapes):
        n = grid[0] * grid[1]
        seeds = [13 * s + b for b in range(batch_size)]
        projected = generated_points(kind, batch_size, n, dim, seed=200 + s)
        tokens = make_tokens(batch_size, grid, dim, projected=projected, seeds=seeds)
        tokens = dataclasses.replace(tokens, features=generated_points(kind, batch_size, n, 6, seed=300 + s))
        for budget in sorted({1, 2, n // 6, n // 4, n // 2, n - 1, n} - {0}):
            if kind == "duplicates" and budget > 5:
                continue
            for hparams in VARIANTS[:4]:  # init="kmeans++"
                gram, per_step = seeded_by(True, tokens, budget, **hparams), seeded_by(False, tokens, budget, **hparams)
                assert torch.equal(gram.sources, per_step.sources), (batch_size, grid, budget, hparams)
                assert torch.equal(gram.tokens, per_step.tokens), (batch_size, grid, budget, hparams)


def tight_blobs_7b(batch_size):
    """Tight blobs at the 7B width: distances within a blob (≈ 80) far below the norms (≈ 10⁵), so float32 dot
    products differ between a matrix product and a matrix-vector product, and between batched and single-image
    matrix-vector products, by amounts that move draws. The frozen implementation, batched, gave an image other
    clusters than alone on these."""
    return generated_points("blobs", batch_size, 576, 4096, seed=0)


def test_per_step_seeding_is_the_frozen_implementation_image_by_image():
    from vtc.methods.cluster import _kmeans_plus_plus

    points, seeds = tight_blobs_7b(3), torch.tensor([5, 6, 7])
    ours = _kmeans_plus_plus(points, 64, seeds, gram=False)
    for b in range(3):
        assert torch.equal(ours[b : b + 1], reference_kmeans_plus_plus(points[b : b + 1], 64, seeds[b : b + 1]))


@pytest.mark.parametrize("budget", [64, 192])  # the per-step and the Gram path on this CPU
def test_an_image_gets_the_same_clusters_in_any_batch_at_the_7b_width(make_tokens, one_image, budget):
    tokens = make_tokens(projected=tight_blobs_7b(3), grid=(24, 24), seeds=[5, 6, 7])
    batched = cluster(tokens, budget)
    for b in range(3):
        alone = cluster(one_image(tokens, b), budget)
        assert torch.equal(batched.sources[b], alone.sources[0]) and torch.equal(batched.tokens[b], alone.tokens[0])
