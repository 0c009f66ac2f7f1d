"""`spatial`: uniform grid sampling, the patch at the centre of each cell of a rows × cols grid.

A stride-sampling baseline (reference notes §2.1); cells follow `grid.factorise`, shared with `pool`.
"""

from __future__ import annotations

from vtc.methods import Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget, check_grid, grid_indices


@register_method("spatial")
def spatial(tokens: VisualTokens, budget: int) -> Reduced:
    """The same `budget` patches for every image, spread evenly over the H × W grid, in row-major order.

    budget = rows × cols as chosen by `grid.factorise` (64 → 8 × 8, 128 → 8 × 16, 192 → 12 × 16 on 24 × 24);
    the kept patch of cell (i, j) is at row floor((i + 1/2) · H / rows), column floor((j + 1/2) · W / cols).
    A budget with no usable factorisation falls back to the same rule along the flattened raster order.

    Returns: tokens [B, budget, D], sources [B, budget, N].
    """
    batch_size, num_patches = tokens.projected.shape[:2]
    check_budget(budget, num_patches)
    check_grid(tokens.grid, num_patches)
    keep = grid_indices(budget, tokens.grid).to(tokens.projected.device)
    return selection(tokens, keep.expand(batch_size, -1))
