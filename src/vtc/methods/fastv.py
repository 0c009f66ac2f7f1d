"""`fastv`: FastV, image tokens pruned inside the language model after layer K by the attention of the last token.

FastV (Chen, Zhao, Liu, Bai, Lin, Zhou, Chang, "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764), official code pkunlp-icler/FastV:
`src/FastV/llava-hf/transformers/src/transformers/models/llama/modeling_llama.py` (`LlamaModel.fastv_forward`, the
KV-cache version for llava-hf) with K = 2. Before layer K the reference takes layer K−1's attention weights (eager,
`output_attentions` on that layer), averages them over heads, reads the row of the last token over the image
tokens, keeps the top round(N·(1 − R)) image tokens with every text token, sorts the kept indices (sequence order)
and runs layers K … on them with their original position ids (gapped), so the KV cache of those layers holds only
the kept tokens; decode steps continue the positions from the unpruned length.

Here the selection is the pure function `fastv_select`; the decoder loop is `vtc.models.inllm.generate_pruned`.

Deliberate differences from the reference:

- Budget: the reference takes a ratio R; the pipeline's budget is the average over the LLM's L layers of the visual
  tokens each processes (as the FastV paper reports its 192/128/64 settings), so keep = round((L·budget − K·N) /
  (L − K)) (`vtc.cost.kept_for_layer_average`; 7B, K=2: 166/98/30, the reference's own table for those settings).
  `budget_mode: kept` takes the budget as the count after layer K instead.
- Attention weights: the reference switches layer K−1 to eager attention to return its weights. Here the model keeps
  its kernel (SDPA); the last prompt token's query at layer K−1 is recomputed from that layer's input and multiplied
  with the layer's cached (post-RoPE) keys: the same row softmax(q·kᵀ/√d) eager returns, without the B·H·L² map.
- Batches: the reference reads batch row 0 and one image position shared by the batch (batch size 1, no padding).
  Here every row of a left-padded batch selects from its own attention over its own image positions; padding
  positions get no attention and are never kept (tested: batched equals one at a time).
- Ties: equal scores keep the lower image index (stable sort; `topk` leaves ties unspecified).
- `positions: renumbered` (not in the reference) renumbers the kept tokens 0 … L'−1 in layers ≥ K instead of keeping
  their original (gapped) position ids, the default.
"""

from __future__ import annotations

import torch

from vtc.methods import Hparam, LayerState, register_method


def fastv_select(last_attention: torch.Tensor, image: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` image tokens the last token attends to most, per row, ascending.

    last_attention: [B, L] head-averaged attention of each row's last prompt token at layer K−1; image: [B, N]
    positions of the row's image tokens. Returns [B, keep] indices into the N image tokens (ties: lower index first).
    """
    scores = last_attention.gather(1, image)
    ranked = scores.argsort(dim=-1, descending=True, stable=True)
    return ranked[:, :keep].sort(dim=-1).values


@register_method("fastv", stage="llm", hparams={"layer": Hparam(min=1)})
def fastv(state: LayerState, keep: int, *, layer: int = 2) -> torch.Tensor:
    """FastV at layer K = `layer` (default 2, the paper's): the image tokens most attended by the last prompt token at
    layer K−1. Returns [B, keep] indices into each row's N image tokens."""
    return fastv_select(state.last_attention, state.image, keep)
