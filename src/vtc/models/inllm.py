"""Greedy decoding that prunes visual tokens inside the language model (methods registered with stage="llm").

`generate_pruned` runs LLaVA's language model layer by layer (embedding → decoder layers → norm → lm_head) with a
`DynamicCache`, for a left-padded batch:

- prefill runs layers 0 … K−1 on the whole sequence; at layer K the method gets a `LayerState` (the hidden states,
  the cached keys of layer K−1, the head-averaged attention of each row's last prompt token at layer K−1, recomputed
  from that token's query and the cached keys) and returns, per row, the image tokens to keep;
- the hidden states, validity and position ids of the kept positions (every text token, the kept image tokens, in
  sequence order) are gathered and layers K … run on the shortened sequence, so their KV cache holds only the kept
  tokens;
- each decode step runs every layer over its own cache with its own mask; the new token's position continues from
  the unpruned length in layers < K, and in layers ≥ K from the unpruned length (`positions="original"`, FastV's
  gapped positions: kept tokens keep their original position ids) or from the pruned length
  (`positions="renumbered"`: kept tokens are renumbered 0 … L'−1 and the cache continues from there).

The model keeps its own attention kernel (SDPA by default): masks are built here as 4-D boolean masks (additive
float masks for eager), and the few attention rows a method needs are recomputed, never read from an eager map.
FlashAttention-2 (which takes 2-D padding masks) is not supported by this loop.

With nothing pruned (keep = N) the loop gives `model.generate`'s greedy ids token for
token (tested on the tiny model for a left-padded batch).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from vtc import cost
from vtc.methods import LayerState, get_method, method_stage

POSITIONS = ("original", "renumbered")
BUDGET_MODES = ("layer_average", "kept")
# Hyperparameters the loop itself consumes; every other hyperparameter goes to the method's selection function.
LOOP_HPARAMS = ("positions", "budget_mode")


@dataclass(frozen=True)
class Plan:
    """How an in-LLM method runs for one budget.

    layer: K, the first layer that sees only the kept image tokens; keep: image tokens kept from layer K on;
    per_layer: visual tokens each decoder layer processes ([N]·K + [keep]·(L−K)); layer_average: their mean.
    """

    method: str
    layer: int
    keep: int
    num_patches: int
    positions: str
    per_layer: list[int]
    layer_average: float
    budget_mode: str
    select_hparams: dict

    def select(self, state: LayerState) -> torch.Tensor:
        return get_method(self.method)(state, self.keep, layer=self.layer, **self.select_hparams)


def prune_layer_default(method: str) -> int:
    parameter = inspect.signature(get_method(method)).parameters.get("layer")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise TypeError(f"in-LLM method {method!r} must take a keyword hyperparameter `layer` with a default")
    return parameter.default


def plan(method: str, budget: int, hparams: dict, num_layers: int, num_patches: int) -> Plan:
    """The prune layer, the tokens kept after it and the per-layer counts of `method` at `budget`.

    With budget_mode "layer_average" (the default, as FastV, SparseVLM and DART report their budgets) `budget` is the
    mean over the L layers of the visual tokens each processes: keep = round((L·budget − K·N) / (L − K))
    (`vtc.cost.kept_for_layer_average`; FastV K=2 on LLaVA-1.5-7B: 192 → 166, 128 → 98, 64 → 30). With "kept",
    `budget` is the count after layer K itself.
    """
    if method_stage(method) != "llm":
        raise ValueError(f"method {method!r} does not prune inside the language model")
    hparams = dict(hparams or {})
    positions = hparams.pop("positions", "original")
    budget_mode = hparams.pop("budget_mode", "layer_average")
    layer = hparams.pop("layer", prune_layer_default(method))
    if positions not in POSITIONS:
        raise ValueError(f"method {method!r}: positions must be one of {POSITIONS}, got {positions!r}")
    if budget_mode not in BUDGET_MODES:
        raise ValueError(f"method {method!r}: budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}")
    if not 1 <= layer < num_layers:
        raise ValueError(f"method {method!r}: layer must be between 1 and {num_layers - 1}, got {layer}")
    if budget_mode == "kept":
        keep = budget
    else:
        keep = round(cost.kept_for_layer_average(budget, num_layers, layer, num_patches))
    if not 0 <= keep <= num_patches:
        lowest = layer * num_patches / num_layers
        raise ValueError(
            f"method {method!r} cannot reach a layer average of {budget} visual tokens: its first {layer} of "
            f"{num_layers} layers see all {num_patches}, so the average is at least {lowest:g} (set budget_mode: kept "
            "to give the count after pruning instead)"
        )
    per_layer = [num_patches] * layer + [keep] * (num_layers - layer)
    return Plan(
        method, layer, keep, num_patches, positions, per_layer, cost.layer_average(per_layer), budget_mode, hparams
    )


def causal_mask(valid: torch.Tensor, num_queries: int, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Attention mask [B, 1, Q, S] of the last Q of S positions: causal, no valid query attends a padding key.

    valid: [B, S] bool. A padding query attends to itself only, so no row is all masked (SDPA would return NaN there,
    and NaN values poison the rows that multiply them by a zero weight). Boolean (True = attend) for SDPA, additive
    (0 / dtype min) for eager.
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"in-LLM pruning builds 4-D masks, which the {attn_implementation!r} kernel does not take; load the model "
            "with attn_implementation sdpa or eager"
        )
    length = valid.shape[1]
    keys = torch.arange(length, device=valid.device)
    queries = keys[length - num_queries :, None]
    allowed = ((keys[None] <= queries)[None] & valid[:, None, :]) | (keys[None] == queries)[None]
    allowed = allowed[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def padded_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch as `model.generate` makes them: 0 … n−1 on the valid positions, 0 on padding."""
    return (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)


def last_token_attention(
    attention, hidden_in: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, cos_sin
) -> torch.Tensor:
    """Head-averaged attention weights [B, L] of the last position of each row at one layer.

    attention: the layer's `self_attn`; hidden_in: [B, L, D] the layer's input *after* its input RMSNorm; keys:
    [B, H_kv, L, d] its cached keys (after RoPE); cos_sin: the rotary embedding of the positions. Recomputes only the
    last query (what eager attention's last row is, without materialising B·H·L² weights).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    batch, length, _ = hidden_in.shape
    query = attention.q_proj(hidden_in[:, -1:]).view(batch, 1, -1, attention.head_dim).transpose(1, 2)
    cos, sin = cos_sin
    query, _ = apply_rotary_pos_emb(query, query, cos[:, -1:], sin[:, -1:])
    keys = repeat_kv(keys, attention.num_key_value_groups)
    scores = (query.float() @ keys.float().transpose(-1, -2)).squeeze(2) * attention.scaling  # [B, H, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=1)


@dataclass
class PrunedGeneration:
    """ids [B, T] new tokens (padded with pad_token_id after EOS, as `model.generate`); kept [B, keep] the image tokens
    (indices into the row's N) that layers ≥ K processed."""

    ids: torch.Tensor
    kept: torch.Tensor


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


@torch.no_grad()
def generate_pruned(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    plan_: Plan,
    max_new_tokens: int,
    eos_token_id=None,
    pad_token_id: int | None = None,
) -> PrunedGeneration:
    """Greedy generation for a left-padded batch, pruning image tokens before layer `plan_.layer`.

    inputs_embeds [B, L, D] and attention_mask [B, L] as `llava.splice_visual_tokens` makes them; image_mask [B, L]
    bool marks each row's N image positions (the same N in every row).
    """
    from transformers import DynamicCache

    language_model = model.model.language_model
    layers = language_model.layers
    implementation = language_model.config._attn_implementation
    dtype = inputs_embeds.dtype
    batch, length, _ = inputs_embeds.shape
    valid = attention_mask.bool()
    image_counts = image_mask.sum(dim=1)
    if not bool((image_counts == plan_.num_patches).all()):
        raise ValueError(f"every row must hold {plan_.num_patches} image tokens, got {image_counts.tolist()}")
    split = plan_.layer  # 1 ≤ K < L (`plan`); keep = N runs the same path, every image token kept
    cache = DynamicCache(config=language_model.config)

    positions_early = padded_positions(valid)
    hidden = inputs_embeds
    rope = language_model.rotary_emb(hidden, positions_early)
    mask = causal_mask(valid, length, implementation, dtype)
    normed_in = None
    for index, layer in enumerate(layers[:split]):
        if index == split - 1:
            normed_in = layer.input_layernorm(hidden)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions_early, past_key_values=cache,
                       use_cache=True, position_embeddings=rope)  # fmt: skip

    # layer K: the method selects, the kept positions are gathered, layers K … run on them
    before = layers[split - 1].self_attn
    keys = cache.layers[split - 1].keys
    state = LayerState(
        hidden=hidden,
        normed=language_model.norm(hidden),
        keys=keys,
        last_attention=last_token_attention(before, normed_in, keys, valid, rope),
        image=image_mask.nonzero()[:, 1].view(batch, plan_.num_patches),
        text=valid & ~image_mask,
        valid=valid,
    )
    kept = plan_.select(state)
    if kept.shape != (batch, plan_.keep):
        raise ValueError(
            f"method {plan_.method!r} returned {tuple(kept.shape)} indices, expected {(batch, plan_.keep)}"
        )
    keep_mask = ~image_mask
    keep_mask.scatter_(1, state.image.gather(1, kept), True)
    order = keep_mask.nonzero()[:, 1].view(batch, -1)  # ascending: text and kept image tokens in sequence order
    hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
    valid_late = valid.gather(1, order)
    if plan_.positions == "original":
        positions_late = positions_early.gather(1, order)
    else:
        positions_late = padded_positions(valid_late)
    rope = language_model.rotary_emb(hidden, positions_late)
    mask = causal_mask(valid_late, valid_late.shape[1], implementation, dtype)
    for layer in layers[split:]:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions_late, past_key_values=cache,
                       use_cache=True, position_embeddings=rope)  # fmt: skip

    eos = torch.tensor(_eos_list(eos_token_id), device=hidden.device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=hidden.device)
    generated = []
    next_early, next_late = positions_early[:, -1:] + 1, positions_late[:, -1:] + 1
    for step in range(max_new_tokens):
        logits = model.lm_head(language_model.norm(hidden[:, -1:]))[:, -1].float()
        token = logits.argmax(dim=-1)
        if pad_token_id is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        generated.append(token)
        unfinished &= ~torch.isin(token, eos)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        hidden = language_model.embed_tokens(token[:, None])
        ones = torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
        valid = torch.cat([valid, ones], dim=1)
        valid_late = torch.cat([valid_late, ones], dim=1)
        for group, group_valid, position in (
            (layers[:split], valid, next_early),
            (layers[split:], valid_late, next_late),
        ):
            rope = language_model.rotary_emb(hidden, position)
            mask = causal_mask(group_valid, 1, implementation, dtype)
            for layer in group:
                hidden = layer(hidden, attention_mask=mask, position_ids=position, past_key_values=cache,
                               use_cache=True, position_embeddings=rope)  # fmt: skip
        next_early, next_late = next_early + 1, next_late + 1
    return PrunedGeneration(torch.stack(generated, dim=1), kept)
