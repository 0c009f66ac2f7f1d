"""`prumerge`, `prumerge_plus` and their adaptive forms: keep the CLS-attention outliers, then fold each kept token's
key-space neighbours in.

LLaVA-PruMerge (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models",
arXiv 2403.15388, ICCV 2025), official code 42Shawn/LLaVA-PruMerge, `llava/model/multimodal_encoder/clip_encoder.py`:
`outlier_dectection` (the IQR rule), `token_prune_merge_advanced` (PruMerge) and `token_prune_merge_advanced_plus`
(PruMerge+). Per image, the reference

1. takes the CLS → patch attention a [N] and keeps its upper IQR outliers (a > Q3 + 1.5 · IQR), as many as there
   are, in decreasing attention (PruMerge+ appends an arithmetic progression of patch indices, those not kept yet);
2. for each kept patch i finds the 32 other patches (kept or not) whose keys are most cosine-similar to its own
   and replaces its feature by F_i + Σ_j a_j · F_j over those neighbours (attention-weighted, not normalised);
3. appends one summary token Σ_j a_j · F_j over the patches not kept.

The reference's own form, a k of its own per image (step 1 as the reference does it, `adaptive_selection`), is
registered as `prumerge_adaptive` and `prumerge_plus_adaptive`: they ignore the budget the pipeline passes and return
`Reduced.lengths`, so the tables report them at the mean count they reach. For a fixed budget, two variants:

- `prumerge_plus` follows the fixed-budget adaptation of EffiVLM-Bench (LoverLost/EffiVLM-Bench,
  `kv_cache_compression/siglip_model.py`, reference notes §2.3): keep the IQR outliers, then fill up to the budget
  with uniformly spaced (arithmetic-progression) patch indices.
- `prumerge` fills up to the budget with the next patches by attention instead (`fill="attention"`), which makes
  its selection the top-k by attention: the reference's own fixed-ratio path (`if_adaptive=False` in
  `token_prune_merge_advanced`), and the saliency-only counterpart of PruMerge+'s spatial supplement.
  `prumerge` with `fill="uniform"` is `prumerge_plus`.

Deliberate differences from the reference:

- Attention and keys come from the feature layer (CLIP-L encoder layer 22, LLaVA's `hidden_states[-2]`), as cached;
  the reference hooks q_proj / k_proj of the *next* layer (23) and recomputes one full-width "head" softmax over
  them. Our attention is the cached per-head CLS attention averaged over heads; our keys are the cached keys with
  heads concatenated (full width, like the reference's k_proj output), but of layer 22.
- Merging acts on the projected tokens; the reference merges the features before the projector. The projector is
  a nonlinear MLP, so projecting a merged feature is not merging projected tokens.
- The IQR is computed per image; the reference flattens the whole batch before taking percentiles (it runs with
  batch size 1 only, reference notes §0).
- Fixed-budget variants (`prumerge`, `prumerge_plus`): the budget is fixed (see above). More outliers than the budget: the `budget` most attended are kept. Fewer: the
  fill rule supplies the rest. The summary token counts in the budget (`summary_token=True`: budget − 1 kept
  patches plus the summary), so the LLM sees exactly `budget` tokens; `summary_token=False` keeps `budget`
  patches and drops the summary.
- The uniform fill spaces its patches evenly among the patches not kept yet (position ⌊i · R / m⌋ of the R
  remaining patches in raster order, i < m), so it yields exactly the m tokens the budget needs; the reference's
  progression runs over all indices with a step derived from the outlier ratio and drops the ones already kept,
  so its count varies.
- Neighbours: the reference takes 32 of 575; `neighbours` (default 32) is capped at N − 1. Equal similarities
  go to the lower patch index (the reference's `topk` leaves them unspecified).
- Adaptive form (`prumerge_adaptive`, `prumerge_plus_adaptive`): the reference takes k = int(N · ratio) outliers
  with ratio = c / N in floating point, and PruMerge+'s step int(int(1 / ratio) / 3); we take the c outliers and
  step ⌊⌊N / c⌋ / 3⌋ in integers. They agree for LLaVA-1.5's N = 576 at every c (tested), but floating point
  gives int(N · (c / N)) = c − 1 for some other N (e.g. N = 1176, c = 3). The reference's progression stops before
  575 (N − 1 for its 576 patches); we stop before N − 1 for any N. No outliers: PruMerge keeps only the summary
  token, as the reference; PruMerge+ too (the reference divides by zero). An image with several views (LLaVA-NeXT)
  is reduced view by view, each with its own outliers and summary token.
- Precision: attention, key similarities and the weighted sums are computed in float32 whatever the input dtype, the
  quartiles in float64 (the reference: the model's dtype, its percentiles in numpy's float64); the merged tokens are
  cast back to the input dtype (tested: bfloat16 inputs give the float32 result rounded to bfloat16).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from vtc.methods import Hparam, Reduced, VisualTokens, register_method
from vtc.methods.grid import check_budget

ORDERS = ("score", "spatial")
FILLS = ("attention", "uniform")


@register_method(
    "prumerge",
    hparams={"fill": Hparam(choices=FILLS), "neighbours": Hparam(min=0), "order": Hparam(choices=ORDERS)},
)
def prumerge(
    tokens: VisualTokens,
    budget: int,
    *,
    fill: str = "attention",
    neighbours: int = 32,
    summary_token: bool = True,
    order: str = "score",
) -> Reduced:
    """Fixed-budget PruMerge: IQR outliers of the CLS attention, filled up to the budget, each merged with its
    nearest neighbours in key space; plus one attention-weighted summary of the patches not kept.

    fill: "attention" (next patches by attention, i.e. top-k) or "uniform" (evenly spaced patches, = PruMerge+).
    neighbours: how many key-space neighbours each kept patch absorbs (capped at N − 1).
    summary_token: append the summary of the unkept patches as the last token (counted in the budget).
    order: "score", the reference's order: kept patches by decreasing attention, a uniform fill after them in
        raster order; or "spatial", kept patches in raster order. The summary token is last either way.

    Returns: tokens [B, budget, D], sources [B, budget, N]. Kept token i covers itself and its neighbours (so
    sources may overlap); the summary covers every patch not kept.
    """
    num_patches = tokens.num_patches
    check_budget(budget, num_patches)
    for name, value, choices in (("fill", fill, FILLS), ("order", order, ORDERS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if neighbours < 0:
        raise ValueError(f"neighbours must be non-negative, got {neighbours}")

    scores = tokens.cls_attention.float().mean(dim=1)
    kept_count = budget - 1 if summary_token else budget
    keep = fixed_selection(scores, kept_count, fill)
    if order == "spatial":
        keep = keep.sort(dim=-1).values
    return _merge(tokens, scores, keep, min(neighbours, num_patches - 1), summary_token)


@register_method("prumerge_plus", hparams={"neighbours": Hparam(min=0), "order": Hparam(choices=ORDERS)})
def prumerge_plus(
    tokens: VisualTokens, budget: int, *, neighbours: int = 32, summary_token: bool = True, order: str = "score"
) -> Reduced:
    """Fixed-budget PruMerge+: the IQR outliers plus evenly spaced patches up to the budget, merged as `prumerge`.

    Returns: tokens [B, budget, D], sources [B, budget, N].
    """
    return prumerge(tokens, budget, fill="uniform", neighbours=neighbours, summary_token=summary_token, order=order)


@register_method(
    "prumerge_adaptive", hparams={"neighbours": Hparam(min=0), "order": Hparam(choices=ORDERS)}, own_count=True
)
def prumerge_adaptive(tokens: VisualTokens, budget: int, *, neighbours: int = 32, order: str = "score") -> Reduced:
    """The reference's PruMerge (`token_prune_merge_advanced`, if_adaptive=True): each image keeps its own IQR
    outliers of the CLS attention, merged with their key-space neighbours, plus the summary token.

    budget: ignored. The pipeline passes one (each image's share of the study's budget); the reference's k is the
        image's own outlier count.
    neighbours, order: as `prumerge` (order "score": by decreasing attention, the reference's).

    Returns: tokens [B, k, D], sources [B, k, N], lengths [B] with k = max(lengths): row b's first lengths[b]
    tokens are its outliers (merged) and the summary token, the rest zero tokens with no sources.
    """
    return _adaptive(tokens, plus=False, neighbours=neighbours, order=order)


@register_method(
    "prumerge_plus_adaptive", hparams={"neighbours": Hparam(min=0), "order": Hparam(choices=ORDERS)}, own_count=True
)
def prumerge_plus_adaptive(tokens: VisualTokens, budget: int, *, neighbours: int = 32, order: str = "score") -> Reduced:
    """The reference's PruMerge+ (`token_prune_merge_advanced_plus`, if_adaptive=True, the shipped default): each
    image's IQR outliers, then its spatial supplement (`adaptive_selection`, plus=True), merged as `prumerge_adaptive`.

    budget: ignored (see `prumerge_adaptive`).

    Returns: tokens [B, k, D], sources [B, k, N], lengths [B], as `prumerge_adaptive`.
    """
    return _adaptive(tokens, plus=True, neighbours=neighbours, order=order)


def _adaptive(tokens: VisualTokens, plus: bool, neighbours: int, order: str) -> Reduced:
    """Each image on its own, since each keeps its own count; padded to the longest row."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if neighbours < 0:
        raise ValueError(f"neighbours must be non-negative, got {neighbours}")
    num_patches = tokens.num_patches
    scores = tokens.cls_attention.float().mean(dim=1)
    rows = []
    for b, keep in enumerate(adaptive_selection(scores, plus=plus)):
        if order == "spatial":
            keep = keep.sort().values
        alone = dataclasses.replace(tokens, projected=tokens.projected[b : b + 1], keys=tokens.keys[b : b + 1])
        rows.append(_merge(alone, scores[b : b + 1], keep[None], min(neighbours, num_patches - 1), True))
    lengths = [row.tokens.shape[1] for row in rows]
    longest = max(lengths, default=0)
    return Reduced(
        tokens=torch.cat([F.pad(row.tokens, (0, 0, 0, longest - row.tokens.shape[1])) for row in rows]),
        sources=torch.cat([F.pad(row.sources, (0, 0, 0, longest - row.sources.shape[1])) for row in rows]),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )


def iqr_outliers(scores: torch.Tensor) -> torch.Tensor:
    """[B, N] scores → [B, N] bool, the upper outliers of each image: score > Q3 + 1.5 · (Q3 − Q1).

    Quartiles interpolate linearly between order statistics, as numpy's default `percentile` the reference uses.
    """
    scores = scores.double()
    quarters = torch.tensor([0.25, 0.75], dtype=scores.dtype, device=scores.device)
    first, third = torch.quantile(scores, quarters, dim=-1)
    return scores > (third + 1.5 * (third - first))[:, None]


def adaptive_selection(scores: torch.Tensor, plus: bool = False) -> list[torch.Tensor]:
    """The reference's adaptive selection, one index tensor per image: [B, N] scores → B × [k_b] patch indices.

    PruMerge: the k_b IQR outliers by decreasing score. PruMerge+ (`plus=True`): then every index of
    range(0, N − 1, step) not already kept, in increasing order, with step = ⌊⌊N / k_b⌋ / 3⌋ (the reference's
    int(int(1 / ratio) / 3) with ratio = k_b / N). Where the reference would fail, we do not: no outliers gives an
    empty selection (the reference divides by zero), and a step of 0 (more than a third of the patches outliers,
    which the IQR rule all but rules out) is taken as 1 (the reference's `arange` rejects it).
    """
    num_patches = scores.shape[-1]
    counts = iqr_outliers(scores).sum(dim=-1).tolist()
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices
    selections = []
    for b, count in enumerate(counts):
        keep = ranked[b, :count]
        if plus and count > 0:
            step = max(1, (num_patches // count) // 3)
            progression = torch.arange(0, num_patches - 1, step, device=scores.device)
            keep = torch.cat([keep, progression[~torch.isin(progression, keep)]])
        selections.append(keep)
    return selections


def fixed_selection(scores: torch.Tensor, k: int, fill: str) -> torch.Tensor:
    """[B, N] scores → [B, k] patch indices: the IQR outliers by decreasing score (at most k), then the fill.

    fill "attention": the next patches by score, so the result is the top-k by score (equal scores to the lower
    index). fill "uniform": m = k − outliers patches evenly spaced among the R patches not kept, position
    ⌊i · R / m⌋ (i < m) of them in raster order; m and R differ per image, the computation does not loop over images.
    """
    batch_size, num_patches = scores.shape
    ranked = scores.sort(dim=-1, descending=True, stable=True).indices
    if fill == "attention" or k == 0:
        return ranked[:, :k]
    device = scores.device
    outliers = iqr_outliers(scores).sum(dim=-1).clamp(max=k)
    slot = torch.arange(k, device=device)
    # Outliers are exactly the first `outliers` ranked patches: they are the scores above a threshold.
    kept = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    kept.scatter_(1, ranked[:, :k], slot[None, :] < outliers[:, None])
    index = torch.arange(num_patches, device=device)
    remaining = torch.where(kept, num_patches, index).sort(dim=-1).values  # unkept patches first, ascending
    wanted = (k - outliers)[:, None]
    fill_slot = (slot[None, :] - outliers[:, None]).clamp(min=0)
    position = fill_slot * (num_patches - outliers)[:, None] // wanted.clamp(min=1)
    uniform = remaining.gather(1, position.clamp(max=num_patches - 1))
    return torch.where(slot[None, :] < outliers[:, None], ranked[:, :k], uniform)


def _merge(
    tokens: VisualTokens, scores: torch.Tensor, keep: torch.Tensor, neighbours: int, summary_token: bool
) -> Reduced:
    """PruMerge's update on the projected tokens: [B, k] kept indices → k merged tokens (+ the summary token).

    Kept token i becomes P_i + Σ_j a_j · P_j over its `neighbours` most key-similar other patches (cosine of the
    keys); the summary token is Σ_j a_j · P_j over the unkept patches. Both are sums, not means, as in the reference.
    """
    batch_size, num_patches = scores.shape
    device = scores.device
    batch = torch.arange(batch_size, device=device)[:, None]
    slot = torch.arange(keep.shape[1], device=device)[None, :]
    keys = F.normalize(tokens.keys.float(), dim=-1)
    similarity = torch.bmm(keys[batch, keep], keys.transpose(1, 2))  # [B, k, N]
    # A patch is not its own neighbour; -inf sorts it last even when every similarity is -1.
    similarity[batch, slot, keep] = float("-inf")
    nearest = similarity.sort(dim=-1, descending=True, stable=True).indices[..., :neighbours]
    is_neighbour = torch.zeros_like(similarity, dtype=torch.bool)
    is_neighbour.scatter_(2, nearest, True)
    itself = torch.zeros_like(is_neighbour)
    itself[batch, slot, keep] = True

    weights = torch.where(is_neighbour, scores[:, None, :], 0.0) + itself.float()  # [B, k, N]
    sources = is_neighbour | itself
    if summary_token:
        unkept = ~itself.any(dim=1, keepdim=True)  # [B, 1, N]
        weights = torch.cat([weights, torch.where(unkept, scores[:, None, :], 0.0)], dim=1)
        sources = torch.cat([sources, unkept], dim=1)
    projected = tokens.projected
    merged = torch.bmm(weights, projected.float()).to(projected.dtype)
    return Reduced(tokens=merged, sources=sources)
