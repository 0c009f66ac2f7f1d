"""`scope`: greedy selection of the patch whose saliency times coverage gain is largest.

SCOPE (Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs",
arXiv 2510.24214, NeurIPS 2025), official code kinredon/SCOPE@6bf7306, `scope/clip_encoder.py`
(`CLIPVisionTower_SCOPE.forward` and its batched `SCOPE`), the kept tokens restored to raster order by
`scope/llava_arch.py` (`restore_image_features_sorted_scope`). Per image, the reference

1. takes the feature layer's vision features (CLIP `hidden_states[-2]`, patches only) and their cosine similarities
   s_ij, and the saliency a_j = (CLS attention of the same layer summed over heads) ** α, α = 1 (env `ALPHA`);
2. starts with coverage c_i = 0 for every patch and picks, `budget` times, the unpicked patch j maximising
   a_j · Σ_i max(0, s_ij − c_i) (the coverage gain of j over all patches, picked ones included), then updates
   c_i ← max(c_i, s_ij);
3. feeds the picked patches in raster order; LLaVA renumbers their position ids (the pipeline's default
   `positions: renumbered`).

Deliberate differences from the reference:

- The reference divides its token count by the batch size (`int(dominant_num / bs)`: it runs with batch size 1);
  every image here gets the whole budget.
- Only the multiplicative combination of saliency and gain (the reference's default `COMBINED=multi`; its `add`
  variant is not provided).
- Similarities and gains in float32 whatever the cache's dtype (the reference computes them in the tower's dtype,
  fp16). Equal scores go to the lower patch index, as the reference's `argmax` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget


@register_method("scope")
def scope(tokens: VisualTokens, budget: int, *, alpha: float = 1.0) -> Reduced:
    """`budget` patches picked greedily by (CLS attention summed over heads) ** alpha × coverage gain under the
    cosine similarity of the vision features, fed in raster order.

    alpha: exponent of the saliency (0: coverage alone, i.e. greedy facility location).

    Returns: tokens [B, budget, D], sources [B, budget, N] (one patch each).
    """
    check_budget(budget, tokens.num_patches)
    saliency = tokens.cls_attention.float().sum(dim=1) ** alpha
    unit = F.normalize(tokens.features.float(), dim=-1)
    keep = saliency_coverage_greedy(torch.bmm(unit, unit.transpose(1, 2)), saliency, budget)
    return selection(tokens, keep.sort(dim=-1).values)


def saliency_coverage_greedy(similarity: torch.Tensor, saliency: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N, N] symmetric similarities, [B, N] saliency → [B, k] indices in the order picked.

    Each step picks the unpicked j maximising saliency_j · Σ_i max(0, similarity_ij − coverage_i), where
    coverage_i is patch i's largest similarity to a picked patch (0 before any pick). The loop runs over k, each
    step on the whole batch.
    """
    batch_size, num_points, _ = similarity.shape
    batch = torch.arange(batch_size, device=similarity.device)
    coverage = torch.zeros(batch_size, num_points, device=similarity.device)
    picked = torch.zeros(batch_size, num_points, dtype=torch.bool, device=similarity.device)
    # columns[b, j, i] = similarity[b, i, j]: each gain sums along memory, into one reused buffer (about 3× faster on CPU
    # than summing over dim 1 of fresh temporaries; the same values summed).
    columns = similarity.transpose(1, 2).contiguous()
    buffer = torch.empty_like(columns)
    order = []
    for _ in range(k):
        gains = torch.sub(columns, coverage[:, None, :], out=buffer).clamp_(min=0).sum(dim=-1)
        nxt = (gains * saliency).masked_fill(picked, float("-inf")).argmax(dim=-1)
        order.append(nxt)
        picked[batch, nxt] = True
        coverage = torch.maximum(coverage, similarity[batch, nxt])
    return torch.stack(order, dim=1)
