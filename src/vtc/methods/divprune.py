"""`divprune`: the most diverse subset of the projected tokens, by greedy max-min (farthest-point) selection.

DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
arXiv 2503.02175, CVPR 2025), official code vbdi/divprune, `LLaVA/llava/model/llava_arch.py`: `DivPrune` and its
call site at the end of `prepare_inputs_labels_for_multimodal`. In the LLM's input embedding space (the projected
visual tokens), with dissimilarity 1 − cosine, the reference picks first the token whose nearest neighbour is
farthest (the largest second-smallest entry of its column: the smallest is its distance to itself), then, k − 1
times, the token farthest from everything picked so far (max over tokens of the min over picked ones).

Deliberate differences from the reference:

- Order: fed in raster order by default (`order="spatial"`), as the reference sorts the kept indices since a
  post-publication fix; the paper's numbers used the selection order, `order="selection"` (vbdi/divprune#8).
- The nearest-neighbour distance excludes the token itself explicitly rather than taking the second-smallest
  entry; the two differ only when rounding makes a self-distance exceed another distance.
- Picked tokens are excluded from later picks explicitly, so k distinct tokens come out even among duplicates
  (where the reference could pick a distance-0 token twice).
- Distances in float32 whatever the cache's dtype; ties go to the lower patch index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Hparam, Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget

ORDERS = ("spatial", "selection")


@register_method("divprune", hparams={"order": Hparam(choices=ORDERS)})
def divprune(tokens: VisualTokens, budget: int, *, order: str = "spatial") -> Reduced:
    """`budget` projected tokens chosen by greedy max-min diversity under 1 − cosine, then fed in `order`.

    order: "spatial" (row-major) or "selection" (the order they were picked in).

    Returns: tokens [B, budget, D], sources [B, budget, N] (one patch each).
    """
    check_budget(budget, tokens.num_patches)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    keep = max_min_diverse(cosine_distances(tokens.projected), budget)
    if order == "spatial":
        keep = keep.sort(dim=-1).values
    return selection(tokens, keep)


def cosine_distances(points: torch.Tensor) -> torch.Tensor:
    """[B, N, D] points → [B, N, N] pairwise 1 − cosine similarity (float32)."""
    unit = F.normalize(points.float(), dim=-1)
    return 1 - torch.bmm(unit, unit.transpose(1, 2))


def max_min_diverse(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy farthest-point selection: [B, N, N] symmetric distances → [B, k] indices in the order picked.

    First the point whose nearest other point is farthest; then repeatedly the unpicked point whose distance to
    its nearest picked point is largest. The loop runs over k, each step on the whole batch.
    """
    batch_size, num_points, _ = distances.shape
    batch = torch.arange(batch_size, device=distances.device)
    eye = torch.eye(num_points, dtype=torch.bool, device=distances.device)
    # With a single point there is no other: its nearest-neighbour distance is +inf and it is picked.
    nearest_other = distances.masked_fill(eye, float("inf")).amin(dim=-1)
    picked = [nearest_other.argmax(dim=-1)]
    is_picked = torch.zeros(batch_size, num_points, dtype=torch.bool, device=distances.device)
    is_picked[batch, picked[0]] = True
    to_picked = distances[batch, picked[0]]  # [B, N] distance to the nearest picked point
    for _ in range(1, k):
        nxt = to_picked.masked_fill(is_picked, float("-inf")).argmax(dim=-1)
        picked.append(nxt)
        is_picked[batch, nxt] = True
        to_picked = torch.minimum(to_picked, distances[batch, nxt])
    return torch.stack(picked, dim=1)
