"""`cluster`: k-means on the visual tokens, each cluster fed to the LLM as the mean of its members.

The cluster-and-aggregate reduction studied in arXiv 2504.17892, with k = budget. There is no official code for
it with LLaVA-1.5 (reference notes §2.9); the knobs follow that section: clustering space (projector output or
vision features), metric (L2 or cosine), initialisation (k-means++ or the `spatial` grid), iterations, and
clusters fed in order of their members' mean spatial position, and how members are aggregated. Deliberate
choices of ours: the fed vector is an average of the members' projected tokens, whatever space the clustering
ran in; cosine k-means is spherical k-means (unit vectors, re-normalised centroids), i.e. L2 k-means on the sphere.

Aggregation (`aggregate`): "mean", the plain mean of the members; "attention_weighted", members weighted by
their head-averaged CLS attention (as PruMerge weights what it merges, but normalised), so salient patches
dominate their cluster's token. The clustering itself is unweighted either way. A "size_weighted" choice
(ToMe's weighting by how many patches each token already stands for) is not offered: every input token here is
one patch, so it would equal "mean".

The Lloyd iterations run on the whole batch at once; every per-image step depends on that image only, so an
image gets the same clusters whatever batch it is in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Hparam, Reduced, VisualTokens, register_method
from vtc.methods.grid import check_budget, check_grid, grid_indices

SPACES = ("projected", "features")
INITS = ("kmeans++", "grid")
DISTANCES = ("l2", "cosine")
AGGREGATES = ("mean", "attention_weighted")


@register_method(
    "cluster",
    hparams={
        "space": Hparam(choices=SPACES),
        "iters": Hparam(min=1),
        "init": Hparam(choices=INITS),
        "distance": Hparam(choices=DISTANCES),
        "aggregate": Hparam(choices=AGGREGATES),
    },
)
def cluster(
    tokens: VisualTokens,
    budget: int,
    *,
    space: str = "projected",
    iters: int = 3,
    init: str = "kmeans++",
    distance: str = "l2",
    aggregate: str = "mean",
) -> Reduced:
    """k-means with k = budget; each cluster becomes an average of its members' projected tokens.

    space: "projected" ([B, N, D]) or "features" ([B, N, C]), the vectors clustered.
    iters: Lloyd iterations (assign, then update), at most; stops early once no assignment changes. 3 by default:
        on `shapes` (the demo checkpoint after its second run) 3 and 10 give the same accuracy (46.0/44.5/45.9 vs
        45.7/45.9/45.0 at 192/128/64, ±3 points) and 3 cost less (reduction 22% instead of 31% of the demo model's
        full prefill at 64, CPU); the grid initialisation would cost far less but loses 6.5 points at 64
        (docs/shapes-methods.md).
    init: "kmeans++", seeded per image from `tokens.seeds[b]`, or "grid", the patches `spatial` keeps.
    distance: "l2" or "cosine".
    aggregate: "mean" or "attention_weighted" (see the module docstring).

    Clusters are never empty (see `_fill_empty`) and partition the patches. They are fed in increasing mean
    row-major index of their members, ties going to the cluster with the lower first member.

    Returns: tokens [B, budget, D], sources [B, budget, N] (each patch in exactly one cluster).
    """
    num_patches = tokens.num_patches
    check_budget(budget, num_patches)
    for name, value, choices in (
        ("space", space, SPACES),
        ("init", init, INITS),
        ("distance", distance, DISTANCES),
        ("aggregate", aggregate, AGGREGATES),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")

    points = (tokens.projected if space == "projected" else tokens.features).float()
    if distance == "cosine":
        points = F.normalize(points, dim=-1)
    if init == "grid":
        check_grid(tokens.grid, num_patches)
        centroids = points[:, grid_indices(budget, tokens.grid).to(points.device)]
    else:
        centroids = _kmeans_plus_plus(points, budget, tokens.seeds)

    assignment = None
    distances_to = _Distances(points)
    for _ in range(iters):
        distances = distances_to(centroids)
        new = _fill_empty(distances.argmin(dim=-1), distances, budget)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = _cluster_means(points, assignment, budget)
        if distance == "cosine":
            centroids = F.normalize(centroids, dim=-1)

    return clusters_in_spatial_order(tokens, assignment, budget, aggregate)


def clusters_in_spatial_order(tokens: VisualTokens, assignment: torch.Tensor, k: int, aggregate: str) -> Reduced:
    """[B, N] cluster ids in [0, k), every cluster non-empty → one aggregated token per cluster, spatial order."""
    if aggregate == "mean":
        merged = _cluster_means(tokens.projected.float(), assignment, k)
    else:
        merged = _attention_weighted_means(tokens, assignment, k)
    merged = merged.to(tokens.projected.dtype)
    members = F.one_hot(assignment, k).transpose(1, 2).bool()
    order = _spatial_order(members)
    return Reduced(
        tokens=merged.gather(1, order[..., None].expand_as(merged)),
        sources=members.gather(1, order[..., None].expand_as(members)),
    )


def _kmeans_plus_plus(points: torch.Tensor, k: int, seeds: torch.Tensor, gram: bool | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): [B, N, C] points → [B, k, C] distinct initial centroids.

    Each image's random draws come from its own generator, drawn up front, so that the seeding loop over k can
    run on the whole batch while staying independent of the batch's composition.

    Each of the k sequential steps needs the squared distances from every point to the point just drawn. Two ways
    to get them, chosen by `_seed_from_gram` unless `gram` says which:
    - from one Gram matrix per image, [B, N, N], computed once (one batched matrix product, N²·C multiply-adds per
      image whatever k), so each step only touches [B, N] numbers: eleven small kernels. Fewest kernel launches
      (GPU) and cheapest for large k;
    - one matrix-vector product over the image's points per step (k·N·C multiply-adds), image by image: the
      implementation before issue 19, bit for bit, run on each image alone. Cheaper for small k on a CPU.
    The two draw the same points up to the rounding of the dot products, which can move a draw only where its
    uniform falls within that rounding of a boundary of the cumulative weights: tests/methods/test_cluster.py finds
    the same clusters and tokens, bit for bit, on thousands of generated images, as long as the rounding stays far
    below the distances themselves (not so for tight clusters whose distances are ~10⁻³ of the squared norms, e.g.
    blobs of spread 0.1 around centres of norm 320, where draws differ after ~100 steps).
    The batched matrix-vector products of the implementation before issue 19 rounded differently from one image's
    (a batched kernel), so on such data it gave an image other clusters in a batch than alone; both paths here
    give every image its own clusters whatever the batch (tested at the 7B width).
    """
    gram = _seed_from_gram(points, k) if gram is None else gram
    batch_size, num_patches, channels = points.shape
    if not gram and batch_size > 1:
        # One image at a time: its points stay in cache over the k steps, where a batch's are read from memory at
        # every step (batch 16 at the 7B width: 150 MB per step); each image's draws are the same either way.
        images = [_kmeans_plus_plus(points[b : b + 1], k, seeds[b : b + 1], gram=False) for b in range(batch_size)]
        return torch.cat(images)
    uniforms = torch.stack(
        [torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in seeds.tolist()]
    ).to(points.device)

    squared_norms = points.square().sum(dim=-1)
    if gram:
        # |x|² + |c|² − 2 x·c, clamped at 0, row c = squared distances to point c; [B, N, N].
        squared = squared_norms[:, None, :] + squared_norms[:, :, None] - 2 * torch.bmm(points, points.mT)
        squared = squared.clamp_min(0)
        # Chosen points get weight 0 exactly, so that rounding cannot pick one twice: a point's distance to itself
        # is 0, and the running minimum with distances ≥ 0 keeps it there.
        squared.diagonal(dim1=1, dim2=2).zero_()

        def squared_distances_to(index: torch.Tensor) -> torch.Tensor:
            return _row(squared, index)

    else:

        def squared_distances_to(index: torch.Tensor) -> torch.Tensor:
            centre = points.gather(1, index[..., None].expand(-1, -1, channels)).squeeze(1)[:, :, None]  # [B, C, 1]
            dots = torch.bmm(points, centre).squeeze(-1)
            squared = (squared_norms + squared_norms.gather(1, index) - 2 * dots).clamp_min(0)
            return squared.scatter_(1, index, 0)  # as the Gram matrix's zero diagonal

    first = (uniforms[:, :1] * num_patches).long().clamp(max=num_patches - 1)  # [B, 1]
    drawn_all = [first]
    nearest = squared_distances_to(first)
    chosen = torch.zeros(batch_size, num_patches, dtype=torch.uint8, device=points.device).scatter(1, first, 1)
    for step in range(1, k):
        # Inverse-CDF sampling with probability ∝ squared distance to the nearest chosen centroid.
        cumulative = nearest.cumsum(dim=-1, dtype=torch.float64)
        target = uniforms[:, step : step + 1] * cumulative[:, -1:]
        drawn = torch.searchsorted(cumulative, target, right=True).clamp_(max=num_patches - 1)
        # All weights 0 (the rest duplicates chosen points) or rounding past the end: take the first unchosen
        # point, so the k centroids are k distinct points and k = N gives every point its own cluster.
        drawn = torch.where(nearest.gather(1, drawn) > 0, drawn, chosen.argmin(dim=-1, keepdim=True))
        drawn_all.append(drawn)
        chosen.scatter_(1, drawn, 1)
        nearest = torch.minimum(nearest, squared_distances_to(drawn))
    index = torch.cat(drawn_all, dim=1)  # [B, k]
    return points.gather(1, index[..., None].expand(-1, -1, channels))


def _seed_from_gram(points: torch.Tensor, k: int) -> bool:
    """Whether k-means++ takes its distances from a Gram matrix (True) or from one matrix-vector product per step
    (False); see `_kmeans_plus_plus`.

    On a GPU always the Gram matrix: the per-step path launches k matrix-vector products and more small kernels per
    step, and launches, not arithmetic, bound the seeding there. On a CPU the Gram matrix costs N²·C multiply-adds
    whatever k, the per-step path k·N·C, each of which costs several times a matrix product's (memory-bound
    matrix-vector products) plus a few more small ops per step. Measured seeding CPU time, one image of 576 points,
    one thread (docs/efficiency.md): the two cost the same at k ≈ 128 (width 4096), 110 (1024), 96 (256), 70 (128),
    so the per-step path is taken for k ≤ N / 6. The rule looks at one image's N, C and k only, never at the batch
    size: the two paths can round a draw differently, and an image must get the same clusters in any batch. (At
    batch 16 the per-step path runs image by image, and is the faster one there too: 307 vs 591 ms at k = 64,
    width 4096.)
    """
    return points.device.type != "cpu" or 6 * k > points.shape[1]


def _row(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row index[b, 0] of each image's [N, N] matrix: [B, N, N], [B, 1] → [B, N]."""
    return matrix.gather(1, index[..., None].expand(-1, -1, matrix.shape[-1])).squeeze(1)


class _Distances:
    """`torch.cdist(points, centroids)`, bit for bit, with the points' half of its work done once for all iterations.

    For more than 25 rows on either side cdist computes sqrt(max(0, [−2x, |x|², 1] · [c, 1, |c|²])) with one matrix
    product (torch's `_euclidean_dist`); the augmented points [B, N, C + 2] do not change between Lloyd iterations,
    so building them once saves a pass of squares and a copy of all points per iteration. Smaller inputs take cdist's
    direct kernel, as before. tests/methods/test_cluster.py checks equality with cdist.
    """

    def __init__(self, points: torch.Tensor):
        self.points = points
        norms = points.pow(2).sum(-1, True)
        self.augmented = torch.cat([points.mul(-2), norms, torch.ones_like(norms)], -1)

    def __call__(self, centroids: torch.Tensor) -> torch.Tensor:
        if self.points.shape[1] <= 25 and centroids.shape[1] <= 25:
            return torch.cdist(self.points, centroids)
        norms = centroids.pow(2).sum(-1, True)
        augmented = torch.cat([centroids, torch.ones_like(norms), norms], -1)
        return self.augmented.matmul(augmented.mT).clamp_min(0).sqrt()


def _fill_empty(assignment: torch.Tensor, distances: torch.Tensor, k: int) -> torch.Tensor:
    """Moves points into empty clusters: [B, N] assignment, [B, N, k] distances → [B, N] with no empty cluster.

    As in scikit-learn's k-means, an empty cluster takes the point farthest from its own centroid, here among
    points whose cluster keeps at least one other member (so no cluster is emptied in turn; one always exists,
    since k <= N). One empty cluster per image per round, lowest cluster id first, ties to the lower point
    index: deterministic. The loop runs as many rounds as the most empty clusters of any image, usually none.
    """
    counts = torch.zeros(assignment.shape[0], k, dtype=torch.long, device=assignment.device)
    counts.scatter_add_(1, assignment, torch.ones_like(assignment))
    if not (counts == 0).any():
        return assignment
    assignment = assignment.clone()
    spread = distances.gather(2, assignment[..., None]).squeeze(-1)
    while True:
        empty = counts == 0
        needy = empty.any(dim=-1).nonzero().squeeze(-1)
        if needy.numel() == 0:
            return assignment
        target = empty[needy].int().argmax(dim=-1)
        movable = counts[needy].gather(1, assignment[needy]) > 1
        moved = spread[needy].masked_fill(~movable, -1).argmax(dim=-1)
        counts[needy, assignment[needy, moved]] -= 1
        counts[needy, target] += 1
        assignment[needy, moved] = target


def _cluster_means(points: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N, C] points, [B, N] cluster ids in [0, k), every cluster non-empty → [B, k, C] member means."""
    batch_size, _, channels = points.shape
    sums = points.new_zeros(batch_size, k, channels)
    sums.scatter_add_(1, assignment[..., None].expand_as(points), points)
    counts = points.new_zeros(batch_size, k).scatter_add_(1, assignment, torch.ones_like(points[..., 0]))
    return sums / counts[..., None]


def _attention_weighted_means(tokens: VisualTokens, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] cluster ids → [B, k, D] members' projected tokens averaged with weights ∝ head-mean CLS attention.

    A cluster whose members all have zero attention gets their plain mean instead of 0 / 0.
    """
    weights = tokens.cls_attention.float().mean(dim=1)  # [B, N]
    projected = tokens.projected.float()
    sums = projected.new_zeros(projected.shape[0], k, projected.shape[2])
    sums.scatter_add_(1, assignment[..., None].expand_as(projected), projected * weights[..., None])
    totals = weights.new_zeros(weights.shape[0], k).scatter_add_(1, assignment, weights)
    weighted = sums / totals.clamp(min=torch.finfo(totals.dtype).tiny)[..., None]
    return torch.where((totals > 0)[..., None], weighted, _cluster_means(projected, assignment, k))


def _spatial_order(members: torch.Tensor) -> torch.Tensor:
    """[B, k, N] bool partition → [B, k] cluster order by mean member index, then by first member index."""
    num_patches = members.shape[-1]
    index = torch.arange(num_patches, device=members.device)
    first = torch.where(members, index, num_patches).amin(dim=-1)
    # float64: means of different member sets can differ by less than float32 resolves (about 1 / N³ relative).
    mean = (members.double() * index.double()).sum(dim=-1) / members.sum(dim=-1)
    by_first = first.argsort(dim=-1)
    return by_first.gather(1, mean.gather(1, by_first).argsort(dim=-1, stable=True))
