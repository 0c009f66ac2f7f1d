"""`holov`: the budget spread over image regions by their importance, the most attended patches of each region kept.

HoloV (Zou et al., "Don't Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention",
arXiv 2510.02912, NeurIPS 2025), official code obananas/HoloV@1d2e65e, `llava/model/utils.py` (`HoloV`), called from
`llava/model/llava_arch.py` (`prepare_inputs_labels_for_multimodal`: 16 regions, projected tokens, CLS attention of
the feature layer averaged over heads from `multimodal_encoder/clip_encoder.py`). Per image, the reference

1. cuts the N patches, in raster order, into `regions` runs of consecutive patches, ⌊N / regions⌋ each and one more
   for the first N mod regions (on LLaVA's 24 × 24 grid: 16 strips of 36 patches, one and a half rows each);
2. scores every patch of a region of n ≥ 2 patches as 1000 a + α · v · s: a its CLS attention, v the variance
   (Σ over the region's n entries, its own zeroed diagonal one included, divided by n − 1) of its cosine
   similarities to the region's projected tokens (norms + 10⁻⁶), s = mean(1000 a) / (mean(v) + 10⁻⁶) over the region;
   a region's score is the mean of its patches' scores (a region of one patch: its attention a, unscaled);
3. gives region i ⌊w_i · T⌋ of the budget T, w_i = score_i / (Σ scores + 10⁻⁶), and one more token each to the
   regions of largest w until T is reached;
4. keeps, in each region, the patches of highest attention (not of highest patch score: that only weighs the
   region), or the whole region where its share reaches its size;
5. feeds them region by region, a region's patches by decreasing attention (a whole region in raster order), LLaVA
   renumbering their position ids (the pipeline's default `positions: renumbered`).

The paper speaks of spatial crops; the reference's crops are these raster runs, which we follow. (Third-party
summaries of the paper also mention re-fetching pruned context through the FFN; the reference's LLaVA code has no
such step, nor do we.)

Since a, v ≥ 0, a region's score is mean(1000 a) · (1 + α · m / (m + 10⁻⁶)), m its mean variance: (1 + α) times its
mean scaled attention unless its variances are all near zero. As the reference computes it, the variance term
hardly changes the allocation.

Deliberate differences from the reference:

- A region's share above its size: the reference keeps the whole region and pads the sequence with zero vectors up
  to T, so the LLM sees fewer real tokens. We give the surplus to the other regions: the regions that overflow are
  fixed at their size and the rest of the budget is shared among the others by step 3 again, until none overflows
  (water-filling); where step 3 cannot place it all (regions whose scores are all zero), the remaining tokens go to
  the regions with room in order of decreasing score. With no overflow the allocation is the reference's.
- Ties (equal weights in step 3, equal attention in step 4) go to the lower region or patch index (the reference's
  `topk` leaves them unspecified).
- Batched: per-region computations run on the whole batch at once (the reference loops over images and regions).
- Scores in float32 whatever the cache's dtype.
- `order="spatial"` (not in the reference) feeds the kept patches in raster order instead.
"""

from __future__ import annotations

import torch

from vtc.methods import Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget

ORDERS = ("region", "spatial")
# The reference's guard against division by zero (norms, variance scaling, weight normalisation).
EPS = 1e-6
# The reference scales the CLS attention by this before adding the scaled variance.
ATTENTION_SCALE = 1e3


@register_method("holov")
def holov(
    tokens: VisualTokens, budget: int, *, regions: int = 16, alpha: float = 0.09, order: str = "region"
) -> Reduced:
    """The budget split over `regions` runs of consecutive patches by region score, each region's share filled with
    its most attended patches.

    regions: how many runs of consecutive (raster-order) patches the image is cut into (at most N are non-empty).
    alpha: weight of the similarity-variance term in the patch scores that make a region's score.
    order: "region" (the reference's: region by region, by decreasing attention within a region) or "spatial".

    Returns: tokens [B, budget, D], sources [B, budget, N] (one patch each).
    """
    num_patches = tokens.num_patches
    check_budget(budget, num_patches)
    if regions < 1:
        raise ValueError(f"regions must be at least 1, got regions = {regions}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    device = tokens.projected.device
    sizes = region_sizes(num_patches, regions).to(device)
    starts = sizes.cumsum(0) - sizes
    attention = tokens.cls_attention.float().mean(dim=1)
    scores = region_scores(tokens.projected.float(), attention, sizes.tolist(), alpha)
    shares = allocate(scores, sizes, budget)  # [B, R]

    # Patches grouped by region, by decreasing attention within each (ties to the lower index).
    region_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)  # [N]
    by_attention = attention.sort(dim=-1, descending=True, stable=True).indices
    grouped = by_attention.gather(1, region_of[by_attention].sort(dim=-1, stable=True).indices)  # [B, N]
    slot = torch.arange(num_patches, device=device)
    rank = slot - starts[region_of]  # a slot's rank within its region
    share = shares[:, region_of]  # [B, N]: the share of each slot's region
    # A region kept whole stays in raster order, as the reference keeps its slice.
    candidate = torch.where(share >= sizes[region_of], slot[None, :], grouped)
    kept_slots = (rank[None, :] >= share).int().sort(dim=-1, stable=True).indices[:, :budget]
    keep = candidate.gather(1, kept_slots)
    if order == "spatial":
        keep = keep.sort(dim=-1).values
    return selection(tokens, keep)


def region_sizes(num_patches: int, regions: int) -> torch.Tensor:
    """[R] sizes of the non-empty runs: ⌊N / regions⌋ each, one more for the first N mod regions."""
    base, extra = divmod(num_patches, regions)
    sizes = torch.tensor([base + (i < extra) for i in range(regions)])
    return sizes[sizes > 0]


def region_scores(projected: torch.Tensor, attention: torch.Tensor, sizes: list[int], alpha: float) -> torch.Tensor:
    """[B, N, D] projected tokens, [B, N] attention → [B, R] region scores (module docstring, step 2)."""
    scores = []
    start = 0
    for size in sizes:
        a = attention[:, start : start + size]
        if size == 1:
            scores.append(a[:, 0])
        else:
            x = projected[:, start : start + size]
            unit = x / (x.norm(dim=-1, keepdim=True) + EPS)
            similarity = torch.bmm(unit, unit.transpose(1, 2))
            similarity = similarity * (1 - torch.eye(size, device=x.device))
            mean = similarity.sum(dim=-1) / (size - 1)
            variance = (similarity - mean[..., None]).square().sum(dim=-1) / (size - 1)
            scaled = a * ATTENTION_SCALE
            balance = scaled.abs().mean(dim=-1, keepdim=True) / (variance.abs().mean(dim=-1, keepdim=True) + EPS)
            scores.append((scaled + alpha * variance * balance).mean(dim=-1))
        start += size
    return torch.stack(scores, dim=1)


def allocate(scores: torch.Tensor, sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """[B, R] non-negative region scores, [R] region sizes → [B, R] shares of the budget, each ≤ its region's size
    and summing to `budget` (≤ Σ sizes).

    Proportional shares rounded down, the rest one each to the regions of largest weight; regions whose share
    exceeds their size are fixed at their size and the others share what is left, until none overflows.
    """
    batch_size, num_regions = scores.shape
    full = torch.zeros_like(scores, dtype=torch.bool)
    for _ in range(num_regions):
        left = budget - torch.where(full, sizes, 0).sum(dim=-1, keepdim=True)  # [B, 1]
        free = scores.masked_fill(full, 0)
        weights = free / (free.sum(dim=-1, keepdim=True) + EPS)
        shares = (weights * left).floor().long()
        rest = left - shares.sum(dim=-1, keepdim=True)
        # Full regions rank last, so the one-token top-ups go to regions with room.
        ranking = weights.masked_fill(full, -1).sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(ranking).scatter_(
            1, ranking, torch.arange(num_regions, device=scores.device).expand_as(ranking)
        )
        shares = shares + ((rank < rest) & ~full).long()
        shares = torch.where(full, sizes, shares)
        over = shares > sizes
        if not over.any():
            break
        full |= over
    shares = shares.minimum(sizes)
    missing = budget - shares.sum(dim=-1, keepdim=True)
    if (missing > 0).any():
        # Regions by decreasing score take what still fits until the budget is reached.
        ranking = scores.sort(dim=-1, descending=True, stable=True).indices
        room = (sizes - shares).gather(1, ranking)
        before = room.cumsum(dim=-1) - room
        extra = (missing - before).clamp(min=0).minimum(room)
        shares = shares.scatter_add(1, ranking, extra)
    return shares
