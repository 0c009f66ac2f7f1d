"""`random`: a seeded uniform sample of the patches, the baseline many pruning methods fail to beat.

Follows the pre-LLM random baseline of UniPruneBench (TianfanPeng/VLMUniPruneBench, `methods/Random_PreLLM.py`):
a random permutation of the patches, its first k kept, then sorted back into spatial order.
"""

from __future__ import annotations

import torch

from vtc.methods import Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget


@register_method("random")
def random(tokens: VisualTokens, budget: int) -> Reduced:
    """`budget` distinct patches drawn uniformly without replacement, fed in ascending (row-major) order.

    Each image draws from its own generator seeded with `tokens.seeds[b]`, so its sample depends on its seed
    only, not on the batch it is in. Samples are nested: for a seed, the patches kept at a budget are among
    those kept at any larger budget (both are prefixes of one permutation).

    Returns: tokens [B, budget, D], sources [B, budget, N].
    """
    num_patches = tokens.num_patches
    check_budget(budget, num_patches)
    keep = torch.stack(
        [
            torch.randperm(num_patches, generator=torch.Generator().manual_seed(seed))[:budget]
            for seed in tokens.seeds.tolist()
        ]
    )
    return selection(tokens, keep.sort(dim=-1).values.to(tokens.projected.device))
