"""`pyramiddrop`: PyramidDrop, image tokens dropped in stages inside the LLM by the last instruction token's attention.

PyramidDrop (Xing, Huang, Dong, Lu, Zhang, Zang, Cao, He, Wang, Wu, Lin, "PyramidDrop: Accelerating Your Large
Vision-Language Models via Pyramid Visual Redundancy Reduction", CVPR 2025, arXiv 2410.17247), official code
Cooperx521/PyramidDrop: `llava/model/modeling_llama_pdrop.py` (`LlamaModel.pdrop_forward`, `pdrop_rank_drop`) and
`llava/eval/model_vqa_loader.py` (`--layer_list`, `--image_token_ratio_list`, with 1.0 prepended). The LLM is split
into stages at the layers of `layer_list` (its eval scripts: 8, 16, 24 of 32, ratios 0.5, 0.25, 0.125, i.e. λ = 0.5).
After layer K−1 has run (`rank_layer = layer_idx + 1` in `layer_list`), the reference takes layer K's own input norm,
query and key projections on that layer's input, with the rotary embedding of the current positions, computes the
attention of the last instruction token (the last prompt token at inference) to the image tokens, averaged over
heads, keeps the top int(N·ratio) image tokens (N: the image tokens before the first stage), sorts them into sequence
order, and renumbers the positions 0 … L'−1; decode steps continue from the shortened length (positions renumbered).

In this package's terms a stage's layer K is the first layer that processes its tokens, as in the reference's
`layer_list`. The scores are `LayerState.layer_attention` (layer K's projections, before it runs); the selection is
`fastv_select` on them; the stages are `pyramiddrop_schedule`; the loop is `vtc.models.inllm.generate_pruned`.

Budget (`ratio`, `layers`): the paper's 192/128/64 are averages over the 32 layers of the visual tokens each
processes, which the repository's default layers (8, 16, 24) cannot reach below 144 (its issue #10). The authors'
recipe for such budgets (issue #29, as the team's notes summarise it: layers 2, 8, 16 with λ ≈ 0.19 for 64; the
thread itself could not be read here) moves the stages early and lowers λ. Here the default is that: layers 2, 8, 16
and `ratio: fit`, λ bisected so that the layer average (`budget_mode: layer_average`, the default) or the tokens the
last layers process (`budget_mode: kept`) is the budget as nearly as whole tokens allow (32 layers, 576 tokens:
λ = 0.561 / 0.421 / 0.193 for 192 / 128 / 64, see `tests/methods/test_pyramiddrop.py`). `ratio: 0.5` (a number λ:
stage s keeps int(N·λ^s)) or a list of per-stage ratios (the reference's `image_token_ratio_list` without its leading
1.0) with `layers: [8, 16, 24]` runs the repository's scripts; the budget then only names the run. On another depth the
layers must be given (the shapes configs use 1, 2, 3 of the demo model's 4 layers: the reference's 2, 8, 16 of 32 are
1/16, 1/4, 1/2 of the depth, and 4 layers leave only one way to place three stages).

Deliberate differences from the reference:

- Attention weights: the reference computes every query's weights of the ranking layer (eager) and reads the last
  instruction token's row. Here only that query is recomputed against keys projected from the same layer input: the
  same row, in float32 (the reference: softmax in float32, then the model's dtype before the head average).
- Ties: equal scores keep the lower image index (stable sort; `topk` leaves ties unspecified).
- Batches: the reference pads on the right and handles each row with its own image position and length. Here rows are
  left-padded, each ranks its own image tokens by its own last token; batched equals one at a time (tested).
- Training-time ranking (by every token before an answer) is not implemented: vtc evaluates frozen models.
- `positions: original` (not in the reference) keeps each kept token's prompt position id instead of renumbering.
"""

from __future__ import annotations

import torch

from vtc import cost
from vtc.methods import HparamError, LayerState, Stage, register_method
from vtc.methods.fastv import fastv_select

BUDGET_LAYERS = (2, 8, 16)  # the authors' recipe for layer-average budgets down to 64 on 32 layers (issue #29)
REPOSITORY_LAYERS = (8, 16, 24)  # the eval scripts' --layer_list, with λ = 0.5
REPOSITORY_RATIO = 0.5


def stage_keeps(num_patches: int, ratios) -> list[int]:
    """Image tokens each stage keeps: int(N·r) for its ratio r of the N image tokens, truncated as the reference."""
    return [int(num_patches * r) for r in ratios]


def _measure(layers, keeps: list[int], budget_mode: str, num_layers: int, num_patches: int) -> float:
    if budget_mode == "kept":
        return keeps[-1]
    return cost.layer_average(cost.staged_tokens_per_layer(num_layers, num_patches, dict(zip(layers, keeps))))


def fitted_ratio(budget: int, budget_mode: str, layers, num_layers: int, num_patches: int) -> float:
    """λ ∈ [0, 1] whose geometric stages (int(N·λ^s), s = 1 … S) meet the budget as nearly as whole tokens allow: the
    layer average over `num_layers`, or the tokens the last stage keeps (both do not decrease with λ)."""

    def measure(ratio: float) -> float:
        keeps = stage_keeps(num_patches, [ratio ** (s + 1) for s in range(len(layers))])
        return _measure(layers, keeps, budget_mode, num_layers, num_patches)

    if not measure(0.0) <= budget <= num_patches:
        what = "tokens the last stage keeps" if budget_mode == "kept" else "layer average of the visual tokens"
        raise HparamError(
            None,
            f"pyramiddrop at layers {list(layers)} of {num_layers} cannot reach a budget of {budget}: the {what} is "
            f"between {measure(0.0):g} and {num_patches} (set earlier layers, or budget_mode: kept)",
        )
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if measure(middle) < budget else (low, middle)
    return min((high, low), key=lambda r: abs(measure(r) - budget))


def pyramiddrop_schedule(
    budget: int, budget_mode: str, num_layers: int, num_patches: int, *, layers=BUDGET_LAYERS, ratio="fit"
) -> list[Stage]:
    """PyramidDrop's stages: at each of `layers` (the first layer of each stage) the image tokens int(N·r_s), with
    r_s = λ^s for `ratio` λ (a number, or "fit": fitted to the budget) or the given list of per-stage ratios."""
    layers = list(layers) if isinstance(layers, (list, tuple)) else layers
    if not (isinstance(layers, list) and layers and all(isinstance(k, int) for k in layers)) or not all(
        a < b for a, b in zip([0, *layers], [*layers, num_layers])
    ):
        raise HparamError("layers", f"pyramiddrop: layers must be increasing layers between 1 and {num_layers - 1} "
                                    f"(the first layer of each stage), got {layers!r}")  # fmt: skip
    if budget_mode == "kept" and ratio != "fit":
        raise HparamError("budget_mode", "pyramiddrop: budget_mode kept fits λ to the budget; it needs ratio: fit")
    if ratio == "fit":
        ratio = fitted_ratio(budget, budget_mode, layers, num_layers, num_patches)
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio <= 1:
        ratios = [ratio ** (s + 1) for s in range(len(layers))]
    elif (
        isinstance(ratio, (list, tuple))
        and len(ratio) == len(layers)
        and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratio)
        and all(0 <= b <= a <= 1 for a, b in zip([1, *ratio], ratio))
    ):
        ratios = list(ratio)
    else:
        raise HparamError(
            "ratio",
            f"pyramiddrop: ratio must be fit, a number λ in [0, 1] or {len(layers)} non-increasing ratios in [0, 1] (one "
            f"per layer), got {ratio!r}",
        )
    return [Stage(layer, keep) for layer, keep in zip(layers, stage_keeps(num_patches, ratios))]


@register_method("pyramiddrop", stage="llm", schedule=pyramiddrop_schedule, positions="renumbered")
def pyramiddrop(state: LayerState, keep: int, *, layer: int) -> torch.Tensor:
    """One PyramidDrop stage at layer K = `layer`: the `keep` current image tokens the last prompt token attends to
    most under layer K's own projections. Returns [B, keep] indices into the row's current image tokens, ascending."""
    last = torch.zeros_like(state.valid)
    last[:, -1] = True
    return fastv_select(state.layer_attention(last), state.image, keep)
