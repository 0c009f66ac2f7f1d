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

from vtc.models import EncodedView, llava

KINDS = ("last", "question")



def single_views(tensors: dict, image_ids: list[str]) -> list[EncodedView]:
    """Each image's one view from an encode shard; the saliency study reads LLaVA-1.5's single fixed grid."""
    from vtc.pipeline.encode import shard_views

    images = shard_views(tensors, len(image_ids))
    if any(len(views) != 1 for views in images):
        raise ValueError("the saliency study reads images of one view (LLaVA-1.5); this encode cache has several")
    return [views[0] for views in images]

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
    image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids("<image>")
    for row, (prompt, text) in enumerate(zip(prompts, texts)):
        begin = prompt.rfind(text)
        if not text or begin < 0:
            raise ValueError(f"question text {text!r} not found in prompt {prompt!r}")
        end = begin + len(text)
        encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        image_at = [i for i, token in enumerate(ids) if token == image_token_id]
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
    from vtc.models.inllm import query_weights

    weights, weight = query_weights(attention, hidden_in, keys, valid, cos_sin, rows)
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


# --- the saliency_record rule: one shard of a dataset ---


def selected_rows(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    """The questions a saliency pass records: all, or those of whole images (in a seeded order of the images) until
    `limit` questions, so that every recorded image keeps all its questions (compared across questions)."""
    if limit is None or limit >= len(rows):
        return rows
    import random

    image_ids = list(dict.fromkeys(row["image_id"] for row in rows))
    random.Random(f"{seed}/saliency").shuffle(image_ids)
    chosen, count, by_image = set(), 0, {}
    for row in rows:
        by_image[row["image_id"]] = by_image.get(row["image_id"], 0) + 1
    for image_id in image_ids:
        if count >= limit:
            break
        chosen.add(image_id)
        count += by_image[image_id]
    return [row for row in rows if row["image_id"] in chosen]


def record_dataset(
    dataset,
    benchmark_name: str,
    encoded,
    model_cfg: dict,
    layers: list[int] | None,
    batch_size: int,
    shard: int,
    num_shards: int,
    limit: int | None,
    seed: int,
    out,
) -> dict:
    """Records the saliency maps (`record_batch`) of the questions of every `num_shards`-th cache shard of the encode
    store `encoded` (all N visual tokens, as `full` feeds them) into one safetensors file `out`, float16: "last",
    "question" [n, Y, N], "head_share", "head_entropy" [n, Y, H] and the vision tower's "cls" attention [n, N]
    (head-averaged, from the cache). Its metadata holds the question and image ids, the layers and the timing."""
    import json
    import os
    import time
    from pathlib import Path

    from safetensors.torch import save_file

    from vtc.benchmarks import get_benchmark, read_common_parquet
    from vtc.cache import Store

    benchmark = get_benchmark(benchmark_name)
    model, processor = llava.load_from_config(model_cfg)
    num_layers = model.config.text_config.num_hidden_layers
    layers = list(range(num_layers)) if layers is None else sorted(layers)
    if not layers or layers[-1] >= num_layers or layers[0] < 0:
        raise ValueError(f"saliency.layers must lie in 0 … {num_layers - 1} (the model's decoder layers), got {layers}")
    store = Store.open(encoded)
    rows = selected_rows(list(read_common_parquet(dataset).remove_columns("image")), limit, seed)
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    parts: dict[str, list[torch.Tensor]] = {}
    ids, image_ids = [], []
    started = time.perf_counter()
    for index, (shard_ids, tensors) in enumerate(store.shards()):
        if index % num_shards != shard:
            continue
        views = single_views(tensors, shard_ids)
        pending = [(row, i) for i, image_id in enumerate(shard_ids) for row in by_image.get(image_id, [])]
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            texts = [benchmark.prompt(row) for row, _ in batch]
            prompts = [llava.user_turn(processor, text) for text in texts]
            visual = [views[i].projected for _, i in batch]
            embeds, mask, image_mask = llava.splice_with_image_mask(model, processor.tokenizer, prompts, visual)
            question = question_rows(processor.tokenizer, prompts, texts, image_mask)
            recorded = record_batch(model, embeds, mask, image_mask, question, layers)
            recorded["cls"] = torch.stack([views[i].cls_attention.float().mean(dim=0) for _, i in batch])
            for name, value in recorded.items():
                parts.setdefault(name, []).append(value.half().cpu())
            ids += [row["id"] for row, _ in batch]
            image_ids += [row["image_id"] for row, _ in batch]
    heads = model.config.text_config.num_attention_heads
    empty = {"last": (len(layers), -1), "question": (len(layers), -1), "head_share": (len(layers), heads),
             "head_entropy": (len(layers), heads), "cls": (-1,)}  # fmt: skip
    num_patches = store.manifest["grid"][0] * store.manifest["grid"][1]
    tensors = {
        name: torch.cat(parts[name]) if name in parts else torch.zeros(0, *[num_patches if s == -1 else s for s in shape])
        for name, shape in empty.items()
    }
    info = {"ids": ids, "image_ids": image_ids, "layers": layers, "n": len(ids), "seconds": time.perf_counter() - started,
            "num_layers": num_layers, "attn_implementation": llava.attention_implementation(model)}  # fmt: skip
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, tmp, metadata={"info": json.dumps(info)})
    os.replace(tmp, out)
    return info


def load_recordings(paths) -> tuple[dict[str, torch.Tensor], dict]:
    """The shards of one model × dataset, concatenated (float32), and their merged info (ids, image ids, layers)."""
    import json

    from safetensors import safe_open

    parts: dict[str, list[torch.Tensor]] = {}
    info = {"ids": [], "image_ids": [], "seconds": 0.0}
    for path in paths:
        with safe_open(str(path), framework="pt") as handle:
            shard_info = json.loads(handle.metadata()["info"])
            for name in handle.keys():
                parts.setdefault(name, []).append(handle.get_tensor(name).float())
        if info.get("layers", shard_info["layers"]) != shard_info["layers"]:
            raise ValueError(f"{path} records layers {shard_info['layers']}, another shard {info['layers']}")
        info["layers"] = shard_info["layers"]
        info["num_layers"] = shard_info["num_layers"]
        info["ids"] += shard_info["ids"]
        info["image_ids"] += shard_info["image_ids"]
        info["seconds"] += shard_info["seconds"]
    return {name: torch.cat(values) for name, values in parts.items()}, info


# --- the saliency_analyze rule: the volatility and grounding table of one model × dataset ---


def _row(query, layer, versus, metric, value, n, k=None, grounded=None) -> dict:
    return {"query": query, "layer": layer, "versus": versus, "metric": metric, "k": k,
            "value": float(value), "n": int(n), "grounded": grounded}  # fmt: skip


def _mean(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def volatility_rows(maps: dict[str, torch.Tensor], info: dict, ks: list[int], grounded: list[int] | None) -> list[dict]:
    """How stable the recorded saliency is, as long rows (query, layer, versus, metric, k, value, n, grounded):

    per query kind q and recorded layer ℓ: `image_share` (attention on the image at all), `entropy` and `top1pct_share`
    (concentration); `spearman` against every recorded layer (versus "layer j": the layer × layer matrix, means over
    samples) and `topk_overlap` with the next recorded layer; against the other query kind, against the vision tower's
    CLS attention; between two different questions about the same image (`spearman`, `topk_overlap` and
    `sink_overlap`, the overlap of their top 1 % positions, whose chance level `sink_overlap` of query "random" gives).
    """
    rows = []
    layers = info["layers"]
    grounded_of = (lambda layer: layer in grounded) if grounded is not None else (lambda layer: None)
    pairs = same_image_pairs(info["image_ids"])
    first, second = (torch.tensor([p[i] for p in pairs], dtype=torch.long) for i in (0, 1))
    cls = maps["cls"]
    count = len(cls)
    num_patches = cls.shape[-1]
    sinks = top_count(num_patches)
    for kind in KINDS:
        kind_maps = maps[kind]  # [S, Y, N]
        matrix = layer_correlation(kind_maps)  # [S, Y, Y]
        other = maps[KINDS[1 - KINDS.index(kind)]]
        for y, layer in enumerate(layers):
            g = grounded_of(layer)
            current = kind_maps[:, y]
            rows.append(_row(kind, layer, "", "image_share", _mean(current.sum(-1)), count, grounded=g))
            rows.append(_row(kind, layer, "", "entropy", _mean(entropy(current)), count, grounded=g))
            rows.append(_row(kind, layer, "", "top1pct_share", _mean(top_share(current)), count, grounded=g))
            for z, other_layer in enumerate(layers):
                rows.append(_row(kind, layer, f"layer {other_layer}", "spearman", _mean(matrix[:, y, z]), count, grounded=g))
            if y + 1 < len(layers):
                for k in ks:
                    value = _mean(topk_overlap(current, kind_maps[:, y + 1], k))
                    rows.append(_row(kind, layer, f"layer {layers[y + 1]}", "topk_overlap", value, count, k, g))
            if kind == "last":
                rows.append(_row(kind, layer, "question", "spearman", _mean(spearman(current, other[:, y])), count, grounded=g))
                for k in ks:
                    value = _mean(topk_overlap(current, other[:, y], k))
                    rows.append(_row(kind, layer, "question", "topk_overlap", value, count, k, g))
            rows.append(_row(kind, layer, "cls", "spearman", _mean(spearman(current, cls)), count, grounded=g))
            for k in ks:
                rows.append(_row(kind, layer, "cls", "topk_overlap", _mean(topk_overlap(current, cls, k)), count, k, g))
            if pairs:
                a, b = current[first], current[second]
                rows.append(_row(kind, layer, "other question", "spearman", _mean(spearman(a, b)), len(pairs), grounded=g))
                for k in ks:
                    rows.append(_row(kind, layer, "other question", "topk_overlap", _mean(topk_overlap(a, b, k)), len(pairs), k, g))
                value = _mean(topk_overlap(a, b, sinks))
                rows.append(_row(kind, layer, "other question", "sink_overlap", value, len(pairs), sinks, g))
    rows.append(_row("cls", None, "", "entropy", _mean(entropy(cls)), count))
    rows.append(_row("cls", None, "", "top1pct_share", _mean(top_share(cls)), count))
    if pairs:  # chance: two independent uniform top-k sets of N share k/N of their positions on average
        rows.append(_row("random", None, "other question", "sink_overlap", sinks / num_patches, len(pairs), sinks))
        for k in ks:
            rows.append(_row("random", None, "other question", "topk_overlap", k / num_patches, len(pairs), k))
    return rows


def grounding_rows(
    maps: dict[str, torch.Tensor], info: dict, targets: list[list[int]], ks: list[int], grounded: list[int] | None
) -> list[dict]:
    """Against the patches of the objects each question names (`targets`, per recorded sample; samples without any
    are skipped): `target_share`, the share of the image attention on them; `precision` and `recall` of the top-k
    positions; per query kind and layer, for the CLS attention and for a uniformly random ranking (expected values:
    share and precision |T|/N, recall k/N)."""
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return []
    num_patches = maps["cls"].shape[-1]
    mask = torch.zeros(len(keep), num_patches, dtype=torch.bool)
    for row, index in enumerate(keep):
        mask[row, targets[index]] = True
    sizes = mask.sum(-1).float()
    index = torch.tensor(keep)
    grounded_of = (lambda layer: layer in grounded) if grounded is not None else (lambda layer: None)

    def scored(query, layer, scores, g=None):
        out = [_row(query, layer, "targets", "target_share", _mean((scores * mask).sum(-1) / scores.sum(-1)), len(keep), grounded=g)]
        for k in ks:
            hits = (top_mask(scores, k) & mask).sum(-1).float()
            out.append(_row(query, layer, "targets", "precision", _mean(hits / k), len(keep), k, g))
            out.append(_row(query, layer, "targets", "recall", _mean(hits / sizes), len(keep), k, g))
        return out

    rows = []
    for kind in KINDS:
        for y, layer in enumerate(info["layers"]):
            rows += scored(kind, layer, maps[kind][index, y], grounded_of(layer))
    rows += scored("cls", None, maps["cls"][index])
    rows.append(_row("random", None, "targets", "target_share", _mean(sizes / num_patches), len(keep)))
    for k in ks:
        rows.append(_row("random", None, "targets", "precision", _mean(sizes / num_patches), len(keep), k))
        rows.append(_row("random", None, "targets", "recall", _mean(torch.full_like(sizes, min(k, num_patches) / num_patches)), len(keep), k))
    return rows


def _cell(table, ks, **where) -> str:
    """The value(s) of `table` rows matching `where`: one per k ("a / b / c" in the order of `ks`) or a single one."""
    import polars as pl

    part = table
    for column, value in where.items():
        part = part.filter(pl.col(column).is_null() if value is None else pl.col(column) == value)
    if part.is_empty():
        return "–"
    if part["k"].null_count() == len(part) or where.get("metric") == "sink_overlap":
        return f"{part['value'][0]:.2f}"
    values = dict(zip(part["k"].to_list(), part["value"].to_list()))
    return " / ".join(f"{values[k]:.2f}" if k in values else "–" for k in ks)


def markdown(table, ks: list[int], title: str) -> str:
    """The volatility, layer × layer and grounding tables of one model × dataset (means over questions)."""
    import polars as pl

    ks_label = "/".join(map(str, ks))
    layers = sorted(x for x in table["layer"].unique().to_list() if x is not None)
    grounded = dict(table.filter(pl.col("layer").is_not_null()).select("layer", "grounded").unique().iter_rows())
    flag = lambda layer: {True: "yes", False: "no", None: "?"}[grounded.get(layer)]  # noqa: E731
    n = int(table.filter(pl.col("metric") == "entropy")["n"].max())
    lines = [f"## Saliency: {title}", "", f"{n} questions; top-k overlaps at k = {ks_label}; means over questions "
             "(pairs of questions for 'other question').", ""]  # fmt: skip
    for kind in KINDS:
        lines += [f"### Query: {kind}", "",
                  "| layer | grounded | image share | entropy | top-1% share | ρ next layer | overlap next | "
                  "ρ vs question | overlap vs question | ρ vs CLS | overlap vs CLS | ρ other question | "
                  "overlap other question | sink overlap |",
                  "|---:|:---:|" + "---:|" * 12]  # fmt: skip
        for y, layer in enumerate(layers):
            following = f"layer {layers[y + 1]}" if y + 1 < len(layers) else None
            base = {"query": kind, "layer": layer}
            cells = [
                _cell(table, ks, **base, metric="image_share"),
                _cell(table, ks, **base, metric="entropy"),
                _cell(table, ks, **base, metric="top1pct_share"),
                _cell(table, ks, **base, metric="spearman", versus=following) if following else "–",
                _cell(table, ks, **base, metric="topk_overlap", versus=following) if following else "–",
                _cell(table, ks, **base, metric="spearman", versus="question"),
                _cell(table, ks, **base, metric="topk_overlap", versus="question"),
                _cell(table, ks, **base, metric="spearman", versus="cls"),
                _cell(table, ks, **base, metric="topk_overlap", versus="cls"),
                _cell(table, ks, **base, metric="spearman", versus="other question"),
                _cell(table, ks, **base, metric="topk_overlap", versus="other question"),
                _cell(table, ks, **base, metric="sink_overlap", versus="other question"),
            ]
            lines.append(f"| {layer} | {flag(layer)} | " + " | ".join(cells) + " |")
        lines.append("")
    chance = _cell(table, ks, query="random", metric="topk_overlap", versus="other question")
    sinks = _cell(table, ks, query="random", metric="sink_overlap", versus="other question")
    lines += [f"Chance level of a top-k overlap: {chance} (k/N); of the sink overlap (top 1 %): {sinks}. "
              f"CLS attention: entropy {_cell(table, ks, query='cls', metric='entropy')}, top-1% share "
              f"{_cell(table, ks, query='cls', metric='top1pct_share')}.", ""]  # fmt: skip
    lines += ["### Layer × layer Spearman ρ", ""]
    for kind in KINDS:
        lines += [f"Query {kind}:", "", "| layer | " + " | ".join(map(str, layers)) + " |", "|---:|" + "---:|" * len(layers)]
        for layer in layers:
            cells = [_cell(table, ks, query=kind, layer=layer, metric="spearman", versus=f"layer {o}") for o in layers]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    grounding = table.filter(pl.col("versus") == "targets")
    if not grounding.is_empty():
        n = int(grounding["n"].max())
        lines += ["### Grounding on the named objects", "",
                  f"{n} questions with target patches. Precision and recall of the top-k positions at k = {ks_label}; "
                  "random: expected values of a uniform ranking.", "",
                  "| query | layer | grounded | target share | precision | recall |", "|---|---:|:---:|---:|---:|---:|"]  # fmt: skip
        for kind in [*KINDS, "cls", "random"]:
            for layer in layers if kind in KINDS else [None]:
                base = {"query": kind, "layer": layer, "versus": "targets"}
                lines.append(
                    f"| {kind} | {'–' if layer is None else layer} | {flag(layer) if layer is not None else '–'} | "
                    f"{_cell(grounding, ks, **base, metric='target_share')} | "
                    f"{_cell(grounding, ks, **base, metric='precision')} | {_cell(grounding, ks, **base, metric='recall')} |"
                )
        lines.append("")
    return "\n".join(lines)


def heatmap(table, path, title: str) -> None:
    """The layer × layer Spearman matrix of each query kind, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    layers = sorted(x for x in table["layer"].unique().to_list() if x is not None)
    figure, axes = plt.subplots(1, len(KINDS), figsize=(4.2 * len(KINDS) + 1, 4), squeeze=False)
    for ax, kind in zip(axes[0], KINDS):
        part = table.filter((pl.col("query") == kind) & (pl.col("metric") == "spearman") & pl.col("versus").str.starts_with("layer "))
        value = {(r["layer"], int(r["versus"].split()[1])): r["value"] for r in part.iter_rows(named=True)}
        matrix = [[value.get((a, b), float("nan")) for b in layers] for a in layers]
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(layers)), layers)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("decoder layer")
        ax.set_title(f"query: {kind}")
        if len(layers) <= 12:
            for i in range(len(layers)):
                for j in range(len(layers)):
                    ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="Spearman ρ (mean over questions)")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def picture_samples(info: dict, families: list[str | None], count: int) -> list[int]:
    """`count` recorded samples about different images, each of a family not shown yet where there is one."""
    chosen, images, shown = [], set(), set()
    for prefer_new in (True, False):
        for index, image_id in enumerate(info["image_ids"]):
            if len(chosen) == count:
                return chosen
            if image_id in images or (prefer_new and families[index] in shown):
                continue
            chosen.append(index)
            images.add(image_id)
            shown.add(families[index])
    return chosen


def model_view(image, model_cfg: dict, processor):
    """The image as the vision tower saw it (the processor's resize, crop or pad), as an RGB array [H, W, 3] in 0 … 1."""
    import numpy as np

    from vtc.pipeline.encode import model_images

    views = model_images([image], processor, model_cfg.get("image_aspect_ratio", "crop"))
    pixels = processor.image_processor(views, return_tensors="pt")["pixel_values"][0]
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    return np.clip((pixels * std + mean).permute(1, 2, 0).numpy(), 0, 1)


def picture(path, view, grid, panels: list[tuple[str, str, object]], targets: list[int], title: str) -> None:
    """One sample: rows of panels (row label, panel title, a map [N] float drawn as a heat overlay scaled to its own
    maximum, or a label map [N] int (−1 dropped, ≥ 0 a kept group) drawn as coloured kept patches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    rows = list(dict.fromkeys(row for row, _, _ in panels))
    columns = max(sum(1 for r, _, _ in panels if r == row) for row in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.1 * columns, 2.3 * len(rows)), squeeze=False)
    height, width = view.shape[:2]
    cell_h, cell_w = height / grid[0], width / grid[1]
    for ax in axes.flat:
        ax.axis("off")
    counters = dict.fromkeys(rows, 0)
    for row, name, values in panels:
        ax = axes[rows.index(row), counters[row]]
        counters[row] += 1
        ax.imshow(view)
        extent = (0, width, height, 0)
        if values is not None:
            values = torch.as_tensor(values)
            if values.dtype.is_floating_point:
                heat = (values / values.max().clamp(min=1e-12)).view(*grid).numpy()
                ax.imshow(heat, cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest", vmin=0, vmax=1)
            else:
                labels = values.view(*grid).numpy()
                colours = plt.get_cmap("tab20")(np.mod(labels, 20))
                colours[..., 3] = np.where(labels >= 0, 0.55, 0.0)
                dark = np.zeros((*labels.shape, 4))
                dark[..., 3] = np.where(labels < 0, 0.75, 0.0)
                merged = len(set(labels[labels >= 0].tolist())) < int((labels >= 0).sum())
                ax.imshow(colours if merged else dark, extent=extent, interpolation="nearest")
        for patch in targets:
            r, c = divmod(patch, grid[1])
            ax.add_patch(Rectangle((c * cell_w, r * cell_h), cell_w, cell_h, fill=False, edgecolor="cyan", linewidth=0.4))
        ax.set_title(name, fontsize=7)
    for index, row in enumerate(rows):
        axes[index, 0].text(-0.08, 0.5, row, transform=axes[index, 0].transAxes, rotation=90, va="center", ha="right", fontsize=8)
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def kept_labels(sources: torch.Tensor) -> torch.Tensor:
    """[k, N] bool sources of a reduced sequence → [N] int: the token covering each patch (−1: none)."""
    covered = sources.any(dim=0)
    return torch.where(covered, sources.float().argmax(dim=0), torch.full_like(covered, -1, dtype=torch.long))


def analyze(
    shard_paths,
    dataset,
    model_cfg: dict,
    settings: dict,
    grounded: list[int] | None,
    method_stores: dict,
    budget: int,
    out_parquet,
    out_csv,
    out_markdown,
    out_heatmap,
    out_pictures,
    wandb_settings: dict,
    title: str,
) -> "object":
    """The saliency_analyze rule: table (parquet, csv, markdown), layer × layer heatmap, pictures, W&B run."""
    import json
    import time
    from pathlib import Path

    import polars as pl

    from vtc.benchmarks import read_common_parquet
    from vtc.cache import Store
    from vtc.pipeline.reduce import read_reduced
    from vtc.tracking import wandb_run

    started = time.perf_counter()
    maps, info = load_recordings(shard_paths)
    ks = [k for k in settings["k"] if k <= maps["cls"].shape[-1]]
    rows = read_common_parquet(dataset)
    position = {row_id: i for i, row_id in enumerate(rows["id"])}
    metas = [json.loads(rows[position[i]]["meta"] or "{}") for i in info["ids"]]
    targets = [meta.get("target_patches") or [] for meta in metas]
    records = volatility_rows(maps, info, ks, grounded) + grounding_rows(maps, info, targets, ks, grounded)
    model_name, dataset_name = title.split(" / ")
    table = pl.DataFrame(
        [{"model": model_name, "dataset": dataset_name, **r} for r in records],
        schema_overrides={"layer": pl.Int64, "k": pl.Int64, "grounded": pl.Boolean},
    )
    table.write_parquet(out_parquet)
    table.write_csv(out_csv)
    Path(out_markdown).write_text(markdown(table, ks, title) + f"\nRecorded in {info['seconds']:.1f} s.\n")
    heatmap(table, out_heatmap, f"{title}: layer × layer rank correlation")

    # pictures
    out_pictures = Path(out_pictures)
    out_pictures.mkdir(parents=True, exist_ok=True)
    families = [rows[position[i]]["family"] for i in info["ids"]]
    chosen = picture_samples(info, families, settings["pictures"])
    layers = info["layers"]
    shown = settings["picture_layers"] or [layers[round(i * (len(layers) - 1) / 5)] for i in range(6)]
    shown = list(dict.fromkeys(layer for layer in shown if layer in layers))
    kept = {}
    for method, store_path in method_stores.items():
        store = Store.open(store_path)
        wanted = {info["image_ids"][i] for i in chosen}
        for image_ids, images in read_reduced(store):
            for image_id, image in zip(image_ids, images):
                if image_id in wanted:
                    kept[method, image_id] = kept_labels(image.sources)
    files = []
    if chosen:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model_cfg["path"], revision=model_cfg.get("revision"))
        num_patches = maps["cls"].shape[-1]
        side = int(round(num_patches**0.5))
        grid = (side, num_patches // side)
        for index in chosen:
            row = rows[position[info["ids"][index]]]
            view = model_view(row["image"].convert("RGB"), model_cfg, processor)
            panels = []
            for kind in KINDS:
                for layer in shown:
                    values = maps[kind][index, layers.index(layer)]
                    panels.append((f"query: {kind}", f"layer {layer} ({100 * float(values.sum()):.0f}% on image)", values))
            panels.append(("encoder / methods", "image", None))
            panels.append(("encoder / methods", "CLS attention", maps["cls"][index]))
            for method in method_stores:
                labels = kept.get((method, row["image_id"]))
                if labels is not None:
                    panels.append(("encoder / methods", f"{method} @ {budget}", labels))
            name = f"{len(files):02d}_{row['family'] or 'sample'}_{row['id']}"
            path = out_pictures / f"{name}.png"
            question = row["question"] if len(row["question"]) < 110 else row["question"][:107] + "..."
            picture(path, view, grid, panels, targets[index], f"{row['id']}: {question} (answer: {', '.join(row['answers'][:2])})")
            files.append((path, row))

    with wandb_run(wandb_settings, job_type="saliency", name=f"saliency/{title.replace(' / ', '/')}",
                   config={"model": model_name, "dataset": dataset_name, "saliency": settings, "grounded_layers": grounded,
                           "recorded": info["n"] if "n" in info else len(info["ids"]), "layers": layers}) as run:  # fmt: skip
        import wandb

        columns = ["id", "family", "question", "answers", "picture"]
        data = [[row["id"], str(row["family"]), row["question"], ", ".join(row["answers"]),
                 wandb.Image(str(path), caption=f"{row['id']}: {row['question']}")] for path, row in files]  # fmt: skip
        run.log({
            "saliency/pictures": wandb.Table(columns=columns, data=data),
            "saliency/table": wandb.Table(columns=table.columns, data=[list(row) for row in table.rows()]),
            "saliency/layer_correlation": wandb.Image(str(out_heatmap), caption=f"{title}: layer × layer Spearman ρ"),
        })  # fmt: skip
        run.summary.update({"recorded": len(info["ids"]), "record_seconds": info["seconds"],
                            "analyze_seconds": time.perf_counter() - started})  # fmt: skip
    return table


# --- the saliency_oracle rule: selection by recorded saliency, fed from the first layer (two passes) ---


def oracle_accuracy(
    shard_paths,
    dataset,
    benchmark_name: str,
    encoded,
    model_cfg: dict,
    prune_layers: list[int],
    budgets: list[int],
    batch_size: int,
    out,
) -> dict:
    """Scores of the "oracle" selection on the recorded questions: for prune layer K and budget k, each question's
    top-k image tokens by the last prompt token's attention at layer K−1 (its recorded map, i.e. the first, full-token
    pass) are the only visual tokens of a second pass from layer 0, at their original position ids (as FastV keeps
    them). `full` (all N tokens) on the same questions is the reference. Writes and returns {"n", "full": metrics,
    "runs": [{"layer", "budget", "metrics"}], "seconds"}; cost: two prefills per question (the first is the
    saliency pass)."""
    import json
    import os
    import time
    from pathlib import Path

    from vtc.benchmarks import get_benchmark, read_common_parquet
    from vtc.cache import Store

    maps, info = load_recordings(shard_paths)
    missing = sorted({k - 1 for k in prune_layers} - set(info["layers"]))
    if missing:
        raise ValueError(f"saliency.oracle_layers need the recorded maps of layers {missing} (saliency.layers)")
    benchmark = get_benchmark(benchmark_name)
    model, processor = llava.load_from_config(model_cfg)
    rows = {row["id"]: row for row in read_common_parquet(dataset).remove_columns("image")}
    position = {row_id: i for i, row_id in enumerate(info["ids"])}
    by_image: dict[str, list[str]] = {}
    for row_id, image_id in zip(info["ids"], info["image_ids"]):
        by_image.setdefault(image_id, []).append(row_id)
    settings = [(None, None)] + [(k, b) for k in prune_layers for b in budgets]
    answers: dict = {setting: [] for setting in settings}
    started = time.perf_counter()
    for image_ids, tensors in Store.open(encoded).shards():
        views = single_views(tensors, image_ids)
        pending = [(row_id, i) for i, image_id in enumerate(image_ids) for row_id in by_image.get(image_id, [])]
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            prompts = [llava.user_turn(processor, benchmark.prompt(rows[row_id])) for row_id, _ in batch]
            projected = [views[i].projected for _, i in batch]
            for layer, budget in settings:
                if layer is None:
                    generation = llava.generate_ids(model, processor, prompts, projected, benchmark.max_new_tokens)
                else:
                    recorded = maps["last"][[position[row_id] for row_id, _ in batch], info["layers"].index(layer - 1)]
                    kept = top_indices(recorded, budget).sort(dim=-1).values
                    visual = [tokens[row_kept] for tokens, row_kept in zip(projected, kept)]
                    sources = [torch.eye(tokens.shape[0], dtype=torch.bool)[row_kept] for tokens, row_kept in zip(projected, kept)]
                    generation = llava.generate_ids_original_positions(
                        model, processor, prompts, visual, sources, benchmark.max_new_tokens
                    )
                for (row_id, _), prediction in zip(batch, llava.decode(processor, generation.ids)):
                    answers[layer, budget].append({**rows[row_id], "prediction": prediction})
    result = {
        "n": len(info["ids"]),
        "full": benchmark.score(answers[None, None]) if info["ids"] else {},
        "runs": [{"layer": k, "budget": b, "metrics": benchmark.score(answers[k, b]) if info["ids"] else {}}
                 for k, b in settings[1:]],  # fmt: skip
        "seconds": time.perf_counter() - started,
        "passes": "two prefills per question: the saliency pass (all tokens) and the answer pass (the top-k only)",
    }
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return result


# --- the saliency_summary rule: every model x dataset of a study in one table, and accuracy vs layer ---

SELECT_METHOD = "saliency_select"
COMPARED = ("cluster", "random", "cls_attention")


def summary(table_paths, oracle_paths, metrics_paths, out_parquet, out_csv, out_markdown, out_plot) -> None:
    """The study's saliency table (every per model × dataset table stacked) and the accuracy of selection by saliency
    against the prune layer K, per budget: the in-LLM `saliency_select` entries (metrics.json of evaluate), the
    two-pass oracle (recorded questions), and the methods of `COMPARED` and `full` as horizontal references."""
    import json
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    table = pl.concat([pl.read_parquet(p) for p in table_paths], how="diagonal_relaxed")
    table.write_parquet(out_parquet)
    table.write_csv(out_csv)
    sections = [Path(p).with_suffix(".md").read_text() for p in table_paths]
    points = []  # (model, dataset, kind, layer, budget, metric, value, n)
    for path in oracle_paths:
        model, dataset = Path(path).parts[-3:-1]
        result = json.loads(Path(path).read_text())
        for metric, value in result["full"].items():
            points.append((model, dataset, "full (recorded questions)", None, None, metric, value, result["n"]))
        for run in result["runs"]:
            for metric, value in run["metrics"].items():
                points.append((model, dataset, "oracle (two passes)", run["layer"], run["budget"], metric, value, result["n"]))
    for path in metrics_paths:
        result = json.loads(Path(path).read_text())
        method = result.get("registered_method", result["method"])
        kind = "in-LLM" if method == SELECT_METHOD else result["method"]
        layer = result["in_llm"]["prune_layer"] if method == SELECT_METHOD else None
        for metric, value in result["metrics"].items():
            points.append((result["model"], result["dataset"], kind, layer, result["budget"], metric, value, result["n"]))
    accuracy = pl.DataFrame(points, schema=["model", "dataset", "kind", "layer", "budget", "metric", "value", "n"],
                            orient="row", schema_overrides={"layer": pl.Int64, "budget": pl.Int64})  # fmt: skip
    groups = accuracy.select("model", "dataset").unique(maintain_order=True).rows() if len(accuracy) else []
    lines = []
    figure, axes = plt.subplots(1, max(len(groups), 1), figsize=(6 * max(len(groups), 1), 4.2), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], groups):
        part = accuracy.filter((pl.col("model") == model) & (pl.col("dataset") == dataset))
        metric = part["metric"][0]  # scorers put their headline metric first
        part = part.filter(pl.col("metric") == metric)
        lines += [f"## Selection by saliency: {model} / {dataset} ({metric})", "",
                  "| selection | budget | " + " | ".join(f"K={k}" for k in sorted(set(part["layer"].drop_nulls()))) + " | n |",
                  "|---|---:|" + "---:|" * (len(set(part["layer"].drop_nulls())) + 1)]  # fmt: skip
        layers = sorted(set(part["layer"].drop_nulls()))
        colours = dict(zip(sorted(set(part["budget"].drop_nulls()), reverse=True), ["C0", "C1", "C2", "C3", "C4", "C5"]))
        for (kind, budget), line in part.filter(pl.col("layer").is_not_null()).group_by(["kind", "budget"], maintain_order=True):
            line = line.sort("layer")
            style = "-" if kind == "in-LLM" else ":"
            ax.plot(line["layer"], line["value"], style, marker="o", color=colours.get(budget), label=f"{kind} k={budget}")
            values = dict(zip(line["layer"], line["value"]))
            lines.append(f"| {kind} | {budget} | " + " | ".join(f"{values[k]:.1f}" if k in values else "–" for k in layers) + f" | {line['n'][0]} |")
        for row in part.filter(pl.col("layer").is_null()).iter_rows(named=True):
            if row["kind"].startswith("full") or row["budget"] in colours:
                dash = "--" if row["kind"].startswith("full") else {"cluster": "-.", "random": (0, (1, 3)), "cls_attention": (0, (5, 5))}.get(row["kind"], "-.")
                colour = {"full": "black", "full (recorded questions)": "grey"}.get(row["kind"]) or colours[row["budget"]]
                ax.axhline(row["value"], color=colour,
                           linestyle=dash, linewidth=0.9, label=row["kind"] + ("" if row["budget"] is None else f" k={row['budget']}"))  # fmt: skip
                lines.append(f"| {row['kind']} | {row['budget'] or 'all'} | " + " | ".join(f"{row['value']:.1f}" for _ in layers) + f" | {row['n']} |")
        ax.set(title=f"{dataset} ({model})", xlabel="prune layer K (ranked by attention of layer K−1)", ylabel=metric)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        lines.append("")
    if not groups:
        axes[0, 0].text(0.5, 0.5, "no selection by saliency configured", ha="center")
    figure.tight_layout()
    figure.savefig(out_plot, dpi=120)
    plt.close(figure)
    Path(out_markdown).write_text("\n".join(sections + lines) + "\n")
