"""`cdpruner`: CDPruner, the visual tokens a conditional determinantal point process picks for each question.

CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
NeurIPS 2025, arXiv 2506.10967), official code Theia-4869/CDPruner: `llava/model/llava_arch.py`
(`LlavaMetaForCausalLM.encode_images`) and `llava/model/multimodal_encoder/clip_encoder.py` (`load_text_tower`,
`forward`); the question text comes from `llava/eval/model_vqa_loader.py` (the question without LLaVA's
"\\nAnswer the question using a single word or phrase."). Per image and question, the reference

1. embeds the question with CLIP's text tower (`CLIPTextModelWithProjection` of the vision tower's checkpoint,
   `openai/clip-vit-large-patch14-336` for LLaVA-1.5), split into segments of 77 tokens (the last one padded with
   id 0), one text embedding per segment;
2. takes the patch features of LLaVA's feature layer through CLIP's `post_layernorm` and `visual_projection`;
3. relevance r_i = −(mean over segments of the cosine between patch i and the segment), min–max normalised:
   (r − min + 1e-6) / (max − min);
4. similarity S = cosine between the projected visual tokens (after LLaVA's projector), in float32;
5. kernel L = diag(r) · S · diag(r) and the greedy MAP of the DPP over it (the fast incremental Cholesky of Chen,
   Zhang, Zhou, "Fast Greedy MAP Inference for Determinantal Point Process", NeurIPS 2018): repeatedly the token whose
   conditional variance d_j² is largest, then every d_i² lowered by the new Cholesky column;
6. keeps the picked tokens in spatial (index) order.

Where the relevance comes from (`relevance`): "clip" (the default, the reference's) loads `clip_model` with
`CLIPModel.from_pretrained` (text tower, text and visual projections, post-layernorm) and its tokenizer, once per
process. "llm" is a substitute for a model without a CLIP text tower (the demo model): the question's tokens through
the LLaVA model's own input embeddings (its tokenizer, no special tokens), mean-pooled into one vector, against the
projected visual tokens (the same space); the formula is otherwise the reference's (negated cosine, min–max).

The pipeline: the method needs each question (`VisualTokens.questions`), so it registers with stage "question" and its
reduce job writes one reduced sequence per question, keyed by the question's id (`vtc.pipeline.reduce.reduce_questions`).

Deliberate differences from the reference:

- Min–max per image: the reference takes min and max over the whole batch (B·N relevances), so an image's tokens
  depend on its batch-mates; its evaluation runs one question at a time, where the two agree. Here each row is
  normalised alone, so batched equals one at a time (tested). A row whose relevances are all equal gets r = 1.
- Segments: the mean of the segments' cosines is computed as the cosine sum against the mean of the unit segment
  embeddings (the same number, linear in the text side).
- Rank exhaustion: the reference divides by √d_j² even when the kernel has no rank left (d_j² ≤ 0: more picks than
  the projected width, or duplicate tokens), which gives NaN picks. Here, once the largest remaining d_j² of a row is at
  most 1e-5 × its largest diagonal entry, the row's remaining picks go by relevance (largest r first, lower index on
  ties) with no Cholesky update. LLaVA-1.5 (width 4096, at most 576 picks) does not reach this on distinct tokens.
- Ties: equal d_j² pick the lower index (`argmax`'s first maximum, as the reference).
- Zero-norm vectors are normalised with a small epsilon (`F.normalize`) instead of dividing by zero.
- Precision: the CLIP side, the relevance, the kernel and the greedy MAP run in float32 whatever the cache's dtype
  (the reference: the tower's dtype up to the visual projection, float32 from the similarity on).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vtc.methods import HparamError, Reduced, VisualTokens, register_method, selection
from vtc.methods.grid import check_budget

CLIP_MODEL = "openai/clip-vit-large-patch14-336"  # LLaVA-1.5's vision tower, with its text tower and projections
RELEVANCES = ("clip", "llm")
EXHAUSTED = 1e-5  # d_j² below this share of the row's largest kernel diagonal: no rank left


def relevance_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CDPruner's relevance, per row min–max normalised.

    image_embeds: [B, N, E] patch embeddings; text_embeds: [B, S, E] the question's S segment embeddings (S = 1 for
    one vector). r = −mean_s cos(patch, segment), then (r − min + 1e-6) / (max − min) over the row's N patches (1 for
    every patch of a row whose values are all equal). Returns [B, N] float32.
    """
    image = F.normalize(image_embeds.float(), dim=-1)
    text = F.normalize(text_embeds.float(), dim=-1).mean(dim=1)  # [B, E]: mean of cosines = cosine with the mean
    raw = -(image @ text[..., None])[..., 0]  # [B, N]
    low, high = raw.min(dim=-1, keepdim=True).values, raw.max(dim=-1, keepdim=True).values
    spread = high - low
    return torch.where(spread > 0, (raw - low + 1e-6) / spread.clamp(min=torch.finfo(raw.dtype).tiny), 1.0)


def conditional_kernel(projected: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """L = diag(r) · S · diag(r), S the cosine similarity of the projected tokens. [B, N, D], [B, N] → [B, N, N]."""
    unit = F.normalize(projected.float(), dim=-1)
    return relevance[:, :, None] * (unit @ unit.transpose(1, 2)) * relevance[:, None, :]


def dpp_greedy(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel [B, N, N] (symmetric PSD): [B, count] indices in the order they are picked.

    Each step picks the index with the largest conditional variance d_j² (ties: the lower index), the gain in
    log det of the picked set, and updates d_i² −= e_i² with the new Cholesky column e. A row whose largest remaining
    d_j² is at most `EXHAUSTED` × its largest diagonal entry has no rank left: its remaining picks follow the diagonal
    (largest first), without updates.
    """
    batch, size, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    diagonal = torch.diagonal(kernel, dim1=1, dim2=2)
    gains = diagonal.clone()  # d_i², −inf once picked
    fallback = diagonal.clone()  # the order for rows without rank left, −inf once picked
    floor = EXHAUSTED * diagonal.max(dim=-1).values
    columns = kernel.new_zeros(count, batch, size)
    picked = []
    for step in range(count):
        exhausted = gains.max(dim=-1).values <= floor
        index = torch.where(exhausted, fallback.argmax(dim=-1), gains.argmax(dim=-1))
        previous = columns[:step, rows, index]  # [step, B]
        column = (kernel[rows, index] - torch.einsum("tb,tbn->bn", previous, columns[:step])) / gains[
            rows, index
        ].clamp(min=floor.clamp(min=torch.finfo(kernel.dtype).tiny)).sqrt()[:, None]
        column = torch.where(exhausted[:, None], 0.0, column)
        columns[step] = column
        gains = gains - column**2
        gains[rows, index] = float("-inf")
        fallback[rows, index] = float("-inf")
        picked.append(index)
    return torch.stack(picked, dim=1) if picked else kernel.new_zeros(batch, 0, dtype=torch.long)


def cdpruner_select(
    projected: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, budget: int
) -> torch.Tensor:
    """The `budget` tokens CDPruner keeps, ascending: [B, budget] indices into the N tokens.

    projected: [B, N, D] the LLM's visual tokens; image_embeds: [B, N, E] and text_embeds: [B, S, E] the patches and
    the question in the relevance model's space."""
    kernel = conditional_kernel(projected, relevance_scores(image_embeds, text_embeds))
    return dpp_greedy(kernel, budget).sort(dim=-1).values


@functools.cache
def _clip(path: str):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@functools.cache
def _llm(path: str, revision: str | None, family_name: str = "llava"):
    from vtc.models import family

    model, processor = family({"family": family_name}).load_model(path, revision=revision, device="cpu")
    return model.get_input_embeddings(), processor.tokenizer


@torch.no_grad()
def clip_embeddings(model, tokenizer, features: torch.Tensor, questions) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's CLIP side: patches [B, N, C] of LLaVA's feature layer → [B, N, E] through CLIP's post-layernorm
    and visual projection; each question → its 77-token segments' text embeddings, mean of the unit vectors [B, 1, E].
    """
    image = model.visual_projection(model.vision_model.post_layernorm(features.float()))
    width = model.config.text_config.max_position_embeddings
    texts = []
    for question in questions:
        ids = torch.tensor(tokenizer(question)["input_ids"])
        segments = -(-len(ids) // width)
        padded = torch.zeros(segments * width, dtype=torch.long)
        padded[: len(ids)] = ids
        mask = torch.zeros_like(padded)
        mask[: len(ids)] = 1
        embeds = model.get_text_features(
            input_ids=padded.view(segments, width), attention_mask=mask.view(segments, width)
        )
        embeds = getattr(embeds, "pooler_output", embeds)  # a tensor in older transformers, an output object in 5.x
        texts.append(F.normalize(embeds.float(), dim=-1).mean(dim=0))
    return image, torch.stack(texts)[:, None]


@torch.no_grad()
def llm_embeddings(embedding, tokenizer, questions) -> torch.Tensor:
    """The substitute's text side: each question's tokens through the LLM's input embeddings, mean-pooled [B, 1, D]."""
    texts = []
    for question in questions:
        ids = torch.tensor(tokenizer(question, add_special_tokens=False)["input_ids"], device=embedding.weight.device)
        texts.append(embedding(ids).float().mean(dim=0))
    return torch.stack(texts)[:, None]


@register_method("cdpruner", stage="question")
def cdpruner(tokens: VisualTokens, budget: int, *, relevance: str = "clip", clip_model: str = CLIP_MODEL) -> Reduced:
    """CDPruner for each row's question (`tokens.questions`): the budget tokens of the conditional DPP's greedy MAP, in
    spatial order. relevance "clip" embeds question and patches with `clip_model` (hub id or directory); "llm" with
    the LLaVA model's own input embeddings (`tokens.model`), the substitute for a model without a CLIP text tower.

    Returns: tokens [B, budget, D], sources [B, budget, N] (each token its own patch).
    """
    check_budget(budget, tokens.num_patches)
    if relevance not in RELEVANCES:
        raise HparamError("relevance", f"cdpruner: relevance must be one of {', '.join(RELEVANCES)}, got {relevance!r}")
    if tokens.questions is None or len(tokens.questions) != tokens.projected.shape[0]:
        raise ValueError("cdpruner needs one question per row (VisualTokens.questions): it reduces per question")
    if relevance == "clip":
        model, tokenizer = _clip(clip_model)
        image, text = clip_embeddings(model, tokenizer, tokens.features, tokens.questions)
    else:
        if tokens.model is None:
            raise ValueError(
                "cdpruner with relevance llm needs the LLaVA model (VisualTokens.model) for its embeddings"
            )
        model = tokens.model
        embedding, tokenizer = _llm(model["path"], model.get("revision"), model.get("family", "llava"))
        image, text = tokens.projected, llm_embeddings(embedding, tokenizer, tokens.questions)
    return selection(tokens, cdpruner_select(tokens.projected, image, text.to(image.device), budget))
