"""`dart`: DART, pivot tokens and the image tokens least duplicated with them, pruned inside the LLM at layer 2.

DART (Wen, Gao, Wang, Zhang, Zhang, Li, He, Zhang, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494), official code ZichenWen1/DART:
`llava/model/language_model/modeling_llama_self.py` (`get_retained_image_token`, `DART_K_norm.forward`), K = 2,
4 image and 4 text pivots. Before layer K the reference

1. takes the keys of layer K−1 (heads concatenated) and picks as pivots the `pivot_image_token` image tokens and the
   `pivot_text_token` text tokens after the image (the question and answer prompt) with the largest key L1 norm;
2. for each pivot in turn, among the image tokens not yet kept (image pivots excluded), keeps the TOKEN_TOPK with the
   lowest cosine similarity to the pivot, measured on layer K−1's output through the final RMSNorm
   (`last_layer_state = self.norm(...)`), and removes them from the candidates;
3. keeps the image pivots and every selected token (text pivots are text: always kept), sorted in sequence order,
   and runs layers K … on them with their original position ids.

The selection is the pure function `dart_select`; the decoder loop is `vtc.models.inllm.generate_pruned`.

Deliberate differences from the reference:

- Exact budget: the reference keeps `pivot_image_token` + (pivots) × ⌊max_num_trunction / pivots⌋ tokens (132 for
  its 128 setting). Here exactly `keep`: the image pivots, then keep − pivot_image_token tokens shared over the
  pivots, ⌈·⌉ for the first ones and ⌊·⌋ for the rest. With keep below pivot_image_token, only the top pivots.
- Budget: as every in-LLM method here, the config budget is the layer average of the visual tokens
  (`vtc.cost.kept_for_layer_average`); the reference's scripts give the count after layer K (`max_num_trunction`),
  which `budget_mode: kept` follows.
- Pivot order (`pivot_order`): the reference builds a Python set of the pivots' absolute positions (image pivots by
  descending norm, then text pivots) and visits them in the set's iteration order, which CPython derives from the
  integer values (hash = value, modulo the table size, insertion order on collisions); the order matters because
  each pivot takes its quota from the candidates the earlier ones left. `pivot_order: sequence` (the default) visits
  them in sequence order (image pivots, then text pivots). `pivot_order: reference` visits them in the reference's set
  order, computed on each row's unpadded positions (counted from its first valid token, as a batch of one without
  padding has them), so a left-padded batch still equals one row at a time.
- Keys: those of layer K−1 as its KV cache holds them (after RoPE), heads of the key/value groups concatenated.
- Ties (equal norms or similarities) go to the lower index (stable sorts).
- Batches: the reference reads batch row 0 with one image position for the batch; here each row of a left-padded
  batch selects on its own positions and text (padding excluded); batched equals one at a time (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtc.methods import Hparam, HparamError, LayerState, register_method


def _top(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest values, largest first, ties to the lower index."""
    return values.argsort(descending=True, stable=True)[:count]


def dart_select_row(
    keys: torch.Tensor,
    states: torch.Tensor,
    image: torch.Tensor,
    query: torch.Tensor,
    keep: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
    pivot_order: str = "sequence",
    offset: int = 0,
) -> torch.Tensor:
    """DART's selection for one row.

    keys: [L, C] keys of layer K−1 (heads concatenated); states: [L, D] layer K−1's output through the final norm;
    image: [N] positions of the image tokens; query: [T] positions of the text tokens after the image; keep: image
    tokens to keep; pivot_order: "sequence" or "reference" (`reference_pivot_order`, on positions − `offset`, the
    row's left padding). Returns [keep] indices into the N image tokens, ascending.
    """
    num_patches = image.shape[0]
    image_pivots = _top(keys[image].abs().sum(-1), min(pivot_image, keep, num_patches))  # indices into N
    if keep <= image_pivots.shape[0]:
        return image_pivots.sort().values
    text_pivots = query[_top(keys[query].abs().sum(-1), min(pivot_text, query.shape[0]))]  # sequence positions
    if pivot_order == "reference":
        pivot_positions = reference_pivot_order(image[image_pivots], text_pivots, offset)
    else:
        pivot_positions = torch.cat([image[image_pivots].sort().values, text_pivots.sort().values])
    remaining = keep - image_pivots.shape[0]
    base, extra = divmod(remaining, pivot_positions.shape[0])
    candidate = torch.ones(num_patches, dtype=torch.bool, device=image.device)
    candidate[image_pivots] = False
    image_states = F.normalize(states[image].float(), dim=-1)
    chosen = [image_pivots]
    for index, position in enumerate(pivot_positions.tolist()):
        quota = base + (1 if index < extra else 0)
        if quota == 0:
            continue
        similarity = image_states @ F.normalize(states[position].float(), dim=-1)
        similarity = similarity.masked_fill(~candidate, float("inf"))
        picked = similarity.argsort(stable=True)[:quota]  # least similar first
        candidate[picked] = False
        chosen.append(picked)
    return torch.cat(chosen).sort().values


def reference_pivot_order(image_pivots: torch.Tensor, text_pivots: torch.Tensor, offset: int) -> torch.Tensor:
    """The pivots' positions in the order the reference visits them: the iteration order of a Python set built from
    the unpadded positions (position − offset) of the image pivots, then the text pivots, each by descending norm.

    image_pivots, text_pivots: positions in the padded row, by descending key norm. Returns those positions reordered.
    """
    unpadded = [p - offset for p in image_pivots.tolist() + text_pivots.tolist()]
    # CPython iterates a set of small ints by value modulo its table size: the reference's order, not a sorted one
    order = list(set(unpadded))
    return torch.tensor([p + offset for p in order], dtype=image_pivots.dtype, device=image_pivots.device)


PIVOT_ORDERS = ("sequence", "reference")


def dart_select(
    state: LayerState, keep: int, pivot_image: int = 4, pivot_text: int = 4, pivot_order: str = "sequence"
) -> torch.Tensor:
    """`dart_select_row` for every row of a batch: [B, keep] indices into each row's N image tokens."""
    if pivot_order not in PIVOT_ORDERS:
        raise HparamError(
            "pivot_order", f"dart: pivot_order must be one of {', '.join(PIVOT_ORDERS)}, got {pivot_order!r}"
        )
    batch = state.keys.shape[0]
    keys = state.keys.transpose(1, 2).reshape(batch, state.keys.shape[2], -1)  # [B, L, H_kv·d]
    rows = []
    for row in range(batch):
        after = torch.arange(state.valid.shape[1], device=state.valid.device) > state.image[row].max()
        query = (state.text[row] & after).nonzero().flatten()
        offset = int(state.valid[row].int().argmax())  # the row's left padding: its first valid position
        rows.append(
            dart_select_row(
                keys[row],
                state.normed[row],
                state.image[row],
                query,
                keep,
                pivot_image,
                pivot_text,
                pivot_order,
                offset,
            )
        )
    return torch.stack(rows)


@register_method(
    "dart",
    stage="llm",
    hparams={
        "layer": Hparam(min=1),
        "pivot_image": Hparam(min=0),
        "pivot_text": Hparam(min=0),
        "pivot_order": Hparam(choices=PIVOT_ORDERS),
    },
)
def dart(
    state: LayerState,
    keep: int,
    *,
    layer: int = 2,
    pivot_image: int = 4,
    pivot_text: int = 4,
    pivot_order: str = "sequence",
) -> torch.Tensor:
    """DART at layer K = `layer` (default 2), with `pivot_image` image and `pivot_text` text pivots (default 4 and 4,
    the reference's), visited in `pivot_order` ("sequence", the default, or "reference": the reference's set order).
    Returns [B, keep] indices into each row's N image tokens."""
    return dart_select(state, keep, pivot_image, pivot_text, pivot_order)
