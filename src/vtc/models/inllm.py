"""Greedy decoding that prunes visual tokens inside the language model (methods registered with stage="llm").

`generate_pruned` runs a VLM's language model layer by layer (embedding → decoder layers → norm → lm_head) with a
`DynamicCache`, for a left-padded batch: LLaVA-1.5's and LLaVA-NeXT's Llama, and Qwen2.5-VL's Qwen2 decoder with its 3-D
multimodal rotary positions (M-RoPE). A plan has one or more stages (`vtc.methods.Stage`; FastV and DART one,
SparseVLM three), each with its layer K:

- prefill runs layers 0 … K₁−1 on the whole sequence; at each stage's layer K the method gets a `LayerState` (the
  hidden states, the cached keys of layer K−1, attention rows of layer K−1 recomputed from the queries it asks for
  and the cached keys) and returns, per row, the image tokens to keep, and at a stage that adds tokens (SparseVLM's
  recycling) their hidden states;
- the hidden states, validity and position ids of the new sequence (text before the image, the kept image tokens in
  sequence order, the added tokens, text after the image) are gathered and the layers up to the next stage run on
  it, so their KV cache holds only those tokens;
- each decode step runs every group of layers between stages over its own cache with its own mask; the new token's
  position continues from the unpruned length in layers < K₁, and in later groups from the unpruned length
  (`positions="original"`, FastV's gapped positions: kept tokens keep their original position ids) or from the
  group's own length (`positions="renumbered"`: the group's tokens are renumbered 0 … L'−1 and the cache continues
  from there, as SparseVLM; added tokens have no original position, so they need this).

`generate_at_positions` is the same loop with nothing pruned and the prompt's position ids given: how a method that
reduces before the LLM feeds its tokens at their original (gapped) positions (`positions: original`).

The model keeps its own attention kernel (SDPA by default): masks are built here as 4-D boolean masks (additive
float masks for eager), and the few attention rows a method needs are recomputed, never read from an eager map.
FlashAttention-2 (which takes 2-D padding masks) is not supported by this loop.

With nothing pruned (keep = N at every stage) the loop gives `model.generate`'s greedy ids token for
token (tested on the tiny model for a left-padded batch).

3-D positions (Qwen2.5-VL): position ids may be [3, B, L], the (t, row, col) ids of M-RoPE. The language model's own
`rotary_emb` turns them into cos/sin tables [B, L, d] (in transformers 5.x it interleaves the three axes' frequencies by
`mrope_section` itself, where older versions did it in `apply_multimodal_rotary_pos_emb`), so the decoder layers and the
recomputed attention rows apply them with the family's ordinary `apply_rotary_pos_emb`, as for Llama. Pruning gathers
all three rows; `positions="original"` keeps each kept token's (t, row, col), `"renumbered"` gives the new sequence a
1-D run (the same id on the three axes, as text); a decode step's id is the same on the three axes and continues from
the largest id of its group's positions + 1 (with original positions the text after the image is never pruned, so
that is the unpruned prompt's largest + 1, what Qwen2.5-VL's cached `rope_deltas` give). The layers get
`position_ids=None` with 3-D positions, as Qwen2.5-VL's text model passes them (they only matter to FlashAttention).

Repetition penalty: Qwen2.5-VL checkpoints set `generation_config.repetition_penalty` (1.05), which `model.generate`
applies even when greedy; `generate_pruned` applies it the same way when given (`repetition_penalized`, over the prompt's
ids and the generated ones), so that keeping everything still gives `model.generate`'s ids.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial

import torch

from vtc import cost
from vtc.methods import (
    DEFAULT_BUDGET_MODE,
    POSITIONS,
    HparamError,
    LayerState,
    Selection,
    Stage,
    get_method,
    in_llm,
)

BUDGET_MODES = ("layer_average", "kept")
# Hyperparameters the loop itself consumes; every other one goes to the method's selection function or its
# schedule, whichever names it as a keyword (both, for one they share).
LOOP_HPARAMS = ("positions", "budget_mode")


@dataclass(frozen=True)
class Plan:
    """How an in-LLM method runs for one budget.

    stages: its pruning points by layer (`Stage`: layer K, image tokens kept of those the layers before processed,
    tokens added); per_layer: visual tokens each decoder layer processes (N before the first stage, each stage's
    kept + added tokens from its layer on); layer_average: their mean. `layer` is the first stage's layer and `keep`
    the visual tokens the last layers process (for a one-stage method: K and the image tokens kept from K on).
    """

    method: str
    stages: tuple[Stage, ...]
    num_patches: int
    positions: str
    per_layer: list[int]
    layer_average: float
    budget_mode: str
    select_hparams: dict

    @property
    def layer(self) -> int:
        return self.stages[0].layer

    @property
    def keep(self) -> int:
        return self.stages[-1].tokens

    def select(self, state: LayerState, stage: Stage) -> torch.Tensor | Selection:
        return get_method(self.method)(state, stage.keep, layer=stage.layer, **self.select_hparams)


def prune_layer_default(method: str) -> int:
    parameter = inspect.signature(get_method(method)).parameters.get("layer")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        raise TypeError(f"in-LLM method {method!r} must take a keyword hyperparameter `layer` with a default")
    return parameter.default


def _keywords(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _checked_counts(method: str, stages: list[Stage], positions: str, num_layers: int, num_patches: int) -> list[int]:
    """Visual tokens per decoder layer of `stages`, which must prune at increasing layers 1 … L−1, each keeping at most
    the tokens before it and adding at most those it drops; added tokens have no original position id."""
    if not stages:
        raise ValueError(f"method {method!r}: its schedule has no stage")
    previous, current = 0, num_patches
    for index, stage in enumerate(stages):
        if not previous < stage.layer < num_layers or not 0 <= stage.keep <= current:
            raise ValueError(f"method {method!r}: stage {index} {stage} does not fit {num_layers} layers after "
                             f"{previous} with {current} visual tokens")  # fmt: skip
        if not 0 <= stage.merged <= current - stage.keep:
            raise ValueError(f"method {method!r}: stage {index} adds {stage.merged} tokens for {current - stage.keep}")
        if stage.merged and positions == "original":
            raise HparamError(
                "positions",
                f"method {method!r}: positions original keeps each token's prompt position, but the {stage.merged} "
                f"tokens stage {index} adds have none; use positions: renumbered",
            )
        previous, current = stage.layer, stage.tokens
    return cost.staged_tokens_per_layer(num_layers, num_patches, {stage.layer: stage.tokens for stage in stages})


def plan(method: str, budget: int, hparams: dict, num_layers: int, num_patches: int) -> Plan:
    """The stages (prune layers, tokens kept and added) and the per-layer counts of `method` at `budget`.

    With budget_mode "layer_average" (the default, as FastV, SparseVLM and DART report their budgets) `budget` is the
    mean over the L layers of the visual tokens each processes; for a one-stage method keep = round((L·budget − K·N) /
    (L − K)) (`vtc.cost.kept_for_layer_average`; FastV K=2 on LLaVA-1.5-7B: 192 → 166, 128 → 98, 64 → 30). With
    "kept", `budget` is the count after layer K itself. A method with a `schedule` (SparseVLM) turns the budget and
    its hyperparameters into its stages itself. Raises `HparamError` naming the hyperparameter (None: the budget)
    that makes the setting impossible.
    """
    spec = in_llm(method)
    hparams = dict(hparams or {})
    positions = hparams.pop("positions", spec.positions)
    budget_mode = hparams.pop("budget_mode", DEFAULT_BUDGET_MODE)
    if positions not in POSITIONS:
        raise HparamError("positions", f"method {method!r}: positions must be one of {POSITIONS}, got {positions!r}")
    if budget_mode not in BUDGET_MODES:
        raise HparamError(
            "budget_mode", f"method {method!r}: budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}"
        )
    select_names = _keywords(get_method(method)) - {"layer"}
    schedule_names = _keywords(spec.schedule) if spec.schedule else {"layer"}
    unknown = sorted(set(hparams) - select_names - schedule_names)
    if unknown:
        allowed = ", ".join(sorted(select_names | schedule_names | {"positions", "budget_mode"}))
        raise HparamError(unknown[0], f"method {method!r} has no hyperparameter {unknown[0]!r}; it takes {allowed}")
    if spec.schedule is None:
        stages = [_one_stage(method, budget, budget_mode, hparams.pop("layer", None), num_layers, num_patches)]
    else:
        schedule_hparams = {name: hparams[name] for name in schedule_names & set(hparams)}
        stages = spec.schedule(budget, budget_mode, num_layers, num_patches, **schedule_hparams)
    per_layer = _checked_counts(method, stages, positions, num_layers, num_patches)
    select_hparams = {name: hparams[name] for name in select_names & set(hparams)}
    return Plan(
        method, tuple(stages), num_patches, positions, per_layer, cost.layer_average(per_layer), budget_mode,
        select_hparams,
    )  # fmt: skip


def _one_stage(method: str, budget: int, budget_mode: str, layer, num_layers: int, num_patches: int) -> Stage:
    """The stage of a method that prunes once, at its `layer` hyperparameter (default: its selection function's)."""
    layer = prune_layer_default(method) if layer is None else layer
    if not 1 <= layer < num_layers:
        raise HparamError("layer", f"method {method!r}: layer must be between 1 and {num_layers - 1}, got {layer}")
    if budget_mode == "kept":
        keep = budget
    else:
        keep = round(cost.kept_for_layer_average(budget, num_layers, layer, num_patches))
    if not 0 <= keep <= num_patches:
        lowest = layer * num_patches / num_layers
        raise HparamError(
            None,
            f"method {method!r} cannot reach a layer average of {budget} visual tokens: its first {layer} of "
            f"{num_layers} layers see all {num_patches}, so the average is at least {lowest:g} (set budget_mode: kept "
            "to give the count after pruning instead)",
        )
    return Stage(layer, keep)


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


def query_attention(
    attention, hidden_in: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, cos_sin, rows: torch.Tensor
) -> torch.Tensor:
    """Head-averaged attention weights [B, L] of the query positions `rows` at one layer, averaged over those queries
    (zeros for a row without one).

    attention: the layer's `self_attn`; hidden_in: [B, L, D] the layer's input *after* its input RMSNorm; keys:
    [B, H_kv, L, d] its cached keys (after RoPE); valid: [B, L] bool; cos_sin: the rotary embedding of the positions;
    rows: [B, L] bool. Recomputes only those queries: the rows eager attention's map would have (causal, valid keys),
    without materialising B·H·L² weights.
    """
    weights, weight = query_weights(attention, hidden_in, keys, valid, cos_sin, rows)
    return (weights.mean(dim=1) * weight[..., None]).sum(dim=1)


def _rotary_functions(attention):
    """(apply_rotary_pos_emb, repeat_kv) of the modeling module that defines `attention`'s class (Llama's, Qwen2.5-VL's,
    ...), Llama's where that module has none: the layer's own rotary application, on the cos/sin tables [B, L, d] that
    its language model's `rotary_emb` makes (3-D M-RoPE positions included)."""
    import sys

    from transformers.models.llama import modeling_llama

    module = sys.modules.get(type(attention).__module__)
    return (
        getattr(module, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb),
        getattr(module, "repeat_kv", modeling_llama.repeat_kv),
    )


def query_weights(
    attention, hidden_in: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, cos_sin, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`query_attention`'s pieces: per-head weights [B, H, Q, L] of each row's query positions (first, ascending, then
    fillers) and each query's share [B, Q] of its row's average (1/count for a query, 0 for a filler)."""
    apply_rotary_pos_emb, repeat_kv = _rotary_functions(attention)

    batch, length, width = *rows.shape, max(int(rows.sum(dim=1).max()), 1)
    count = rows.sum(dim=1, keepdim=True)
    # each row's query positions first (ascending), then fillers whose weight is zero
    picked = rows.long().argsort(dim=1, descending=True, stable=True)[:, :width]  # [B, Q]
    weight = (torch.arange(width, device=rows.device)[None] < count) / count.clamp(min=1)  # [B, Q]
    hidden = hidden_in.gather(1, picked[..., None].expand(-1, -1, hidden_in.shape[-1]))
    query = attention.q_proj(hidden).view(batch, width, -1, attention.head_dim).transpose(1, 2)  # [B, H, Q, d]
    cos, sin = (table.gather(1, picked[..., None].expand(-1, -1, table.shape[-1])) for table in cos_sin)
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    keys = repeat_kv(keys, attention.num_key_value_groups)
    scores = (query.float() @ keys.float().transpose(-1, -2)) * attention.scaling  # [B, H, Q, L]
    key_positions = torch.arange(length, device=rows.device)[None, None]
    # a filler on a padding position attends to itself, so that no row is all -inf (NaN times a zero weight is NaN)
    allowed = (key_positions <= picked[..., None]) & valid[:, None, :] | (key_positions == picked[..., None])
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1), weight


def upcoming_attention(layer, hidden: torch.Tensor, valid: torch.Tensor, cos_sin, rows: torch.Tensor) -> torch.Tensor:
    """`query_attention` of the query positions `rows` at decoder layer `layer` before it runs: its input norm, query
    and key projections applied to its input `hidden` [B, L, D], the keys rotated by `cos_sin` (the positions the layer
    would give them). [B, L]; the whole sequence's keys are projected, once per call."""
    attention = layer.self_attn
    apply_rotary_pos_emb, _ = _rotary_functions(attention)
    hidden_in = layer.input_layernorm(hidden)
    batch, length = hidden.shape[:2]
    keys = attention.k_proj(hidden_in).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    keys, _ = apply_rotary_pos_emb(keys, keys, *cos_sin)
    return query_attention(attention, hidden_in, keys, valid, cos_sin, rows)


def last_token_attention(
    attention, hidden_in: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, cos_sin
) -> torch.Tensor:
    """`query_attention` of the last position of each row: [B, L] (FastV's row)."""
    last = torch.zeros_like(valid)
    last[:, -1] = True
    return query_attention(attention, hidden_in, keys, valid, cos_sin, last)


def stage_order(image: torch.Tensor, kept: torch.Tensor, added: int, length: int) -> torch.Tensor:
    """Where each position of the sequence after a stage comes from: indices [B, L'] into a row's L positions followed
    by its `added` new tokens (L + j for the j-th). The sequence is the positions before the row's image block, the kept
    image tokens, the added tokens, then the positions after the block; L' = L − M + k + added.

    image: [B, M] the row's image block (contiguous, ascending); kept: [B, k] indices into it, ascending.
    """
    batch, block = image.shape
    keep, size = kept.shape[1], kept.shape[1] + added
    slots = torch.arange(length - block + size, device=image.device)[None]  # [1, L']
    offset = slots - image[:, :1]  # [B, L'] slot relative to the block's start
    padded = torch.cat([kept, kept.new_zeros(batch, 1)], dim=1)  # gathers (unused) with keep = 0 too
    from_kept = image[:, :1] + padded.gather(1, offset.clamp(0, keep))
    index = torch.where(offset < 0, slots, slots - size + block)
    index = torch.where((offset >= 0) & (offset < keep), from_kept, index)
    return torch.where((offset >= keep) & (offset < size), length + offset - keep, index)


@dataclass
class PrunedGeneration:
    """ids [B, T] new tokens (padded with pad_token_id after EOS, as `model.generate`); kept [B, keep] the image tokens
    the last stage kept, indices into the image tokens it saw (for a one-stage method: the row's N, the tokens layers
    ≥ K processed); sources [B, V, N] bool, the row's N image tokens that each of the V visual tokens of the last
    layers covers (a kept token itself, an added token those merged into it)."""

    ids: torch.Tensor
    kept: torch.Tensor
    sources: torch.Tensor


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _layer_position_ids(positions: torch.Tensor) -> torch.Tensor | None:
    """What a decoder layer gets as `position_ids` (only FlashAttention reads it): 1-D ids as they are; none for 3-D
    M-RoPE ids, as Qwen2.5-VL's text model passes none for them."""
    return positions if positions.dim() == 2 else None


def gather_positions(positions: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] or [3, B, L] → those at `order` [B, L'] of each row: [B, L'] or [3, B, L']."""
    return positions.gather(-1, order.expand(*positions.shape[:-2], *order.shape))


def renumbered_positions(valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`padded_positions(valid)`, shaped like `like` ([B, L], or [3, B, L]: the same 1-D run on the three axes)."""
    positions = padded_positions(valid)
    return positions if like.dim() == 2 else positions.expand(like.shape[0], -1, -1)


def next_position(positions: torch.Tensor) -> torch.Tensor:
    """Position id of the first decode step after a group's sequence: 1-D [B, 1], its last id + 1; 3-D [3, B, 1], the
    row's largest id over the three axes + 1 on each axis (Qwen2.5-VL's `rope_deltas`: the text after an image starts
    past the image's largest row or column id, so the last id need not be the largest in general)."""
    if positions.dim() == 2:
        return positions[:, -1:] + 1
    return (positions.amax(dim=(0, 2)) + 1).view(1, -1, 1).expand(positions.shape[0], -1, 1)


def _check_positions(positions: torch.Tensor, valid: torch.Tensor) -> None:
    if positions.shape[-2:] != valid.shape or not (positions.dim() == 2 or positions.shape[:1] == (3,)):
        raise ValueError(
            f"position_ids must be [B, L] or [3, B, L] for an attention mask {tuple(valid.shape)}, got "
            f"{tuple(positions.shape)}"
        )


def _check_full_attention(config) -> None:
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise NotImplementedError(
            f"the in-LLM decoder loop builds full causal masks; layer types {sorted(kinds)} (sliding-window layers) "
            "are not supported"
        )


def repetition_penalized(logits: torch.Tensor, seen: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """transformers' `RepetitionPenaltyLogitsProcessor`: logits [B, V] of the tokens in `seen` [B, V] bool divided by
    `penalty` where positive, multiplied by it where negative; unchanged for penalty None or 1."""
    if penalty is None or penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def seen_tokens(prompt_ids: torch.Tensor, attention_mask: torch.Tensor, vocabulary: int) -> torch.Tensor:
    """[B, V] bool: the ids of each row's prompt [B, L] (padding excluded), what the repetition penalty starts from."""
    seen = torch.zeros(prompt_ids.shape[0], vocabulary, dtype=torch.bool, device=prompt_ids.device)
    # a padding position scatters the row's last id, which is a prompt id anyway (left padding)
    return seen.scatter_(1, torch.where(attention_mask.bool(), prompt_ids, prompt_ids[:, -1:]), True)


def _run_layers(language_model, layers, hidden, valid, positions, cache):
    """Prefill of `layers` on the sequence: (output, the last layer's input after its input norm, rotary embedding)."""
    rope = language_model.rotary_emb(hidden, positions)
    mask = causal_mask(valid, valid.shape[1], language_model.config._attn_implementation, hidden.dtype)
    layer_positions = _layer_position_ids(positions)
    normed_in = None
    for index, layer in enumerate(layers):
        if index == len(layers) - 1:
            normed_in = layer.input_layernorm(hidden)
        hidden = layer(hidden, attention_mask=mask, position_ids=layer_positions, past_key_values=cache,
                       use_cache=True, position_embeddings=rope)  # fmt: skip
    return hidden, normed_in, rope


def _selection(result, batch: int, stage: Stage, hidden: torch.Tensor, block: int, method: str) -> Selection:
    """A method's answer at `stage` (kept indices, or a `Selection`), checked against the stage, kept ascending."""
    if not isinstance(result, Selection):
        result = Selection(result, hidden.new_zeros(batch, 0, hidden.shape[-1]),
                           torch.zeros(batch, 0, block, dtype=torch.bool, device=hidden.device))  # fmt: skip
    expected = {"kept": (batch, stage.keep), "merged": (batch, stage.merged, hidden.shape[-1]),
                "members": (batch, stage.merged, block)}  # fmt: skip
    for name, shape in expected.items():
        got = tuple(getattr(result, name).shape)
        if got != shape:
            raise ValueError(f"method {method!r} returned {name} {got}, expected {shape}")
    return Selection(result.kept.sort(dim=1).values, result.merged.to(hidden.dtype), result.members)


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
    position_ids: torch.Tensor | None = None,
    prompt_ids: torch.Tensor | None = None,
    repetition_penalty: float | None = None,
) -> PrunedGeneration:
    """Greedy generation for a left-padded batch, pruning image tokens at each stage of `plan_`.

    inputs_embeds [B, L, D] and attention_mask [B, L] as `llava.splice_visual_tokens` makes them; image_mask [B, L]
    bool marks each row's N image positions (the same N in every row, one contiguous block). position_ids: the prompt's
    [B, L] or [3, B, L] (M-RoPE) ids; default `padded_positions` (what `model.generate` gives a 1-D model).
    repetition_penalty (None or 1: none) and prompt_ids [B, L]: the penalty to apply to the prompt's token ids and the
    generated ones (`repetition_penalized`), as `model.generate` does with the generation config's.
    """
    from transformers import DynamicCache

    language_model = model.model.language_model
    _check_full_attention(language_model.config)
    layers = language_model.layers
    batch, num_patches = inputs_embeds.shape[0], plan_.num_patches
    valid = attention_mask.bool()
    penalized = repetition_penalty is not None and repetition_penalty != 1.0
    if penalized and prompt_ids is None:
        raise ValueError(f"a repetition penalty ({repetition_penalty}) needs the prompt's ids (prompt_ids)")
    seen = seen_tokens(prompt_ids, attention_mask, model.lm_head.out_features) if penalized else None
    image_counts = image_mask.sum(dim=1)
    if not bool((image_counts == num_patches).all()):
        raise ValueError(f"every row must hold {num_patches} image tokens, got {image_counts.tolist()}")
    image = image_mask.nonzero()[:, 1].view(batch, num_patches)
    if not bool((image[:, -1] - image[:, 0] == num_patches - 1).all()):
        raise ValueError("every row's image tokens must be one contiguous block")
    prompt_image = image
    sources = torch.eye(num_patches, dtype=torch.bool, device=image.device).expand(batch, -1, -1)
    cache = DynamicCache(config=language_model.config)

    positions = padded_positions(valid) if position_ids is None else position_ids
    _check_positions(positions, valid)
    bounds = [stage.layer for stage in plan_.stages] + [len(layers)]
    hidden, normed_in, rope = _run_layers(language_model, layers[: bounds[0]], inputs_embeds, valid, positions, cache)
    # per group of layers between stages, for the decode steps: its layers, validity and next position id
    groups = [(layers[: bounds[0]], valid, next_position(positions))]
    for stage, stop in zip(plan_.stages, bounds[1:]):
        keys = cache.layers[stage.layer - 1].keys
        attend = partial(query_attention, layers[stage.layer - 1].self_attn, normed_in, keys, valid, rope)
        is_image = torch.zeros_like(valid).scatter_(1, image, True)
        state = LayerState(
            hidden=hidden,
            normed=language_model.norm(hidden),
            keys=keys,
            last_attention=last_token_attention(layers[stage.layer - 1].self_attn, normed_in, keys, valid, rope),
            image=image,
            text=valid & ~is_image,
            valid=valid,
            attention=attend,
            prompt=inputs_embeds,
            prompt_image=prompt_image,
            layer_attention=partial(upcoming_attention, layers[stage.layer], hidden, valid, rope),
        )
        selection = _selection(plan_.select(state, stage), batch, stage, hidden, image.shape[1], plan_.method)
        kept = selection.kept
        order = stage_order(image, kept, stage.merged, hidden.shape[1])
        hidden = torch.cat([hidden, selection.merged], dim=1)
        hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        valid = torch.cat([valid, torch.ones_like(valid[:, : stage.merged])], dim=1).gather(1, order)
        # `plan` allows original positions only where nothing is added: order then indexes the old positions only
        if plan_.positions == "original":
            positions = gather_positions(positions, order)
        else:
            positions = renumbered_positions(valid, positions)
        sources = torch.cat(
            [sources.gather(1, kept[..., None].expand(-1, -1, num_patches)),
             (selection.members.float() @ sources.float()) > 0],
            dim=1,
        )  # fmt: skip
        image = image[:, :1] + torch.arange(stage.tokens, device=image.device)
        group = layers[stage.layer : stop]
        hidden, normed_in, rope = _run_layers(language_model, group, hidden, valid, positions, cache)
        groups.append((group, valid, next_position(positions)))
    ids = _decode(model, hidden, cache, groups, max_new_tokens, eos_token_id, pad_token_id, seen, repetition_penalty)
    return PrunedGeneration(ids, kept, sources)


@torch.no_grad()
def generate_at_positions(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id=None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy ids [B, T] (padded with pad_token_id after EOS, as `model.generate`) of a left-padded batch whose prompt
    positions have the rotary position ids `position_ids` [B, L]; each new token continues from its row's last prompt
    position + 1. inputs_embeds [B, L, D] and attention_mask [B, L] as `llava.splice_visual_tokens` makes them. With
    `padded_positions(attention_mask.bool())` these are `model.generate`'s greedy ids."""
    from transformers import DynamicCache

    language_model = model.model.language_model
    valid = attention_mask.bool()
    cache = DynamicCache(config=language_model.config)
    layers = language_model.layers
    hidden, _, _ = _run_layers(language_model, layers, inputs_embeds, valid, position_ids, cache)
    groups = [(layers, valid, next_position(position_ids))]
    return _decode(model, hidden, cache, groups, max_new_tokens, eos_token_id, pad_token_id)


def _decode(
    model, hidden, cache, groups, max_new_tokens: int, eos_token_id, pad_token_id, seen=None, repetition_penalty=None
) -> torch.Tensor:
    """Greedy decode steps after a prefill into `cache` whose last hidden states are `hidden` [B, L, D]: ids [B, T].

    groups: per group of consecutive decoder layers, (layers, validity [B, S] of the positions its cache holds,
    position id [B, 1] or [3, B, 1] of the next token); each step runs every group over its own cache and mask.
    seen: [B, V] bool, the ids the repetition penalty applies to (updated in place), or None."""
    language_model = model.model.language_model
    batch = hidden.shape[0]
    implementation = language_model.config._attn_implementation
    eos = torch.tensor(_eos_list(eos_token_id), device=hidden.device, dtype=torch.long)
    unfinished = torch.ones(batch, dtype=torch.bool, device=hidden.device)
    generated = []
    for step in range(max_new_tokens):
        logits = model.lm_head(language_model.norm(hidden[:, -1:]))[:, -1].float()
        if seen is not None:
            logits = repetition_penalized(logits, seen, repetition_penalty)
        token = logits.argmax(dim=-1)
        if pad_token_id is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        generated.append(token)
        if seen is not None:
            seen.scatter_(1, token[:, None], unfinished[:, None])
        unfinished &= ~torch.isin(token, eos)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        hidden = language_model.embed_tokens(token[:, None])
        ones = torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
        for index, (group, group_valid, position) in enumerate(groups):
            group_valid = torch.cat([group_valid, ones], dim=1)
            rope = language_model.rotary_emb(hidden, position)
            mask = causal_mask(group_valid, 1, implementation, hidden.dtype)
            layer_position = _layer_position_ids(position)
            for layer in group:
                hidden = layer(hidden, attention_mask=mask, position_ids=layer_position, past_key_values=cache,
                               use_cache=True, position_embeddings=rope)  # fmt: skip
            groups[index] = (group, group_valid, position + 1)
    return torch.stack(generated, dim=1)
