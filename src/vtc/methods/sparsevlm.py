"""`sparsevlm`: SparseVLM, image tokens pruned in stages inside the LLM by the attention of text raters, with the best
of the pruned tokens recycled into a few merged ones.

SparseVLM (Zhang, Fan, Ma, Zheng, Huang, Cheng, Gudovskiy, Okuno, Nakata, Keutzer, Zhang, "SparseVLM: Visual Token
Sparsification for Efficient Vision-Language Model Inference", ICML 2025, arXiv 2410.04417), official code
Gumpest/SparseVLMs, LLaVA variant: `llava/model/language_model/modelling_sparse_llama.py`
(`LlamaDynamicvitModel.forward`, pruning_loc = [2, 6, 15]), `score.py` (`attn_postprocess_topk`, `layer_dict`,
`sparse_token_dict`, at commit 535f8ba) and `utils.py` (`cluster_and_merge`). The reference, for one prompt:

1. Text raters, once, on the embeddings layer 0 receives: each text token after the image gets the relevance
   mean over image tokens v of softmax over those text tokens t of (v · t); the raters are the text tokens whose
   relevance is above the mean.
2. At each pruning layer (2, 6, 15) it takes that layer's attention weights (causal softmax), averages them over
   heads, reads the raters' rows over the current image tokens and averages over the raters: one score per image
   token. It keeps the top `sparse_token_dict[budget][stage]` image tokens (at most the current count − 1) in sequence
   order: 192 → (300, 200, 110), 128 → (303, 110, 36), 64 → (66, 30, 17).
3. Recycling: of the p pruned tokens, the int(0.3·p) + 1 the raters score highest are clustered into int(r / 10) + 1
   clusters by density peaks (DPC-kNN on the layer's output hidden states: density exp(−mean squared distance to the
   k = clusters nearest), centres = the largest density × distance to the nearest denser token, every token joins
   its nearest centre) and each cluster becomes the mean of its members. The merged tokens follow the kept image
   tokens (before the text) and count as image tokens at the next stages.
4. It prunes the *output* of a pruning layer, so that layer still processed every token; the following layers run on
   the shortened sequence with position ids 0 … L'−1 (renumbered), and each decode step continues from the length of
   the layer's own cache.

In this package's terms a stage's layer K is the first layer that processes its tokens (the scores come from layer
K − 1, as FastV's), so the reference's layers are K = 3, 7, 16. The selection is `sparsevlm_select` (with
`text_raters` and `density_peak_clusters`), the schedule `sparsevlm_schedule`; the decoder loop is
`vtc.models.inllm.generate_pruned`.

Deliberate differences from the reference:

- Attention weights: the reference computes the whole L×L weight map of each pruning layer. Here only the raters'
  queries are recomputed and multiplied with the layer's cached (post-RoPE) keys (`LayerState.attention`): the same
  rows, and the model keeps its kernel (SDPA).
- Budget: `keep: reference` (the default) runs the reference's list for the budget (192, 128, 64 only, and only for
  LLaVA-1.5's 576 tokens at K = 3, 7, 16; anything else is refused, naming `keep`). The reference designs its lists
  as layer averages (its comment: 2·576 + 4·300 + 10·200 + 16·110 ≈ 191), but counted as they run, with the first
  pruning layer seeing 576 and the recycled tokens included, 32 layers average 206.5 / 145.4 / 82.3 visual tokens;
  the in_llm block records those true counts. `keep: fit` shrinks the stages geometrically (stage s of S selects
  round(N·f^(s/S)) tokens) with f fitted to the budget: the layer average (`budget_mode: layer_average`) or the
  tokens the last layers process (`budget_mode: kept`), recycled tokens included, as near as whole tokens allow.
  `keep: [k1, k2, …]` gives the counts directly, as the reference's lists do (the budget then only names the run).
  The paper's rank-based count (`attn_postprocess_rank` in the first release of `score.py`, 91fb6d9) is not
  implemented: the reference's LLaVA evaluation uses the fixed lists.
- A stage that keeps every current token prunes nothing (the reference keeps at most current − 1 and re-adds the
  dropped token as its own one-token cluster at the end of the block: the same tokens in another order).
- Batches: the reference reads batch row 0 (batch size 1, no padding). Here every row of a left-padded batch has its
  own raters, scores and clusters; the counts are the same for every row; batched equals one at a time (tested).
- Ties: equal scores keep the lower image index (stable sorts; `topk` leaves ties unspecified); the reference adds
  1e-6·uniform noise to the densities, here equal densities rank the lower index as denser (deterministic).
- Relevance, distances and means in float32 (the reference: the model's dtype); a cluster is the plain mean of its
  members (the reference divides by the count + 1e-6).
- A row whose text tokens are all equally relevant (e.g. a single one) has every text token after the image as a
  rater (the reference would average over no rater: NaN scores).
- Positions: renumbered, as the reference; `positions: original` (kept tokens keep their prompt position ids, as
  SparseVLM+ does) needs `recycle: 0`, since a merged token has no prompt position.
"""

from __future__ import annotations

import torch

from vtc import cost
from vtc.methods import Hparam, HparamError, LayerState, Selection, Stage, register_method

REFERENCE_LAYERS = (3, 7, 16)  # pruning_loc (2, 6, 15): the first layers that process each stage's tokens
REFERENCE_KEEP = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}  # score.py sparse_token_dict
REFERENCE_PATCHES = 576
RECYCLE = 0.3  # share of the pruned tokens recycled (int(0.3·p) + 1)
CLUSTER_SIZE = 10  # recycled tokens per merged token (int(r / 10) + 1)


def text_raters(prompt: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters: the text tokens after the image whose relevance to the image is above the mean.

    prompt: [B, L, D] the embeddings layer 0 receives; image: [B, N] the positions of each row's image block. The
    relevance of text token t is the mean over image tokens v of softmax over the text after the image of (v · t).
    Returns [B, L] bool, True at the raters (every text token after the image when none is above the mean).
    """
    length = prompt.shape[1]
    start = int(image[:, -1].min()) + 1  # the text after every row's image lies in positions start … L − 1
    after = torch.arange(start, length, device=prompt.device)[None] > image[:, -1:]  # [B, T]
    visual = prompt.gather(1, image[..., None].expand(-1, -1, prompt.shape[-1])).float()
    logits = visual @ prompt[:, start:].float().transpose(1, 2)  # [B, N, T]
    relevance = logits.masked_fill(~after[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)  # [B, T], 0 off text
    raters = after & (relevance > relevance.sum(dim=1, keepdim=True) / after.sum(dim=1, keepdim=True))
    raters = torch.where(raters.any(dim=1, keepdim=True), raters, after)
    return torch.cat([raters.new_zeros(raters.shape[0], start), raters], dim=1)


def align_tail(mask: torch.Tensor, length: int) -> torch.Tensor:
    """mask [B, L0] over the prompt → [B, length] over the current sequence, aligned on the last position: the text
    after the image is the same tokens at the end of both (left padding, and text is never pruned)."""
    width = min(mask.shape[1], length)
    aligned = mask.new_zeros(mask.shape[0], length)
    aligned[:, length - width :] = mask[:, mask.shape[1] - width :]
    return aligned


def recycle_counts(pruned: int, recycle: float = RECYCLE, cluster_size: int = CLUSTER_SIZE) -> tuple[int, int]:
    """(tokens recycled, clusters they merge into) when a stage prunes `pruned` tokens: int(recycle·p) + 1 and
    int(r / cluster_size) + 1 as the reference, none when nothing is pruned or `recycle` is 0."""
    if pruned <= 0 or recycle == 0:
        return 0, 0
    recycled = min(int(pruned * recycle) + 1, pruned)
    return recycled, min(int(recycled / cluster_size) + 1, recycled)


def density_peak_clusters(tokens: torch.Tensor, clusters: int) -> torch.Tensor:
    """Assigns R tokens to `clusters` density peaks (DPC-kNN, the reference's `cluster_and_merge`).

    tokens: [B, R, C]. Distances are Euclidean / √C; a token's density is exp(−mean squared distance to its
    `clusters` nearest tokens, itself included); the centres are the tokens with the largest density × distance to
    the nearest denser token (for the densest: the largest distance), and every token joins its nearest centre.
    Returns [B, R] cluster indices; cluster c is the centre with the c-th largest score.
    """
    batch, count, channels = tokens.shape
    x = tokens.float()
    distance = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / channels**0.5  # [B, R, R]
    density = (-(distance.topk(clusters, dim=-1, largest=False).values ** 2).mean(dim=-1)).exp()  # [B, R]
    index = torch.arange(count, device=tokens.device)
    # denser[b, i, j]: token j is denser than token i (equal densities: the lower index is denser)
    tie = (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])
    denser = (density[:, None, :] > density[:, :, None]) | tie
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    score = torch.where(denser, distance, farthest).min(dim=-1).values * density
    centres = score.argsort(dim=-1, descending=True, stable=True)[:, :clusters]  # [B, clusters]
    assignment = distance.gather(1, centres[..., None].expand(-1, -1, count)).argmin(dim=1)  # [B, R]
    return assignment.scatter(1, centres, index[:clusters].expand(batch, -1))  # a centre is in its own cluster


def sparsevlm_select(
    scores: torch.Tensor, tokens: torch.Tensor, keep: int, recycle: float = RECYCLE, cluster_size: int = CLUSTER_SIZE
) -> Selection:
    """One SparseVLM stage over a row's M current image tokens.

    scores: [B, M] the raters' attention to each image token; tokens: [B, M, D] their hidden states (the output of the
    layer the scores come from). Keeps the `keep` best scored (ties: lower index first); recycles the best scored of
    the pruned ones (`recycle_counts`) into merged means of their density-peak clusters.
    """
    batch, block, dim = tokens.shape
    ranked = scores.argsort(dim=-1, descending=True, stable=True)
    recycled, clusters = recycle_counts(block - keep, recycle, cluster_size)
    pool = ranked[:, keep : keep + recycled]  # [B, r] pruned tokens, best scored first
    pooled = tokens.gather(1, pool[..., None].expand(-1, -1, dim)).float()
    assignment = density_peak_clusters(pooled, clusters) if clusters else pool.new_zeros(batch, 0)
    member = assignment[:, None, :] == torch.arange(clusters, device=tokens.device)[None, :, None]  # [B, c, r]
    merged = (member.float() @ pooled) / member.sum(dim=-1, keepdim=True).clamp(min=1)
    members = member.new_zeros(batch, clusters, block).scatter(2, pool[:, None].expand(-1, clusters, -1), member)
    return Selection(ranked[:, :keep].sort(dim=-1).values, merged.to(tokens.dtype), members)


def _stages(layers, keep, num_patches: int, recycle: float, cluster_size: int) -> list[Stage]:
    """Stages selecting keep[s] of the tokens before them at layers[s], each adding the clusters of its recycled
    tokens."""
    stages, current = [], num_patches
    for layer, count in zip(layers, keep):
        stages.append(Stage(layer, count, recycle_counts(current - count, recycle, cluster_size)[1]))
        current = stages[-1].tokens
    return stages


def _measure(stages: list[Stage], budget_mode: str, num_layers: int, num_patches: int) -> float:
    """What the budget counts: the layer average of the visual tokens, or the tokens the last layers process."""
    if budget_mode == "kept":
        return stages[-1].tokens
    per_layer = cost.staged_tokens_per_layer(num_layers, num_patches, {stage.layer: stage.tokens for stage in stages})
    return cost.layer_average(per_layer)


def fitted_keep(
    budget: int, budget_mode: str, layers, num_layers: int, num_patches: int, recycle: float, cluster_size: int
) -> list[int]:
    """Per-stage selected counts round(N·f^(s/S)), s = 1 … S, with f ∈ [0, 1] bisected so that `_measure` is the
    budget as nearly as whole tokens allow (it does not decrease with f)."""

    def keep_at(f: float) -> list[int]:
        return [round(num_patches * f ** ((s + 1) / len(layers))) for s in range(len(layers))]

    def measure(f: float) -> float:
        return _measure(_stages(layers, keep_at(f), num_patches, recycle, cluster_size), budget_mode, num_layers,
                        num_patches)  # fmt: skip

    if not measure(0.0) <= budget <= num_patches:
        if budget_mode == "kept":
            what, hint = "tokens the last layers process", "recycle fewer tokens"
        else:
            what, hint = "layer average of the visual tokens", "prune earlier, or set budget_mode: kept"
        raise HparamError(
            None,
            f"sparsevlm at layers {list(layers)} of {num_layers} cannot reach a budget of {budget}: the {what} is "
            f"between {measure(0.0):g} and {num_patches} ({hint})",
        )
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if measure(middle) < budget else (low, middle)
    return keep_at(min((low, high), key=lambda f: abs(measure(f) - budget)))


def sparsevlm_schedule(
    budget: int,
    budget_mode: str,
    num_layers: int,
    num_patches: int,
    *,
    layers=REFERENCE_LAYERS,
    keep="reference",
    recycle: float = RECYCLE,
    cluster_size: int = CLUSTER_SIZE,
) -> list[Stage]:
    """SparseVLM's stages: `layers` (first layer of each stage; default the reference's 3, 7, 16) and `keep` (image
    tokens each selects: "reference" for the reference's list of the budget, "fit" for the geometric schedule fitted
    to the budget, or a list), each adding the clusters of its recycled tokens."""
    layers = list(layers) if isinstance(layers, (list, tuple)) else layers
    if not (isinstance(layers, list) and layers and all(isinstance(k, int) for k in layers)) or not all(
        a < b for a, b in zip([0, *layers], [*layers, num_layers])
    ):
        raise HparamError("layers", f"sparsevlm: layers must be increasing layers between 1 and {num_layers - 1} "
                                    f"(the first layer of each stage), got {layers!r}")  # fmt: skip
    if not 0 <= recycle <= 1:
        raise HparamError("recycle", f"sparsevlm: recycle must be between 0 and 1, got {recycle!r}")
    if not (isinstance(cluster_size, int) and cluster_size >= 1):
        raise HparamError("cluster_size", f"sparsevlm: cluster_size must be a positive integer, got {cluster_size!r}")
    if budget_mode == "kept" and keep != "fit":
        raise HparamError(
            "budget_mode", "sparsevlm: budget_mode kept fits the schedule to the budget; it needs keep: fit"
        )
    if keep == "fit":
        keep = fitted_keep(budget, budget_mode, layers, num_layers, num_patches, recycle, cluster_size)
    elif keep == "reference":
        if tuple(layers) != REFERENCE_LAYERS or num_patches != REFERENCE_PATCHES or budget not in REFERENCE_KEEP:
            raise HparamError(
                "keep",
                f"sparsevlm: the reference's lists are for budgets {', '.join(map(str, REFERENCE_KEEP))} of "
                f"{REFERENCE_PATCHES} tokens at layers {list(REFERENCE_LAYERS)}, not {budget} of {num_patches} at "
                f"{layers}; set keep: fit, or a list of counts",
            )
        keep = list(REFERENCE_KEEP[budget])
    elif not (isinstance(keep, list) and len(keep) == len(layers) and all(isinstance(k, int) for k in keep)):
        raise HparamError("keep", f"sparsevlm: keep must be reference, fit or one count per layer, got {keep!r}")
    stages = _stages(layers, keep, num_patches, recycle, cluster_size)
    before = [num_patches] + [stage.tokens for stage in stages[:-1]]
    if not all(0 <= stage.keep <= current for stage, current in zip(stages, before)):
        raise HparamError("keep", f"sparsevlm: keep {keep} selects more than the {before} tokens before each stage")
    return stages


@register_method(
    "sparsevlm",
    stage="llm",
    schedule=sparsevlm_schedule,
    positions="renumbered",
    hparams={
        "layers": Hparam(types=(list,)),
        "keep": Hparam(choices=("reference", "fit"), types=(str, list)),
        "recycle": Hparam(min=0, max=1),
        "cluster_size": Hparam(min=1),
    },
)
def sparsevlm(
    state: LayerState, keep: int, *, layer: int, recycle: float = RECYCLE, cluster_size: int = CLUSTER_SIZE
) -> Selection:
    """One SparseVLM stage at layer K = `layer`: the image tokens the text raters attend to most at layer K − 1, and
    the recycled merged tokens. Returns a `Selection` over the row's current image tokens."""
    raters = align_tail(text_raters(state.prompt, state.prompt_image), state.valid.shape[1])
    scores = state.attention(raters).gather(1, state.image)
    tokens = state.hidden.gather(1, state.image[..., None].expand(-1, -1, state.hidden.shape[-1]))
    return sparsevlm_select(scores, tokens, keep, recycle, cluster_size)
