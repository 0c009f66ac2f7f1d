"""`full`: the unreduced baseline, every projected patch token in raster order, as LLaVA-1.5 feeds them."""

from __future__ import annotations

import torch

from vtc.methods import Reduced, VisualTokens, register_method, selection


@register_method("full")
def full(tokens: VisualTokens, budget: int) -> Reduced:
    """All N projected tokens, in row-major order: [B, N, D], each its own source.

    The budget is ignored (the pipeline passes N), so that `full` runs under any budget sweep.
    """
    batch_size, num_patches = tokens.projected.shape[:2]
    keep = torch.arange(num_patches, device=tokens.projected.device).expand(batch_size, -1)
    return selection(tokens, keep)
