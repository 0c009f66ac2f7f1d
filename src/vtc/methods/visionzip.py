"""`visionzip`: the patches the CLS token attends to most, plus a few contextual tokens merged from the rest.

VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv 2412.04467, CVPR 2025), official code dvlab-research/VisionZip, `visionzip/clip_encoder.py`
(`CLIPVisionTower_VisionZip.forward`), key metric from `visionzip/utils.py` (`CLIPAttention_forward`), budgets from
`visionzip/main.py` (`visionzip(model, dominant, contextual)`). Per image, the reference

1. keeps the CLS token and the D − 1 patches of highest CLS attention summed over heads (layer 22, LLaVA's
   feature layer) as the dominant tokens, in index order;
2. takes the other patches in index order, picks C of them as seeds at positions 0, s, 2s, … with
   s = max(1, ⌊R / C⌋) (R = how many remain), and assigns every other remaining patch to the seed whose key
   (layer-22 keys averaged over heads) is most cosine-similar;
3. feeds each seed as its own feature plus the mean of the features assigned to it (not a normalised centroid),
   after the dominant tokens.

Budgets: the reference splits 64 / 128 / 192 tokens as 54 + 10, 108 + 20, 162 + 30 (README, LightCompress
config). We generalise with contextual = ⌊budget · 10 / 64 + 1/2⌋ (budget / 6.4 rounded half up, which reproduces
the three) and dominant = budget − contextual; `dominant` overrides.

Deliberate differences from the reference:

- No CLS token: the cache has no CLS feature (LLaVA drops it), so the D dominant tokens are D patches rather than
  CLS + D − 1 patches.
- Merging acts on the projected tokens; the reference merges the features before the projector (a nonlinear MLP,
  so projecting a merged feature is not merging projected tokens).
- Equal attention goes to the lower patch index (the reference's `topk` leaves it unspecified); equal similarity
  to two seeds goes to the earlier seed, as the reference's argmax does.
- Precision: scores, key similarities and the merged sums are computed in float32 whatever the input dtype (the
  reference: the model's, e.g. float16); the merged tokens are cast back to the input dtype and the dominant tokens
  are the input vectors themselves (tested: bfloat16 inputs give the float32 result rounded to bfloat16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Hparam, Reduced, VisualTokens, register_method
from vtc.methods.grid import check_budget


@register_method("visionzip", hparams={"dominant": Hparam(min=0)})
def visionzip(tokens: VisualTokens, budget: int, *, dominant: int | None = None) -> Reduced:
    """`dominant` top-attention patches (spatial order), then budget − dominant contextual tokens (seed order).

    dominant: how many of the budget are dominant patches; default budget − ⌊budget · 10 / 64 + 1/2⌋ (54 of 64).
        dominant = budget gives pure CLS-attention top-k (summed over heads), in spatial order.

    Returns: tokens [B, budget, D], sources [B, budget, N]: a dominant token covers its patch, a contextual token
    its seed and the patches assigned to it; together they partition the dominant patches and the remaining ones.
    """
    num_patches = tokens.num_patches
    check_budget(budget, num_patches)
    if dominant is None:
        dominant = budget - default_contextual(budget)
    if not 0 <= dominant <= budget:
        raise ValueError(f"dominant must be between 0 and budget = {budget}, got dominant = {dominant}")
    contextual = budget - dominant

    scores = tokens.cls_attention.float().sum(dim=1)
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices
    is_dominant = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, ranked[:, :dominant], True)
    index = torch.arange(num_patches, device=scores.device)
    # Sorting puts the dominant patches (given index N) after the remaining ones, both groups ascending.
    by_group = torch.where(is_dominant, num_patches + index, index).sort(dim=-1).values
    dominant_patches = by_group[:, num_patches - dominant :] - num_patches
    remaining = by_group[:, : num_patches - dominant]

    dominant_sources = F.one_hot(dominant_patches, num_patches).bool()
    batch = torch.arange(scores.shape[0], device=scores.device)[:, None]
    dominant_tokens = tokens.projected[batch, dominant_patches]
    if contextual == 0:
        return Reduced(tokens=dominant_tokens, sources=dominant_sources)
    context_tokens, context_sources = _contextual(tokens, remaining, contextual)
    return Reduced(
        tokens=torch.cat([dominant_tokens, context_tokens], dim=1),
        sources=torch.cat([dominant_sources, context_sources], dim=1),
    )


def default_contextual(budget: int) -> int:
    """Contextual tokens in a budget: budget / 6.4 rounded half up (10, 20, 30 of 64, 128, 192)."""
    return (budget * 10 + 32) // 64


def head_mean_keys(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] keys, heads concatenated → [B, N, C / heads] keys averaged over heads (the reference's metric)."""
    batch_size, num_patches, channels = keys.shape
    if channels % heads:
        raise ValueError(f"keys of width {channels} do not split into {heads} heads")
    return keys.float().reshape(batch_size, num_patches, heads, channels // heads).mean(dim=2)


def _contextual(tokens: VisualTokens, remaining: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, R] remaining patch indices (ascending) → `count` contextual tokens [B, count, D], sources [B, count, N].

    Seeds sit at positions 0, s, 2s, … (s = max(1, ⌊R / count⌋)) of the remaining patches; every other remaining
    patch joins the seed whose head-mean key is most cosine-similar. A seed's token is its own projected token
    plus the mean of its members' (plus nothing when it has none).
    """
    batch_size, num_remaining = remaining.shape
    device = remaining.device
    batch = torch.arange(batch_size, device=device)[:, None]
    step = max(1, num_remaining // count)
    seed_positions = torch.arange(0, num_remaining, step, device=device)[:count]
    seeds = remaining[:, seed_positions]

    metric = F.normalize(head_mean_keys(tokens.keys, tokens.cls_attention.shape[1]), dim=-1)
    similarity = torch.bmm(metric[batch, remaining], metric[batch, seeds].transpose(1, 2))  # [B, R, count]
    assignment = F.one_hot(similarity.argmax(dim=-1), count).float()
    # Seeds are not members of any cluster, their own included: their token enters as the "seed +" term.
    assignment[:, seed_positions] = 0
    sizes = assignment.sum(dim=1)  # [B, count]
    projected = tokens.projected.float()
    member_means = torch.bmm(assignment.transpose(1, 2), projected[batch, remaining]) / sizes.clamp(min=1)[..., None]
    merged = (projected[batch, seeds] + member_means).to(tokens.projected.dtype)

    sources = torch.zeros(batch_size, count, tokens.num_patches, dtype=torch.bool, device=device)
    sources.scatter_(2, remaining[:, None, :].expand(-1, count, -1), assignment.transpose(1, 2).bool())
    sources[batch, torch.arange(count, device=device)[None, :], seeds] = True
    return merged, sources
