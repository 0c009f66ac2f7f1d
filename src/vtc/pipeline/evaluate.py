"""`evaluate`: answer every question from the reduced visual tokens, then score the answers.

The vision tower never runs here (a hook counts its forward calls and the count is written to the
metrics), so the encode cache is the only place images are encoded.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from vtc.benchmarks import get_benchmark, read_common_parquet
from vtc.cache import Store, unpack_bool
from vtc.models import llava
from vtc.tracking import wandb_run


def _answers(model, processor, benchmark, rows, store: Store, batch_size: int):
    """Yields (row, prediction, reduced-token sources) for every row, loading one shard at a time."""
    rows_by_image = defaultdict(list)
    for row in rows:
        rows_by_image[row["image_id"]].append(row)
    missing = set(rows_by_image) - set(store.image_ids)
    if missing:
        raise KeyError(f"{len(missing)} images of the dataset are not in {store.path}, e.g. {sorted(missing)[:3]}")
    for image_ids, tensors in store.shards():
        num_patches = store.manifest["num_patches"]
        pending = [(row, i) for i, image_id in enumerate(image_ids) for row in rows_by_image.get(image_id, [])]
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            prompts = [llava.user_turn(processor, benchmark.prompt(row)) for row, _ in batch]
            visual = [tensors["tokens"][i] for _, i in batch]
            predictions = llava.generate(model, processor, prompts, visual, benchmark.max_new_tokens)
            for (row, i), prediction in zip(batch, predictions):
                yield row, prediction, unpack_bool(tensors["sources"][i], num_patches)


def target_recall(sources: torch.Tensor, meta: dict) -> float | None:
    """Fraction of the patches of the objects a question refers to that some kept token covers."""
    targets = meta.get("target_patches")
    if not targets:
        return None
    return sources.any(dim=0)[targets].float().mean().item()


def evaluate(
    dataset: Path,
    benchmark_name: str,
    reduced: Path,
    model_cfg: dict,
    batch_size: int,
    predictions_path: Path,
    metrics_path: Path,
    run_info: dict,
    wandb_settings: dict,
) -> dict:
    benchmark = get_benchmark(benchmark_name)
    store = Store.open(reduced)
    model, processor = llava.load_model(
        model_cfg["path"], model_cfg.get("revision"), model_cfg["dtype"], model_cfg["device"], model_cfg["attn_implementation"]
    )
    vision_tower_calls = 0

    def count_images(module, args, output):
        nonlocal vision_tower_calls
        vision_tower_calls += 1

    model.model.vision_tower.register_forward_hook(count_images)
    rows = list(read_common_parquet(dataset).remove_columns("image"))
    name = "/".join(str(run_info[k]) for k in ("model", "dataset", "method", "budget"))
    config = {
        **run_info,
        **{f"model/{k}": v for k, v in model_cfg.items()},
        "benchmark": benchmark_name,
        "batch_size": batch_size,
        "padding_side": "left",
        "max_new_tokens": benchmark.max_new_tokens,
        "decoding": "greedy",
        "num_visual_tokens": store.manifest["num_tokens"],
        "reduce_key": store.manifest["key"],
    }
    with wandb_run(wandb_settings, job_type="evaluate", name=name, config=config) as run:
        started = time.perf_counter()
        records, recalls = [], []
        predictions_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = predictions_path.with_name(f".{predictions_path.name}.tmp")
        with open(tmp, "w") as out, tqdm(total=len(rows), desc="evaluate", unit="q", mininterval=5) as progress:
            for row, prediction, sources in _answers(model, processor, benchmark, rows, store, batch_size):
                meta = json.loads(row["meta"] or "{}")
                recall = target_recall(sources, meta)
                if recall is not None:
                    recalls.append(recall)
                record = {**row, "prediction": prediction, "target_recall": recall}
                records.append(record)
                out.write(json.dumps({k: v for k, v in record.items() if k != "meta"}) + "\n")
                progress.update()
        os.replace(tmp, predictions_path)
        metrics = benchmark.score(records)
        if recalls:
            metrics["target_recall"] = 100 * sum(recalls) / len(recalls)
        result = {
            **run_info,
            "benchmark": benchmark_name,
            "n": len(records),
            "num_visual_tokens": store.manifest["num_tokens"],
            "metrics": metrics,
            "vision_tower_calls": vision_tower_calls,
            "reduce_seconds": store.manifest["reduce_seconds"],
            "evaluate_seconds": time.perf_counter() - started,
        }
        run.summary.update({**metrics, "n": len(records), "vision_tower_calls": vision_tower_calls})
        import wandb

        columns = ["id", "family", "question", "answers", "prediction"]
        table = wandb.Table(columns=columns, data=[[str(r[c]) for c in columns] for r in records[:500]])
        run.log({"predictions": table})
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(result, indent=1))
    return result
