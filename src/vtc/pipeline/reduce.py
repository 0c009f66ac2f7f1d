"""`reduce`: turn an image's visual tokens into the sequence the LLM will see, for one method and budget.

A "tokens" method (most of them) reduces the encode cache (`reduce_dataset`); a "question" method (CDPruner) too, once
per question, with the question's text (`reduce_questions`). An "encoder" method (ToMe) changes
the vision tower itself, so `reduce_in_encoder` loads the model and the dataset's images and runs the method on
the pixels. An "llm" method (FastV, DART) prunes inside the language model: its reduce is the identity (`full`'s N
tokens, keyed by the method, budget and hyperparameters) and `generate` prunes. Both write the same store: per image the k tokens [k, D] and their sources (packed [k, N] bools), and a
manifest with num_images, num_patches, num_tokens and reduce_seconds, which is all `generate` reads. The `positions`
hyperparameter is in the key for `generate`, which places the tokens; no method function receives it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vtc.cache import Store, StoreWriter, pack_bool
from vtc.methods import VisualTokens, get_method, import_plugins, method_stage, split_positions
from vtc.models import llava
from vtc.pipeline.encode import dataset_images, encode_key, image_seed, model_images


def cached_tokens(tensors: dict, rows, seeds: list[int], grid: tuple[int, int], **extra) -> VisualTokens:
    """The rows `rows` (a slice or an index tensor) of an encode shard's tensors as a float32 batch for a method."""
    return VisualTokens(
        projected=tensors["projected"][rows].float(),
        features=tensors["features"][rows].float(),
        cls_attention=tensors["cls_attention"][rows].float(),
        keys=tensors["keys"][rows].float(),
        seeds=torch.tensor(seeds),
        grid=grid,
        **extra,
    )


def reduce_dataset(
    encoded: Path,
    expected_key: dict | None,
    method: str,
    budget: int,
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
    reducer = get_method("full" if stage == "llm" else method)
    reducer_hparams = {} if stage == "llm" else split_positions(hparams)[1]
    store = Store.open(encoded, expected_key)
    grid = tuple(store.manifest["grid"])
    key = {"encode": store.manifest["fingerprint"], "method": method, "budget": budget, "hparams": hparams, "seed": seed}
    writer = StoreWriter(out, key)
    seconds = 0.0
    num_tokens = set()
    for image_ids, tensors in store.shards():
        tokens, sources = [], []
        for start in range(0, len(image_ids), batch_size):
            window = slice(start, start + batch_size)
            seeds = [image_seed(seed, i) for i in image_ids[window]]
            batch = cached_tokens(tensors, window, seeds, grid)
            started = time.perf_counter()
            reduced = reducer(batch, budget, **reducer_hparams)
            seconds += time.perf_counter() - started
            tokens.append(reduced.tokens.to(tensors["projected"].dtype))
            sources.append(pack_bool(reduced.sources))
            num_tokens.add(reduced.tokens.shape[1])
        writer.add(image_ids, {"tokens": torch.cat(tokens), "sources": torch.cat(sources)})
    return writer.close(
        num_images=len(store.image_ids),
        num_patches=grid[0] * grid[1],
        num_tokens=sorted(num_tokens),
        reduce_seconds=seconds,
    )


def reduce_questions(
    encoded: Path,
    expected_key: dict | None,
    dataset: Path,
    model_cfg: dict,
    method: str,
    budget: int,
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
    grid = tuple(store.manifest["grid"])
    key = {
        "encode": store.manifest["fingerprint"], "method": method, "budget": budget, "hparams": hparams, "seed": seed,
        "dataset": str(dataset),
    }  # fmt: skip
    writer = StoreWriter(out, key, entries="question")
    model = {"path": model_cfg["path"], "revision": model_cfg.get("revision")}
    seconds = 0.0
    num_tokens = set()
    for image_ids, tensors in store.shards():
        pending = [(row, i) for i, image_id in enumerate(image_ids) for row in by_image.get(image_id, [])]
        if not pending:
            continue
        tokens, sources = [], []
        for start in range(0, len(pending), batch_size):
            window = pending[start : start + batch_size]
            index = torch.tensor([i for _, i in window])
            seeds = [image_seed(seed, row["image_id"]) for row, _ in window]
            questions = tuple(row["question"] for row, _ in window)
            batch = cached_tokens(tensors, index, seeds, grid, questions=questions, model=model)
            started = time.perf_counter()
            reduced = reducer(batch, budget, **reducer_hparams)
            seconds += time.perf_counter() - started
            tokens.append(reduced.tokens.to(tensors["projected"].dtype))
            sources.append(pack_bool(reduced.sources))
            num_tokens.add(reduced.tokens.shape[1])
        writer.add([row["id"] for row, _ in pending], {"tokens": torch.cat(tokens), "sources": torch.cat(sources)})
    return writer.close(
        num_images=len(store.image_ids),
        num_questions=len(rows),
        num_patches=grid[0] * grid[1],
        num_tokens=sorted(num_tokens),
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
    model, processor = llava.load_from_config(model_cfg)
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
    num_tokens = set()
    for shard_start in range(0, len(image_ids), shard_size):
        shard_ids = image_ids[shard_start : shard_start + shard_size]
        tokens, sources = [], []
        for start in range(0, len(shard_ids), batch_size):
            images = [rows[first_row[i]]["image"] for i in shard_ids[start : start + batch_size]]
            images = model_images(images, processor, aspect_ratio)
            pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            started = time.perf_counter()
            reduced = reducer(model, pixel_values, budget, **reducer_hparams)
            if reduced.tokens.is_cuda:
                torch.cuda.synchronize(reduced.tokens.device)  # the clock reads finished work
            seconds += time.perf_counter() - started
            tokens.append(reduced.tokens.cpu())
            sources.append(pack_bool(reduced.sources))
            num_tokens.add(reduced.tokens.shape[1])
        writer.add(shard_ids, {"tokens": torch.cat(tokens), "sources": torch.cat(sources)})
    return writer.close(
        num_images=len(image_ids),
        num_patches=grid * grid,
        num_tokens=sorted(num_tokens),
        reduce_seconds=seconds,
        grid=[grid, grid],
        vision_tower_images=len(image_ids),
    )
