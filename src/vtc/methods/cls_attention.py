"""`cls_attention`: keep the patches the vision tower's [CLS] token attends to most.

FasterVLM, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning" (Zhang et al.,
arXiv 2412.01818; Theia-4869/FasterVLM, ported in ModelTC/LightCompress `fastervlm.py`): the CLS → patch
attention of the feature layer, averaged over heads, top-k. Deliberate difference: the official code keeps
kept tokens' original LLM position ids, which here is the pipeline's `positions: original` (default renumbered);
the method decides only the feed order (`order="spatial"` reproduces FasterVLM's).
"""

from __future__ import annotations


from vtc.methods import Hparam, Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget

ORDERS = ("spatial", "score")


@register_method("cls_attention", hparams={"order": Hparam(choices=ORDERS)})
def cls_attention(tokens: VisualTokens, budget: int, *, order: str = "spatial") -> Reduced:
    """The `budget` patches with the highest head-averaged CLS attention ([B, heads, N] → [B, N]).

    Equal scores go to the lower patch index, so the selection is deterministic. order: "spatial" feeds the
    kept patches in row-major order, "score" by decreasing attention.

    Returns: tokens [B, budget, D], sources [B, budget, N].
    """
    check_budget(budget, tokens.num_patches)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    scores = tokens.cls_attention.float().mean(dim=1)
    # A stable sort rather than topk: topk does not specify which of equal scores it returns.
    keep = scores.sort(dim=-1, descending=True, stable=True).indices[:, :budget]
    if order == "spatial":
        keep = keep.sort(dim=-1).values
    return selection(tokens, keep)
