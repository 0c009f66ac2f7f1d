"""The saliency study: where the language model's text-to-image attention looks, layer by layer, and how stable it is.

arXiv 2504.17892 argues from cross-modal attention maps (its Figures 4 and 5) that attention-based saliency is
unreliable and volatile. This module records those maps and measures that claim:

- `record_batch`: one full-token prefill of a left-padded batch that records, for every requested decoder layer ℓ, the
  head-averaged attention weights of ℓ over the image positions from two query kinds: "last" (the last prompt token,
  FastV's row) and "question" (averaged over the tokens of the question text); and a per-head summary (each head's
  share of its attention on the image and the normalised entropy of its image attention, from the last token). The
  model keeps its kernel (SDPA): the rows are recomputed from each layer's queries and its cached (post-RoPE) keys,
  as `vtc.models.inllm.query_attention` does; never a B·H·L² map.
- comparison functions on maps [..., N]: `spearman` (tie-corrected: Pearson of average ranks), `topk_overlap`,
  `entropy`, `top_share`, `layer_correlation` (a layer × layer Spearman matrix per sample);
- `volatility_rows` and `grounding_rows`: the long table rows the `saliency_analyze` rule writes.

Maps are *not* renormalised over the image: a layer whose attention goes to text or to a sink token has a small sum,
which is itself reported (`image_share`). Ranks, overlaps, entropy and shares are scale-free.
"""

from __future__ import annotations

import math
from itertools import combinations

import torch

KINDS = ("last", "question")


def question_rows(tokenizer, prompts: list[str], texts: list[str], image_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions of each row's question text (`texts[b]` as it appears in `prompts[b]`, the last
    occurrence) in the spliced, left-padded sequence that `vtc.models.llava.splice_with_image_mask` builds from those
    prompts (one `<image>` placeholder each, expanded to the row's image block).

    Token spans come from the fast tokenizer's character offsets; a token is a question token when its span overlaps
    the question's characters. A row whose question is not found raises: the caller's prompt differs from its text.
    """
    batch, length = image_mask.shape
    rows = torch.zeros(batch, length, dtype=torch.bool)
    counts = image_mask.sum(dim=1).tolist()
    ends = (length - image_mask.flip(1).int().argmax(dim=1)).tolist()  # one past each row's image block
    for row, (prompt, text) in enumerate(zip(prompts, texts)):
        begin = prompt.rfind(text)
        if not text or begin < 0:
            raise ValueError(f"question text {text!r} not found in prompt {prompt!r}")
        end = begin + len(text)
        encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        image_at = [i for i, token in enumerate(ids) if token == tokenizer.convert_tokens_to_ids("<image>")]
        if len(image_at) != 1:
            raise ValueError(f"expected one <image> placeholder in {prompt!r}, found {len(image_at)}")
        # the tokens after the placeholder end where the row ends; those before it end where its image block starts
        after = len(ids) - image_at[0] - 1
        for index, (start, stop) in enumerate(offsets):
            if stop > begin and start < end and index != image_at[0]:
                if index > image_at[0]:
                    position = ends[row] + (index - image_at[0] - 1)
                else:
                    position = ends[row] - counts[row] - (image_at[0] - index)
                rows[row, position] = True
        if not rows[row].any() or ends[row] + after != length:
            raise ValueError(f"question tokens of {prompt!r} do not line up with its spliced row")
    return rows.to(image_mask.device)


def head_attention(
    attention, hidden_in: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, cos_sin, rows: torch.Tensor
) -> torch.Tensor:
    """Per-head attention weights [B, H, L] of the query positions `rows` [B, L] bool at one layer, averaged over
    those queries (zeros for a row without one): `vtc.models.inllm.query_attention` before its mean over heads.

    attention: the layer's `self_attn`; hidden_in: [B, L, D] the layer's input after its input RMSNorm; keys:
    [B, H_kv, L, d] its cached keys (after RoPE); valid: [B, L] bool; cos_sin: the rotary embedding of the positions.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    batch, length, width = *rows.shape, max(int(rows.sum(dim=1).max()), 1)
    count = rows.sum(dim=1, keepdim=True)
    picked = rows.long().argsort(dim=1, descending=True, stable=True)[:, :width]  # [B, Q] queries first, then fillers
    weight = (torch.arange(width, device=rows.device)[None] < count) / count.clamp(min=1)  # [B, Q]
    hidden = hidden_in.gather(1, picked[..., None].expand(-1, -1, hidden_in.shape[-1]))
    query = attention.q_proj(hidden).view(batch, width, -1, attention.head_dim).transpose(1, 2)  # [B, H, Q, d]
    cos, sin = (table.gather(1, picked[..., None].expand(-1, -1, table.shape[-1])) for table in cos_sin)
    query, _ = apply_rotary_pos_emb(query, query, cos, sin)
    keys = repeat_kv(keys, attention.num_key_value_groups)
    scores = (query.float() @ keys.float().transpose(-1, -2)) * attention.scaling  # [B, H, Q, L]
    key_positions = torch.arange(length, device=rows.device)[None, None]
    allowed = (key_positions <= picked[..., None]) & valid[:, None, :] | (key_positions == picked[..., None])
    weights = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)  # [B, H, Q, L]
    return (weights * weight[:, None, :, None]).sum(dim=2)


@torch.no_grad()
def record_batch(
    model,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    image_mask: torch.Tensor,
    question_mask: torch.Tensor,
    layers: list[int],
) -> dict[str, torch.Tensor]:
    """Saliency maps of a left-padded batch (inputs as `vtc.models.llava.splice_with_image_mask` makes them, all N
    image tokens per row, one contiguous block) at decoder `layers` (0-based, ascending); the prefill stops after the
    last of them.

    Returns float32 tensors: "last" and "question" [B, len(layers), N], the head-averaged attention of the last prompt
    token and the mean over the question tokens (`question_mask` [B, L] bool) to each image token; "head_share"
    [B, len(layers), H], each head's total last-token attention on the image; "head_entropy" [B, len(layers), H], the
    entropy of each head's last-token attention over the image (renormalised there), divided by log N.
    """
    from transformers import DynamicCache

    from vtc.models.inllm import causal_mask, padded_positions

    language_model = model.model.language_model
    valid = attention_mask.bool()
    batch, length = valid.shape
    num_patches = int(image_mask[0].sum())
    if not bool((image_mask.sum(dim=1) == num_patches).all()):
        raise ValueError(f"every row must hold the same number of image tokens, got {image_mask.sum(dim=1).tolist()}")
    if sorted(set(layers)) != list(layers) or not 0 <= layers[0] <= layers[-1] < len(language_model.layers):
        raise ValueError(f"layers must be ascending in 0 … {len(language_model.layers) - 1}, got {layers}")
    image = image_mask.nonzero()[:, 1].view(batch, num_patches)
    last = torch.zeros_like(valid)
    last[:, -1] = True
    positions = padded_positions(valid)
    cache = DynamicCache(config=language_model.config)
    rope = language_model.rotary_emb(inputs_embeds, positions)
    implementation = language_model.config._attn_implementation
    mask = causal_mask(valid, length, implementation, inputs_embeds.dtype)
    out: dict[str, list[torch.Tensor]] = {"last": [], "question": [], "head_share": [], "head_entropy": []}
    hidden = inputs_embeds
    wanted = set(layers)
    for index, layer in enumerate(language_model.layers[: layers[-1] + 1]):
        normed = layer.input_layernorm(hidden)
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                       position_embeddings=rope)  # fmt: skip
        if index not in wanted:
            continue
        keys = cache.layers[index].keys
        heads_last = head_attention(layer.self_attn, normed, keys, valid, rope, last)
        heads_last = heads_last.gather(2, image[:, None].expand(-1, heads_last.shape[1], -1))  # [B, H, N]
        heads_question = head_attention(layer.self_attn, normed, keys, valid, rope, question_mask)
        out["last"].append(heads_last.mean(dim=1))
        out["question"].append(heads_question.mean(dim=1).gather(1, image))
        share = heads_last.sum(dim=-1)
        out["head_share"].append(share)
        out["head_entropy"].append(entropy(heads_last))
    return {name: torch.stack(values, dim=1).float() for name, values in out.items()}


# --- comparisons of maps [..., N] ---


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0 … N−1 along the last dimension, ties sharing their average rank (as scipy's `rankdata` − 1)."""
    flat = values.reshape(-1, values.shape[-1]).double()
    rows, size = flat.shape
    ordered, order = flat.sort(dim=-1, stable=True)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = new_group.long().cumsum(dim=-1) - 1 + torch.arange(rows)[:, None] * size  # ids unique across rows
    position = torch.arange(size, dtype=torch.float64).expand(rows, -1)
    total = torch.zeros(rows * size, dtype=torch.float64).index_add_(0, group.flatten(), position.flatten())
    count = torch.zeros(rows * size, dtype=torch.float64).index_add_(0, group.flatten(), torch.ones(rows * size).double())
    mean = (total / count.clamp(min=1))[group]
    ranks = torch.empty_like(mean).scatter_(1, order, mean)
    return ranks.view(values.shape)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    denominator = (a.square().sum(dim=-1) * b.square().sum(dim=-1)).sqrt()
    return (a * b).sum(dim=-1) / denominator  # NaN for a constant map: no ranking to compare


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of maps a, b [..., N] → [...] (ties: average ranks, i.e. tie-corrected)."""
    return _pearson(average_ranks(a), average_ranks(b))


def layer_correlation(maps: torch.Tensor) -> torch.Tensor:
    """[S, Y, N] maps of S samples at Y layers → [S, Y, Y] Spearman correlation of every pair of layers."""
    ranks = average_ranks(maps)
    ranks = ranks - ranks.mean(dim=-1, keepdim=True)
    ranks = ranks / ranks.square().sum(dim=-1, keepdim=True).sqrt()
    return ranks @ ranks.transpose(-1, -2)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest positions along the last dimension, ties to the lower index (a stable sort, as the methods)."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top_indices(scores, k), True)


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """|top-k(a) ∩ top-k(b)| / k for maps [..., N] → [...]: 1 when both keep the same k positions."""
    return (top_mask(a, k) & top_mask(b, k)).sum(dim=-1) / k


def entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy of each map renormalised over its N positions, divided by log N: 1 uniform, 0 on one position."""
    p = maps.double() / maps.double().sum(dim=-1, keepdim=True)
    return (-(p * p.clamp(min=1e-300).log()).sum(dim=-1) / math.log(maps.shape[-1])).to(maps.dtype)


def top_count(num_positions: int, fraction: float = 0.01) -> int:
    """Positions in the top `fraction` (at least one): 6 of 576 for 1 %."""
    return max(1, math.ceil(fraction * num_positions))


def top_share(maps: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Share of each map's total on its top `fraction` of positions."""
    k = top_count(maps.shape[-1], fraction)
    return maps.sort(dim=-1, descending=True).values[..., :k].sum(dim=-1) / maps.sum(dim=-1)


def same_image_pairs(image_ids: list[str]) -> list[tuple[int, int]]:
    """Index pairs of different samples about the same image."""
    by_image: dict[str, list[int]] = {}
    for index, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(index)
    return [pair for indices in by_image.values() for pair in combinations(indices, 2)]
