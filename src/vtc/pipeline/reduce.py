"""`reduce`: turn cached visual tokens into the sequence the LLM will see, for one method and budget."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from vtc.cache import Store, StoreWriter, pack_bool
from vtc.methods import VisualTokens, get_method, import_plugins
from vtc.pipeline.encode import image_seed


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
    reducer = get_method(method)
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
            batch = VisualTokens(
                projected=tensors["projected"][window].float(),
                features=tensors["features"][window].float(),
                cls_attention=tensors["cls_attention"][window].float(),
                keys=tensors["keys"][window].float(),
                seeds=torch.tensor([image_seed(seed, i) for i in image_ids[window]]),
                grid=grid,
            )
            started = time.perf_counter()
            reduced = reducer(batch, budget, **hparams)
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
