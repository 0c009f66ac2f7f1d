"""`pool`: 2-D average pooling of the projected tokens on their patch grid.

Follows the pre-LLM pooling baseline of UniPruneBench (TianfanPeng/VLMUniPruneBench, `methods/Pool_PreLLM.py`):
reshape the token sequence to its H × W grid and `adaptive_avg_pool2d` it. Deliberate difference: that code
pools to a square target only; budgets that are not squares (128, 192 of 576) get the rectangular target of
`grid.factorise` (8 × 16, 12 × 16) instead. A budget with no such target is refused, unless `fit` is set: then the
largest target below the budget that has one (for images of varying grids, e.g. Qwen2.5-VL's, with budgets as ratios;
the tables report the tokens actually fed).
"""

from __future__ import annotations

import torch.nn.functional as F

from vtc.methods import Reduced, VisualTokens, register_method
from vtc.methods.grid import MAX_CELL_ASPECT, check_budget, check_grid, factorise, pool_windows


@register_method("pool")
def pool(tokens: VisualTokens, budget: int, *, fit: bool = False) -> Reduced:
    """Average of the projected tokens over each cell of a rows × cols grid, rows × cols == budget, row-major.

    fit: where no rows × cols equals the budget, pool to the largest one below it that `factorise` accepts.

    Cells are adaptive-pooling windows, which overlap when the grid is not a multiple of the target; the
    sources of a token are exactly the patches of its window.

    Returns: tokens [B, rows · cols, D], sources [B, rows · cols, N].
    """
    batch_size, num_patches, dim = tokens.projected.shape
    check_budget(budget, num_patches)
    check_grid(tokens.grid, num_patches)
    factors = factorise(budget, tokens.grid)
    while factors is None and fit and budget > 1:
        budget -= 1
        factors = factorise(budget, tokens.grid)
    if factors is None:
        height, width = tokens.grid
        raise ValueError(
            f"pool needs budget = rows × cols with rows <= {height}, cols <= {width} and cells at most "
            f"{MAX_CELL_ASPECT} times longer than wide; budget = {budget} on the {height}×{width} grid has none "
            "(set fit: true to pool to the largest such target below the budget)"
        )
    rows, cols = factors
    image = tokens.projected.transpose(1, 2).reshape(batch_size, dim, *tokens.grid)
    pooled = F.adaptive_avg_pool2d(image, (rows, cols)).flatten(2).transpose(1, 2)
    sources = pool_windows(rows, cols, tokens.grid).to(pooled.device).expand(batch_size, -1, -1)
    return Reduced(tokens=pooled, sources=sources.clone())
