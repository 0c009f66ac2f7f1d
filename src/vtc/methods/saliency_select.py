"""`saliency_select`: keep the image tokens most salient by text-to-image attention read at a chosen layer.

The method family behind Figure 5a of arXiv 2504.17892 ("Why 1 + 1 < 1 in Visual Token Pruning", accuracy of
LLaVA-1.5-7B when it keeps the visual tokens that text-to-image attention marks as most salient, layer by layer): run
it at several prune layers K (`layer`) to see how the choice of layer changes accuracy. It runs in the pruning decoder
loop (`vtc.models.inllm`) exactly like FastV (pkunlp-icler/FastV, `fastv_forward`) with K = `layer`: layers 0 … K−1
see every token, the attention of layer K−1 (head-averaged, recomputed from its queries and cached keys under SDPA)
ranks the image tokens, and layers K … process the top `keep` of them with their original position ids.

Its "oracle" variant (`vtc.saliency.oracle_accuracy`, rule `saliency_oracle`) takes the same tokens from a first,
full-token pass (the recorded saliency of layer K−1) and feeds only those from the first layer in a second pass: two
prefills per question, the cost of an oracle, not of a deployable method.

Deliberate differences from FastV (besides those of `vtc.methods.fastv`):

- `query="after_image"` ranks by the attention averaged over every text position after the image block (the question
  and the chat template's tail) instead of the last prompt token's alone. The saliency study's "question" maps average
  over the question's own tokens, which the loop does not know; the two differ by the template's few tokens.
- Entries of this family usually set `budget_mode: kept` (the budget is the tokens kept after layer K, the paper's
  "11 % of the visual tokens"), since a layer average of 64 is out of reach once K·N/L exceeds it.
"""

from __future__ import annotations

import torch

from vtc.methods import LayerState, register_method
from vtc.methods.fastv import fastv_select

QUERIES = ("last", "after_image")


@register_method("saliency_select", stage="llm")
def saliency_select(state: LayerState, keep: int, *, layer: int = 2, query: str = "last") -> torch.Tensor:
    """The `keep` image tokens with the highest text-to-image attention of layer K−1 (K = `layer`), ascending;
    query "last": from each row's last prompt token (FastV's row), "after_image": averaged over the row's text
    positions after its image block. Returns [B, keep] indices into each row's N image tokens (ties: lower index)."""
    if query not in QUERIES:
        raise ValueError(f"saliency_select: query must be one of {QUERIES}, got {query!r}")
    if query == "last":
        scores = state.last_attention
    else:
        positions = torch.arange(state.valid.shape[1], device=state.valid.device)[None]
        scores = state.attention(state.text & (positions > state.image[:, -1:]))
    return fastv_select(scores, state.image, keep)
