"""`tome`: Token Merging inside the CLIP vision tower, down to `budget` patch tokens at LLaVA's feature layer.

ToMe (Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT but Faster", ICLR 2023,
arXiv 2210.09461), official code facebookresearch/ToMe: `tome/merge.py` (`bipartite_soft_matching`, `merge_wavg`,
`merge_source`), `tome/patch/timm.py` (`ToMeBlock`, `ToMeAttention`, `apply_patch`; `tome/patch/clip.py` applies
the same block to OpenAI CLIP) and `tome/utils.py` (`parse_r`). In every transformer block the reference

1. runs attention with *proportional attention*: log(size) of each key token is added to the attention logits,
   so a token that stands for s patches gets the attention s copies of it would get; its metric is the
   block's attention keys averaged over heads;
2. between the attention and the MLP, splits the tokens into A (even positions) and B (odd positions), matches
   every A token to its most cosine-similar B token (by the metric), and merges the r A tokens with the most
   similar matches into their B tokens (several may join one B token); the CLS token (position 0, in A) is
   protected: it never merges. r is at most half the tokens;
3. merges by size-weighted average, x = Σ sᵢ xᵢ / Σ sᵢ, and adds the sizes; `merge_source` tracks which input
   tokens each merged token covers. The merged sequence is the unmerged A tokens (in their order, CLS first),
   then all B tokens (in order): the next block splits this order into A and B again.

Here the tower runs embeddings → pre-LayerNorm → every encoder layer up to and including LLaVA's feature layer
(`vision_feature_layer = -2`: layers 0 … 22 of CLIP-L's 24) with ToMe in each, then drops the CLS token (the
`default` select strategy) and applies LLaVA's projector to the merged patch tokens. The attention is computed from
the layer's own q/k/v/out projections (`proportional_attention`), not through transformers' attention dispatch, so
no class or function of transformers is patched.

Deliberate differences from the reference:

- Schedule: the reference removes a constant r per layer (`parse_r`; with an `inflect`, a linearly increasing or
  decreasing one) and silently removes fewer where r exceeds half the tokens, so the final count follows from r.
  The pipeline needs exactly `budget` tokens, so `merge_schedule` removes N − budget patch tokens over the layers
  up to the feature layer: the constant schedule min(c, half the tokens) with the smallest c that gets there, c on
  the first layers and c − 1 on the rest to land exactly (for LLaVA-1.5 at 192 tokens: 17 on layers 0 … 15, 16 on
  16 … 22). A budget that halving in every layer cannot reach is an error (the 4-layer demo tower merges in 3
  layers: 72 tokens at the fewest).
- Merging stops at the feature layer: the layers after it do not feed LLaVA (the reference, a classifier, merges
  in every block).
- Ties: matches with equal similarity merge in A order (a stable sort; the reference's `argsort` leaves them
  unspecified), and an A token with two equally similar B tokens joins the first (as the reference's `max`).
- The metric is normalised with `F.normalize` (an ε guards zero keys) and matched in float32; the size-weighted
  sums run in float32 (fp16 sums of up to 576 CLIP hidden states can overflow) and are cast back to the tower's
  dtype.
- Attention always runs through torch's `scaled_dot_product_attention` in the tower's dtype, whatever
  `attn_implementation` the model was loaded with (FlashAttention-2 takes no additive bias); with budget = N
  (nothing merges) the output equals `vtc.models.llava.encode`'s projected tokens.
- Sources are tracked as a bool matrix over the input tokens, not the reference's float adjacency; the same sets.
- Feed order: the reference has no feed order (a classifier reads CLS); its sequence order interleaves tokens
  by the A/B history of every layer and has no spatial meaning. We feed the merged tokens in the row-major order
  of each token's first (lowest-index) source patch: patches that never merged keep LLaVA's raster order, and a
  merged group sits where it starts. Positions are renumbered: the LLM sees the k tokens at k consecutive
  positions.
- Only `vision_feature_select_strategy == "default"` (CLS dropped, as LLaVA-1.5) is supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Reduced, register_method
from vtc.methods.grid import check_budget


def merge_schedule(num_patches: int, budget: int, num_layers: int) -> list[int]:
    """Tokens each of `num_layers` layers removes (r_0 … r_{L-1}) to go from `num_patches` to exactly `budget`.

    Layer l sees n_l patch tokens (n_0 = N, n_{l+1} = n_l − r_l) and removes r_l ≤ ⌊n_l / 2⌋ (ToMe's cap (t − 1) // 2
    for t = n_l + 1 tokens with the protected CLS). The schedule is ToMe's constant one, r_l = min(c, ⌊n_l / 2⌋), with
    the smallest c that reaches the budget; to land on it exactly, the first j layers use c and the others c − 1
    (the least j that does). Without the cap that is ⌈(N − budget) / L⌉ on the first layers and one less after.
    Σ r_l = N − budget.
    """
    check_budget(budget, num_patches)
    if num_layers < 0:
        raise ValueError(f"num_layers must be non-negative, got {num_layers}")

    def run(c: int, j: int) -> list[int]:
        schedule, n = [], num_patches
        for layer in range(num_layers):
            schedule.append(min(c if layer < j else c - 1, n // 2))
            n -= schedule[-1]
        return schedule

    fewest = num_patches - sum(run(num_patches, num_layers))  # halving in every layer
    if fewest > budget:
        raise ValueError(
            f"ToMe cannot reach budget = {budget} from N = {num_patches} patches in {num_layers} layers: each layer "
            f"removes at most half of the tokens, so the fewest it can leave is {fewest}"
        )
    removed = num_patches - budget
    if removed == 0:
        return [0] * num_layers
    # The tokens left fall monotonically with c and with j, by at most one per step of j: one (c, j) lands on it.
    for c in range(-(-removed // num_layers), removed + 1):
        for j in range(num_layers + 1):
            schedule = run(c, j)
            if sum(schedule) == removed:
                return schedule
            if sum(schedule) > removed:
                break
    raise AssertionError("unreachable: the budget is reachable, so some constant schedule lands on it")


def bipartite_soft_matching(metric: torch.Tensor, r: int, class_token: bool = True) -> torch.Tensor:
    """ToMe's bipartite soft matching of one layer: where each of t tokens goes when r of them merge.

    metric: [B, t, c] (keys averaged over heads). A = tokens 0, 2, 4, …; B = tokens 1, 3, 5, …. Each A token's match
    is its most cosine-similar B token; the r A tokens with the most similar matches merge into them. With
    `class_token`, token 0 (in A) never merges. r ≤ (t − protected) // 2.

    Returns: destination [B, t] int64, the index of the merged token each input token becomes part of, in
    [0, t − r): first the unmerged A tokens (ascending with `class_token`, else in decreasing match similarity,
    as the reference orders them), then every B token in order. It is both the merge index (`merge_wavg`,
    `merge_source` scatter along it) and the unmerge index (`unmerge` gathers along it).
    """
    batch_size, num_tokens, _ = metric.shape
    protected = 1 if class_token else 0
    if not 0 <= r <= (num_tokens - protected) // 2:
        raise ValueError(f"r must be between 0 and (t - protected) // 2 = {(num_tokens - protected) // 2}, got {r}")
    device = metric.device
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    num_a, num_b = a.shape[1], b.shape[1]
    scores = a @ b.transpose(1, 2)  # [B, A, B]
    if class_token:
        scores[:, 0] = -torch.inf
    best = scores.argmax(dim=-1)  # [B, A], first maximum on ties
    similarity = scores.gather(2, best[..., None]).squeeze(-1)
    ranked = similarity.argsort(dim=-1, descending=True, stable=True)
    merged, unmerged = ranked[:, :r], ranked[:, r:]
    if class_token:
        unmerged = unmerged.sort(dim=-1).values
    kept = num_a - r
    destination_a = torch.empty(batch_size, num_a, dtype=torch.long, device=device)
    destination_a.scatter_(1, unmerged, torch.arange(kept, device=device).expand(batch_size, -1))
    destination_a.scatter_(1, merged, kept + best.gather(1, merged))
    destination = torch.empty(batch_size, num_tokens, dtype=torch.long, device=device)
    destination[:, ::2] = destination_a
    destination[:, 1::2] = kept + torch.arange(num_b, device=device)
    return destination


def merge_wavg(
    x: torch.Tensor, size: torch.Tensor | None, destination: torch.Tensor, num_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of the tokens that share a destination.

    x: [B, t, C]; size: [B, t] patches each token stands for (None: all 1); destination: [B, t] in [0, num_out).
    Returns x' [B, num_out, C] = Σ sᵢ xᵢ / Σ sᵢ over each destination's tokens (in x's dtype, summed in float32),
    and size' [B, num_out] = Σ sᵢ (float32).
    """
    batch_size, _, channels = x.shape
    size = torch.ones(x.shape[:2], device=x.device) if size is None else size.float()
    sums = x.new_zeros(batch_size, num_out, channels, dtype=torch.float32)
    sums.scatter_add_(1, destination[..., None].expand(-1, -1, channels), x.float() * size[..., None])
    sizes = size.new_zeros(batch_size, num_out).scatter_add_(1, destination, size)
    return (sums / sizes[..., None]).to(x.dtype), sizes


def merge_source(source: torch.Tensor | None, destination: torch.Tensor, num_out: int) -> torch.Tensor:
    """Which input tokens each merged token covers: the union of its members' sources.

    source: [B, t, N] bool (None: the identity, t = N); destination: [B, t]. Returns [B, num_out, N] bool.
    """
    if source is None:
        batch_size, num_tokens = destination.shape
        eye = torch.eye(num_tokens, dtype=torch.bool, device=destination.device)
        source = eye.expand(batch_size, -1, -1)
    out = torch.zeros(source.shape[0], num_out, source.shape[2], dtype=torch.uint8, device=source.device)
    index = destination[..., None].expand(-1, -1, source.shape[2])
    return out.scatter_reduce_(1, index, source.to(torch.uint8), reduce="amax").bool()


def unmerge(x: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """[B, num_out, C] merged tokens → [B, t, C]: each input token gets the merged token it became part of."""
    return x.gather(1, destination[..., None].expand(-1, -1, x.shape[-1]))


def proportional_attention(attention, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of a CLIP attention module (q/k/v/out_proj, num_heads, head_dim, scale) with log(size) added
    to every key's logits, as the reference's `ToMeAttention`.

    x: [B, t, C]; size: [B, t] or None (plain attention). Returns the attention output [B, t, C] (before the
    residual) and the matching metric [B, t, C / heads], the keys averaged over heads.
    """
    batch_size, num_tokens, channels = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim

    def split(projection):
        return projection(x).view(batch_size, num_tokens, heads, head_dim).transpose(1, 2)

    query, key, value = split(attention.q_proj), split(attention.k_proj), split(attention.v_proj)
    bias = None if size is None else size.log().to(x.dtype)[:, None, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attention.scale)
    out = attention.out_proj(out.transpose(1, 2).reshape(batch_size, num_tokens, channels))
    return out, key.mean(dim=1)


@register_method("tome", stage="encoder")
@torch.no_grad()
def tome(model, pixel_values: torch.Tensor, budget: int, *, prop_attn: bool = True) -> Reduced:
    """ToMe in every vision-tower layer up to LLaVA's feature layer, then the projector: `budget` tokens per image.

    model: a `LlavaForConditionalGeneration` with a CLIP vision tower; pixel_values: [B, 3, H, W] as its image
    processor makes them. prop_attn: proportional attention, log(size) added to the attention logits (the
    reference's `apply_patch(prop_attn=True)`, its setting for off-the-shelf models); off, merged tokens attend
    like single ones (sizes still weight the merges).

    Returns: tokens [B, budget, D] (projector output, in the row-major order of each token's first source patch),
    sources [B, budget, N] bool (a partition of the N patches).
    """
    from vtc.models.llava import feature_layer_index

    if model.config.vision_feature_select_strategy != "default":
        raise NotImplementedError(
            f"tome supports vision_feature_select_strategy 'default' only, got "
            f"{model.config.vision_feature_select_strategy!r}"
        )
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)  # transformers 5 hands the CLIP transformer itself
    num_patches = vision.embeddings.num_patches
    num_layers = feature_layer_index(model) + 1
    schedule = merge_schedule(num_patches, budget, num_layers)

    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values.to(model.device, model.dtype)))
    size = source = None
    for layer, r in zip(vision.encoder.layers[:num_layers], schedule):
        attended, metric = proportional_attention(
            layer.self_attn, layer.layer_norm1(hidden), size if prop_attn else None
        )
        hidden = hidden + attended
        if r > 0:
            destination = bipartite_soft_matching(metric, r, class_token=True)
            num_out = hidden.shape[1] - r
            source = merge_source(source, destination, num_out)
            hidden, size = merge_wavg(hidden, size, destination, num_out)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))

    batch_size = hidden.shape[0]
    if source is None:  # budget = N: nothing merged
        source = torch.eye(num_patches + 1, dtype=torch.bool, device=hidden.device).expand(batch_size, -1, -1)
    patches, sources = hidden[:, 1:], source[:, 1:, 1:]  # CLS (token 0, never merged) dropped
    projected = model.model.multi_modal_projector(patches)
    index = torch.arange(num_patches, device=sources.device)
    first = torch.where(sources, index, num_patches).amin(dim=-1)
    order = first.argsort(dim=-1)
    return Reduced(
        tokens=projected.gather(1, order[..., None].expand(-1, -1, projected.shape[-1])),
        sources=sources.gather(1, order[..., None].expand(-1, -1, num_patches)),
    )
