"""`reduce`: turn an image's visual tokens into the sequence the LLM will see, for one method and budget.

A "tokens" method (most of them) reduces the encode cache (`reduce_dataset`); a "question" method (CDPruner) too, once
per question, with the question's text (`reduce_questions`). An "encoder" method (ToMe) changes
the vision tower itself, so `reduce_in_encoder` loads the model and the dataset's images and runs the method on
the pixels. An "llm" method (FastV, DART) prunes inside the language model: its reduce is the identity (`full`'s N
tokens, keyed by the method, budget and hyperparameters) and `generate` prunes.

Images may differ in token count (Qwen2.5-VL's dynamic resolution) and have several views (LLaVA-NeXT's base and
high-resolution views, `vtc.models.EncodedView`). A method is a function of a dense batch, so `reduce_images` groups
the views of equal grid and equal budget into batches: every view is reduced exactly as it would be alone (methods are
tested batched == one at a time). A budget is a count (an int: that many tokens per image, or all of a smaller image's)
or a ratio (a float in (0, 1]: that share of each image's tokens, `image_budget`); an image's budget is split over its
views in proportion to their tokens (`split_budget`).

All write the same store (`pack_reduced`): per image its reduced tokens, their sources (packed bools over the image's
N input tokens) and its views, and a manifest with num_images, the token counts and reduce_seconds, which is all
`generate` reads. The `positions` hyperparameter is in the key for `generate`, which places the tokens; no method
function receives it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vtc.cache import Store, StoreWriter, pack_bool, unpack_bool
from vtc.methods import (
    Reduced,
    VisualTokens,
    get_method,
    import_plugins,
    method_stage,
    split_positions,
)
from vtc.models import EncodedView, ReducedImage, family
from vtc.pipeline.encode import dataset_images, encode_key, image_seed, model_images, shard_views, token_counts


def image_budget(budget: int | float, num_tokens: int) -> int:
    """Tokens kept of an image of `num_tokens`: a count (at most the image's tokens), or a ratio's share, rounded half
    up and at least 1."""
    if isinstance(budget, float):
        return min(num_tokens, max(1, int(budget * num_tokens + 0.5)))
    return min(budget, num_tokens)


def split_budget(budget: int, sizes: list[int]) -> list[int]:
    """`budget` tokens split over views of `sizes` tokens in proportion to their size (largest remainders, ties to the
    earlier view), each at most its size and at least 1 where the budget allows."""
    total = sum(sizes)
    shares = [budget * size / total for size in sizes]
    counts = [int(share) for share in shares]
    order = sorted(range(len(sizes)), key=lambda v: (-(shares[v] - counts[v]), v))
    for view in order[: budget - sum(counts)]:
        counts[view] += 1
    for view in range(len(sizes)):  # a view with no token yet takes one from the largest, where the budget allows
        if counts[view] == 0 and budget >= len(sizes):
            counts[max(range(len(sizes)), key=lambda v: counts[v])] -= 1
            counts[view] = 1
    return counts


def view_batch(views: list[EncodedView], seeds: list[int], **extra) -> VisualTokens:
    """Views of one grid as a float32 batch for a method."""
    return VisualTokens(
        projected=torch.stack([v.projected for v in views]).float(),
        features=torch.stack([v.features for v in views]).float(),
        cls_attention=torch.stack([v.cls_attention for v in views]).float(),
        keys=torch.stack([v.keys for v in views]).float(),
        seeds=torch.tensor(seeds),
        grid=views[0].grid,
        **extra,
    )


def view_seed(seed: int, image_id: str, view: int) -> int:
    """One seed per view: the image's own for its first view (an image of one view, as LLaVA-1.5's, keeps the seed it
    always had), a derived one for the others."""
    return image_seed(seed, image_id if view == 0 else f"{image_id}#view{view}")


def reduce_images(
    images: list[list[EncodedView]],
    seeds: list[list[int]],
    reducer,
    budget: int | float,
    batch_size: int,
    questions: list[str] | None = None,
    model: dict | None = None,
) -> tuple[list[ReducedImage], float]:
    """Each image's views reduced by `reducer(batch, keep)` at the image's share of `budget`, in batches of views of one grid and one
    budget (`batch_size` at most); (the reduced images, seconds spent in the method). `questions` (one per image) and
    `model` go to a method of stage "question" (`VisualTokens.questions`, `.model`)."""
    counts = []
    for views in images:
        sizes = [v.projected.shape[0] for v in views]
        counts.append(split_budget(image_budget(budget, sum(sizes)), sizes))
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    for i, views in enumerate(images):
        for v, view in enumerate(views):
            buckets.setdefault((view.grid, counts[i][v]), []).append((i, v))
    results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    seconds = 0.0
    for (_, keep), members in buckets.items():
        for start in range(0, len(members), batch_size):
            window = members[start : start + batch_size]
            extra = {}
            if questions is not None:
                extra = {"questions": tuple(questions[i] for i, _ in window), "model": model}
            batch = view_batch([images[i][v] for i, v in window], [seeds[i][v] for i, v in window], **extra)
            started = time.perf_counter()
            reduced = reducer(batch, keep)
            seconds += time.perf_counter() - started
            for row, (tokens, sources) in enumerate(reduced_rows(reduced)):
                results[window[row]] = (tokens, sources)
    return [assemble(views, [results[i, v] for v in range(len(views))]) for i, views in enumerate(images)], seconds


def reduced_rows(reduced: Reduced) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row (tokens [k_b, D], sources [k_b, n]): the first `lengths[b]` of a method that keeps its own count per
    image (PruMerge's adaptive selection), else all k."""
    lengths = reduced.lengths.tolist() if reduced.lengths is not None else [reduced.tokens.shape[1]] * len(reduced.tokens)
    return [(reduced.tokens[b, :k], reduced.sources[b, :k]) for b, k in enumerate(lengths)]


def assemble(views: list[EncodedView], parts: list[tuple[torch.Tensor, torch.Tensor]]) -> ReducedImage:
    """One image's reduced views in view order, each view's sources placed at its tokens' offset in the image's N."""
    total = sum(v.projected.shape[0] for v in views)
    sources, offset = [], 0
    for view, (_, view_sources) in zip(views, parts):
        placed = torch.zeros(view_sources.shape[0], total, dtype=torch.bool)
        placed[:, offset : offset + view_sources.shape[1]] = view_sources.cpu()
        sources.append(placed)
        offset += view_sources.shape[1]
    return ReducedImage(
        tokens=torch.cat([tokens.cpu() for tokens, _ in parts]),
        sources=torch.cat(sources),
        views=[(*view.grid, tokens.shape[0]) for view, (tokens, _) in zip(views, parts)],
    )


def pack_reduced(images: list[ReducedImage], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A shard of reduced images: `tokens` [Σk, D], `sources` [Σk, ⌈N_max/8⌉] packed bools (row i over its image's N,
    zero beyond), `views` [V, 4] int64 (image index, h, w, k_v) in token order."""
    width = max(image.sources.shape[1] for image in images)
    sources = [torch.nn.functional.pad(image.sources, (0, width - image.sources.shape[1])) for image in images]
    views = [[i, *view] for i, image in enumerate(images) for view in image.views]
    return {
        "tokens": torch.cat([image.tokens for image in images]).to(dtype),
        "sources": pack_bool(torch.cat(sources)),
        "views": torch.tensor(views, dtype=torch.int64).view(-1, 4),
    }


def unpack_reduced(tensors: dict[str, torch.Tensor], num_images: int) -> list[ReducedImage]:
    """The reduced images of a shard `pack_reduced` wrote."""
    per_image: list[list[list[int]]] = [[] for _ in range(num_images)]
    for image, h, w, k in tensors["views"].tolist():
        per_image[image].append([h, w, k])
    images, start = [], 0
    for views in per_image:
        k, n = sum(v[2] for v in views), sum(v[0] * v[1] for v in views)
        window = slice(start, start + k)
        images.append(
            ReducedImage(
                tokens=tensors["tokens"][window],
                sources=unpack_bool(tensors["sources"][window], n) if k else torch.zeros(0, n, dtype=torch.bool),
                views=[tuple(v) for v in views],
            )
        )
        start += k
    return images


def read_reduced(store: Store):
    """Yields (entry ids, their `ReducedImage`s) per shard of a reduced store."""
    for ids, tensors in store.shards():
        yield ids, unpack_reduced(tensors, len(ids))


def reduce_dataset(
    encoded: Path,
    expected_key: dict | None,
    method: str,
    budget: int | float,
    hparams: dict,
    seed: int,
    out: Path,
    batch_size: int = 64,
    plugins: list[str] = (),
) -> dict:
    import_plugins(list(plugins))
    stage = method_stage(method)
    if stage == "encoder":
        raise ValueError(f"method {method!r} runs inside the vision encoder: reduce it with reduce_in_encoder")
    if stage == "question":
        raise ValueError(f"method {method!r} reduces per question: reduce it with reduce_questions")
    # A method that prunes inside the language model sees all N tokens here; it prunes when the answers are generated,
    # so its hyperparameters are for `vtc.models.inllm.plan` (kept in the key), not for `full`.
    function = get_method("full" if stage == "llm" else method)
    reducer_hparams = {} if stage == "llm" else split_positions(hparams)[1]
    store = Store.open(encoded, expected_key)
    key = {"encode": store.manifest["fingerprint"], "method": method, "budget": budget, "hparams": hparams, "seed": seed}
    writer = StoreWriter(out, key)
    seconds = 0.0
    counts = []
    for image_ids, tensors in store.shards():
        images = shard_views(tensors, len(image_ids))
        seeds = [[view_seed(seed, image_id, v) for v in range(len(views))] for image_id, views in zip(image_ids, images)]
        reduced, spent = reduce_images(
            images, seeds, lambda batch, keep: function(batch, keep, **reducer_hparams), 1.0 if stage == "llm" else budget,
            batch_size,
        )  # fmt: skip
        seconds += spent
        counts += [image.tokens.shape[0] for image in reduced]
        writer.add(image_ids, pack_reduced(reduced, tensors["projected"].dtype))
    return writer.close(
        num_images=len(store.image_ids),
        **token_counts(counts),
        reduce_seconds=seconds,
    )


def reduce_questions(
    encoded: Path,
    expected_key: dict | None,
    dataset: Path,
    model_cfg: dict,
    method: str,
    budget: int | float,
    hparams: dict,
    seed: int,
    out: Path,
    batch_size: int = 64,
    plugins: list[str] = (),
) -> dict:
    """`reduce` for a method registered with stage="question" (CDPruner): one reduced sequence per question.

    Each row of a batch is one question of `dataset` with its image's cached encoder outputs, its text
    (`VisualTokens.questions`, the dataset's `question` column) and the model's config entry (`VisualTokens.model`).
    The store's entries are keyed by question id (manifest `entries: question`, which `generate` reads), in the
    encode cache's image order; its key holds the dataset's path besides what `reduce_dataset`'s does.
    """
    import_plugins(list(plugins))
    if method_stage(method) != "question":
        raise ValueError(f"method {method!r} does not read the questions: reduce it with reduce_dataset")
    from vtc.benchmarks import read_common_parquet

    reducer = get_method(method)
    reducer_hparams = split_positions(hparams)[1]
    rows = read_common_parquet(dataset).select_columns(["id", "image_id", "question"]).to_list()
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image_id"], []).append(row)
    store = Store.open(encoded, expected_key)
    missing = set(by_image) - set(store.image_ids)
    if missing:
        raise KeyError(f"{len(missing)} images of {dataset} are not in {encoded}, e.g. {sorted(missing)[:3]}")
    key = {
        "encode": store.manifest["fingerprint"], "method": method, "budget": budget, "hparams": hparams, "seed": seed,
        "dataset": str(dataset),
    }  # fmt: skip
    writer = StoreWriter(out, key, entries="question")
    model = {key: model_cfg.get(key) for key in ("path", "revision")} | {"family": model_cfg.get("family", "llava")}
    seconds = 0.0
    counts = []
    for image_ids, tensors in store.shards():
        pending = [(row, i) for i, image_id in enumerate(image_ids) for row in by_image.get(image_id, [])]
        if not pending:
            continue
        images = shard_views(tensors, len(image_ids))
        rows_images = [images[i] for _, i in pending]
        seeds = [[view_seed(seed, row["image_id"], v) for v in range(len(images[i]))] for row, i in pending]
        questions = [row["question"] for row, _ in pending]
        reduced, spent = reduce_images(
            rows_images, seeds, lambda batch, keep: reducer(batch, keep, **reducer_hparams), budget, batch_size,
            questions=questions, model=model,
        )  # fmt: skip
        seconds += spent
        counts += [image.tokens.shape[0] for image in reduced]
        writer.add([row["id"] for row, _ in pending], pack_reduced(reduced, tensors["projected"].dtype))
    return writer.close(
        num_images=len(store.image_ids),
        num_questions=len(rows),
        **token_counts(counts),
        reduce_seconds=seconds,
    )


def reduce_in_encoder(
    dataset: Path,
    model_cfg: dict,
    method: str,
    budget: int,
    hparams: dict,
    out: Path,
    batch_size: int = 32,
    shard_size: int = 256,
    plugins: list[str] = (),
) -> dict:
    """`reduce` for a method registered with stage="encoder": runs it on every unique image of `dataset`.

    The images go through the same preprocessing as `encode` (`model_images`, the image processor). The store's key
    holds the full encode key of this model configuration (model, revision, dtype, feature layer, select strategy,
    image processor, aspect ratio), the method, budget and hyperparameters. reduce_seconds times the method calls,
    vision tower included; vision_tower_images counts the images it encoded (each unique image once).
    """
    import_plugins(list(plugins))
    reducer = get_method(method)
    if method_stage(method) != "encoder":
        raise ValueError(f"method {method!r} reduces the encode cache: reduce it with reduce_dataset")
    reducer_hparams = split_positions(hparams)[1]
    adapter = family(model_cfg)
    if not adapter.PROVIDES["encoder_methods"]:
        raise ValueError(f"method {method!r} runs inside the vision tower, which model family "
                         f"{model_cfg.get('family', 'llava')!r} does not support (see README, Methods)")  # fmt: skip
    model, processor = adapter.load_from_config(model_cfg)
    rows, first_row = dataset_images(dataset)
    image_ids = list(first_row)
    aspect_ratio = model_cfg.get("image_aspect_ratio", "crop")
    key = {
        "encode": encode_key(model_cfg, processor, model.config),
        "method": method,
        "budget": budget,
        "hparams": hparams,
    }
    writer = StoreWriter(out, key, stage="encoder", dataset=str(dataset))
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    seconds = 0.0
    counts = []
    for shard_start in range(0, len(image_ids), shard_size):
        shard_ids = image_ids[shard_start : shard_start + shard_size]
        reduced: list[ReducedImage] = []
        for start in range(0, len(shard_ids), batch_size):
            images = [rows[first_row[i]]["image"] for i in shard_ids[start : start + batch_size]]
            images = model_images(images, processor, aspect_ratio)
            pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            started = time.perf_counter()
            output = reducer(model, pixel_values, image_budget(budget, grid * grid), **reducer_hparams)
            if output.tokens.is_cuda:
                torch.cuda.synchronize(output.tokens.device)  # the clock reads finished work
            seconds += time.perf_counter() - started
            for tokens, sources in reduced_rows(output):
                reduced.append(ReducedImage(tokens.cpu(), sources.cpu(), [(grid, grid, tokens.shape[0])]))
        counts += [image.tokens.shape[0] for image in reduced]
        writer.add(shard_ids, pack_reduced(reduced, reduced[0].tokens.dtype))
    return writer.close(
        num_images=len(image_ids),
        **token_counts(counts),
        reduce_seconds=seconds,
        vision_tower_images=len(image_ids),
    )
