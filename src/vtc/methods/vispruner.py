"""`vispruner`: the patches the CLS token attends to most, then diverse ones left after removing near-duplicates.

VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs", arXiv 2412.01818, ICCV 2025), official code Theia-4869/VisPruner@aefa01a, `llava/model/llava_arch.py`
(`encode_images`, marked `[VisPruner]`) with the attention from `llava/model/multimodal_encoder/clip_encoder.py`
(`feature_select`: the CLS row of the feature layer's attention, patches only). Per image, the reference

1. splits the budget T into T_imp = ⌊T · r⌋ important and T − T_imp diverse tokens (r = `important_ratio`, 0.5 by
   default in its eval scripts; its README's examples are 128 at 0.5 and 64 at 0.75);
2. ranks the patches by CLS attention averaged over heads and keeps the first T_imp as the important tokens;
3. removes near-duplicates from the rest (kept in that ranking order) in rounds until T − T_imp remain: each round
   splits the remaining patches into those at even and at odd positions of the current order, gives each even one
   its highest cosine similarity (vision features of the feature layer) to any odd one, and drops the r =
   min(8, remaining − wanted) most similar even ones; the kept even ones go first (by decreasing similarity), the
   odd ones after them;
4. feeds the important and diverse patches together in raster order (a boolean index mask over the patches), whose
   LLM position ids LLaVA renumbers (the pipeline's default `positions: renumbered`).

Deliberate differences from the reference:

- Ties: equal attention and equal similarities go to the lower position of the order being sorted (stable sorts;
  the reference's `argsort` leaves them unspecified).
- An odd number of remaining patches (possible when T_imp is odd or N − T_imp is odd): the even positions are one
  more than the odd ones; the reference's batch index assumes equal halves and fails there. A round drops at most
  the number of even positions (the reference's slice would give too few and fail in the next indexing step);
  later rounds drop the rest.
- Similarities in float32 whatever the cache's dtype (the reference computes them in the tower's dtype, fp16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget

# The reference removes at most this many near-duplicates per round.
DUPLICATES_PER_ROUND = 8


@register_method("vispruner")
def vispruner(tokens: VisualTokens, budget: int, *, important_ratio: float = 0.5) -> Reduced:
    """⌊budget · important_ratio⌋ patches of highest head-mean CLS attention plus the rest of the budget from the
    other patches after near-duplicate removal, fed in raster order.

    important_ratio: share of the budget chosen by attention alone (1: CLS-attention top-k; 0: all by de-duplication).

    Returns: tokens [B, budget, D], sources [B, budget, N] (one patch each).
    """
    check_budget(budget, tokens.num_patches)
    if not 0 <= important_ratio <= 1:
        raise ValueError(f"important_ratio must be between 0 and 1, got important_ratio = {important_ratio}")
    important = int(budget * important_ratio)
    diverse = budget - important

    scores = tokens.cls_attention.float().mean(dim=1)
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices
    residual = ranked[:, important:]
    if diverse > 0:
        unit = F.normalize(tokens.features.float(), dim=-1)
        residual = remove_duplicates(unit, residual, diverse)
    keep = torch.cat([ranked[:, :important], residual[:, :diverse]], dim=1)
    return selection(tokens, keep.sort(dim=-1).values)


def remove_duplicates(unit: torch.Tensor, candidates: torch.Tensor, wanted: int) -> torch.Tensor:
    """VisPruner's rounds of near-duplicate removal: [B, N, C] unit vectors, [B, R] candidate indices in a given
    order → [B, wanted] of them (even-position survivors of the last round first, then its odd positions).

    Each round compares the candidates at even positions with those at odd positions and drops the (at most 8)
    even ones whose best cosine similarity to an odd one is highest. The number of rounds and of drops per round
    depends only on R and `wanted`, so every image of a batch goes through the same steps.
    """
    if not 1 <= wanted <= candidates.shape[1]:
        raise ValueError(f"cannot keep {wanted} of {candidates.shape[1]} candidates")
    batch = torch.arange(candidates.shape[0], device=candidates.device)[:, None]
    while candidates.shape[1] > wanted:
        even, odd = candidates[:, ::2], candidates[:, 1::2]
        drop = min(DUPLICATES_PER_ROUND, candidates.shape[1] - wanted, even.shape[1])
        best = torch.bmm(unit[batch, even], unit[batch, odd].transpose(1, 2)).amax(dim=-1)  # [B, ⌈R / 2⌉]
        survivors = best.sort(dim=-1, descending=True, stable=True).indices[:, drop:]
        candidates = torch.cat([even.gather(1, survivors), odd], dim=1)
    return candidates
