"""`cluster_agglomerative`: bottom-up hierarchical clustering of the visual tokens, cut at k = budget clusters.

The hierarchical counterpart of `cluster` (k-means), so that the study can ask whether the clustering algorithm
matters (reference notes §2.9; no official code exists for clustering-based reduction of LLaVA-1.5 tokens).
Every patch starts as its own cluster; the two closest clusters merge until `budget` remain. Cluster distances
follow the Lance–Williams recurrences (Lance & Williams 1967; as in scipy's `linkage` and scikit-learn's
`AgglomerativeClustering`):

- "average" (UPGMA): the mean distance between members, d(i ∪ j, m) = (n_i d(i, m) + n_j d(j, m)) / (n_i + n_j);
  the patch distance is Euclidean ("l2") or 1 − cosine ("cosine").
- "ward": the increase in within-cluster sum of squares, from squared Euclidean patch distances,
  d(i ∪ j, m) = ((n_i + n_m) d(i, m) + (n_j + n_m) d(j, m) − n_m d(i, j)) / (n_i + n_j + n_m); with "cosine" the
  vectors are unit-normalised first (squared Euclidean distance of unit vectors is 2 (1 − cosine)).

`connectivity=True` lets only clusters that touch on the patch grid (4-neighbourhood) merge, so each cluster is a
connected region of the image, as scikit-learn's `connectivity` option does. Clusters are fed like `cluster`'s:
aggregated (`aggregate`: "mean" or "attention_weighted", see `cluster`) projected tokens in order of their members'
mean row-major index.

The merge loop runs N − k steps, each on the whole batch; every step is elementwise per image or a per-image
argmin, so an image gets the same clusters whatever batch it is in. Each step costs O(B · N²) (a full argmin over
the distance matrix; no nearest-neighbour chain): about 3 s for a batch of 16 at N = 576 on one CPU core.
Equal distances merge the pair with the lowest (i, j), i < j, and the merged cluster keeps id i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Hparam, Reduced, VisualTokens, register_method
from vtc.methods.cluster import AGGREGATES, DISTANCES, SPACES, clusters_in_spatial_order
from vtc.methods.grid import check_budget, check_grid

LINKAGES = ("ward", "average")


@register_method(
    "cluster_agglomerative",
    hparams={
        "linkage": Hparam(choices=LINKAGES),
        "distance": Hparam(choices=DISTANCES),
        "space": Hparam(choices=SPACES),
        "aggregate": Hparam(choices=AGGREGATES),
    },
)
def cluster_agglomerative(
    tokens: VisualTokens,
    budget: int,
    *,
    linkage: str = "ward",
    distance: str = "l2",
    space: str = "projected",
    connectivity: bool = False,
    aggregate: str = "mean",
) -> Reduced:
    """Agglomerative clustering down to `budget` clusters; each becomes an average of its members' projected tokens.

    linkage: "ward" or "average". distance: "l2" or "cosine". space: "projected" or "features", the vectors
    clustered. connectivity: merge only clusters adjacent on the patch grid. aggregate: "mean" or
    "attention_weighted".

    Returns: tokens [B, budget, D], sources [B, budget, N] (a partition of the patches), in increasing mean
    row-major index of the members.
    """
    num_patches = tokens.num_patches
    check_budget(budget, num_patches)
    for name, value, choices in (
        ("linkage", linkage, LINKAGES),
        ("distance", distance, DISTANCES),
        ("space", space, SPACES),
        ("aggregate", aggregate, AGGREGATES),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")

    # float64: hundreds of Lance–Williams updates compound rounding, and near-equal merges should not flip on it.
    points = (tokens.projected if space == "projected" else tokens.features).double()
    if distance == "cosine":
        points = F.normalize(points, dim=-1)
    if linkage == "ward":
        distances = torch.cdist(points, points).square()
    elif distance == "cosine":
        distances = 1 - torch.bmm(points, points.transpose(1, 2))
    else:
        distances = torch.cdist(points, points)
    adjacency = None
    if connectivity:
        check_grid(tokens.grid, num_patches)
        adjacency = grid_adjacency(tokens.grid).to(points.device).expand(points.shape[0], -1, -1).clone()
    labels = agglomerate(distances, budget, linkage, adjacency)
    return clusters_in_spatial_order(tokens, labels, budget, aggregate)


def grid_adjacency(grid: tuple[int, int]) -> torch.Tensor:
    """[N, N] bool, True between patches that share an edge on the H × W grid (row-major)."""
    height, width = grid
    row, col = torch.arange(height * width).div(width, rounding_mode="floor"), torch.arange(height * width) % width
    steps = (row[:, None] - row[None, :]).abs() + (col[:, None] - col[None, :]).abs()
    return steps == 1


def agglomerate(distances: torch.Tensor, k: int, linkage: str, adjacency: torch.Tensor | None = None) -> torch.Tensor:
    """Merges clusters until k remain: [B, N, N] symmetric patch distances → [B, N] cluster ids in [0, k).

    adjacency: [B, N, N] bool or None; when given, only adjacent clusters merge, and a merged cluster is adjacent
    to whatever either part was (it must connect every image's graph, or the merging stops short of k). Cluster
    ids are numbered in order of each cluster's lowest patch index.
    """
    batch_size, num_points, _ = distances.shape
    device = distances.device
    batch = torch.arange(batch_size, device=device)
    eye = torch.eye(num_points, dtype=torch.bool, device=device)
    distances = distances.masked_fill(eye, float("inf"))
    sizes = torch.ones(batch_size, num_points, dtype=distances.dtype, device=device)
    labels = torch.arange(num_points, device=device).expand(batch_size, -1).clone()

    for _ in range(num_points - k):
        candidates = distances if adjacency is None else distances.masked_fill(~adjacency, float("inf"))
        # argmin returns the first minimum: the symmetric pair (i, j) with i < j, lowest i first.
        flat = candidates.flatten(1).argmin(dim=-1)
        first, second = flat // num_points, flat % num_points
        if not torch.isfinite(candidates[batch, first, second]).all():
            raise ValueError("connectivity leaves clusters that can never merge; the patch graph is not connected")
        to_first, to_second = distances[batch, first], distances[batch, second]  # [B, N]
        size_first, size_second = sizes[batch, first][:, None], sizes[batch, second][:, None]
        if linkage == "average":
            merged = (size_first * to_first + size_second * to_second) / (size_first + size_second)
        else:
            between = distances[batch, first, second][:, None]
            numerator = (size_first + sizes) * to_first + (size_second + sizes) * to_second - sizes * between
            merged = numerator / (size_first + size_second + sizes)
        # Dead clusters stay at +inf (inf in to_first / to_second carries through); so do the pair themselves.
        merged[batch, first] = float("inf")
        merged[batch, second] = float("inf")
        distances[batch, first] = merged
        distances[batch, :, first] = merged
        distances[batch, second] = float("inf")
        distances[batch, :, second] = float("inf")
        sizes[batch, first] += sizes[batch, second]
        sizes[batch, second] = 0
        if adjacency is not None:
            joined = adjacency[batch, first] | adjacency[batch, second]
            joined[batch, first] = False
            joined[batch, second] = False
            adjacency[batch, first] = joined
            adjacency[batch, :, first] = joined
            adjacency[batch, second] = False
            adjacency[batch, :, second] = False
        labels = torch.where(labels == second[:, None], first[:, None], labels)

    # Surviving representatives, numbered in increasing order: each is its cluster's lowest patch index.
    alive = sizes > 0
    return (alive.long().cumsum(dim=-1) - 1).gather(1, labels)
