"""`generate` and `evaluate`: answer every question from the reduced visual tokens, then score.

`generate` runs the language model on one shard of the dataset (the images of every `num_shards`-th cache
shard), so a large benchmark is split over several jobs, each loading the model once. The vision tower never
runs there: a forward hook counts its calls, and the count is written next to the predictions. `evaluate`
merges the shards in dataset order, scores them and logs the W&B run.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from vtc.benchmarks import LMMS_EVAL_VERSION, get_benchmark, read_common_parquet
from vtc.cache import Store
from vtc.methods import import_plugins, method_stage, resolved_hparams
from vtc.models import ReducedImage, family, inllm
from vtc.pipeline.efficiency import predicted_cost, text_config
from vtc.pipeline.prepare import rows_report_path
from vtc.pipeline.reduce import image_budget, unpack_reduced
from vtc.tracking import wandb_run


def _answers(
    model, processor, adapter, benchmark, rows, store: Store, batch_size: int, shard: int, num_shards: int,
    positions: str, plan_for,
):  # fmt: skip
    """Yields (row, prediction, the row's `ReducedImage`, the sources of what its last LLM layers see, text tokens,
    generated tokens, visual tokens fed, the image block length its in-LLM plan is for, else None) for the rows of this
    shard, one cache shard at a time. With an in-LLM method
    (`plan_for(N)`, its `vtc.models.inllm.plan` for images of N tokens) the answers come from the pruning decoder loop,
    and the sources are those of the visual tokens its last layers keep (so `target_recall` scores what the method
    kept, not the N tokens it started from), and the visual tokens fed are the plan's layer average. Otherwise
    `positions` ("original" or "renumbered") places the reduced tokens."""
    # a store of a method that reduces per question (stage "question") is keyed by question id, others by image id
    entry = "id" if store.manifest.get("entries") == "question" else "image_id"
    rows_by_image = defaultdict(list)
    for row in rows:
        rows_by_image[row[entry]].append(row)
    missing = set(rows_by_image) - set(store.image_ids)
    if missing:
        what = "questions" if entry == "id" else "images"
        raise KeyError(f"{len(missing)} {what} of the dataset are not in {store.path}, e.g. {sorted(missing)[:3]}")
    for index, (image_ids, tensors) in enumerate(store.shards()):
        if index % num_shards != shard:
            continue
        images = unpack_reduced(tensors, len(image_ids))
        pending = [(row, images[i]) for i, image_id in enumerate(image_ids) for row in rows_by_image.get(image_id, [])]
        # the pruning loop takes a batch of images of one token count at a time
        groups = defaultdict(list)
        for item in pending:  # images of one layout (token counts per view) make one image block length
            groups[tuple(item[1].views) if plan_for is not None else None].append(item)
        for group in groups.values():
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                yield from _answer_batch(model, processor, adapter, benchmark, batch, positions, plan_for)


def _answer_batch(model, processor, adapter, benchmark, batch, positions, plan_for):
    prompts = [adapter.user_turn(processor, benchmark.prompt(row)) for row, _ in batch]
    images = [image for _, image in batch]
    sources = [image.sources for image in images]
    if plan_for is not None:
        generation = adapter.generate_pruned(model, processor, prompts, images, benchmark.max_new_tokens, plan_for)
        # [V, k] over the reduced tokens the LLM got, [k, N] from those to patches: [V, N] over patches
        sources = [(kept.float() @ given.float()) > 0 for kept, given in zip(generation.pruned_sources, sources)]
        fed = [generation.plan.layer_average] * len(batch)
        blocks = [generation.plan.num_patches] * len(batch)
    else:
        generation = adapter.generate(model, processor, prompts, images, benchmark.max_new_tokens, positions)
        structural = generation.structural_tokens or [0] * len(batch)
        fed = [image.tokens.shape[0] + extra for image, extra in zip(images, structural)]
        blocks = [None] * len(batch)
    predictions = adapter.decode(processor, generation.ids)
    yield from zip(
        [row for row, _ in batch], predictions, images, sources, generation.text_tokens, generation.new_tokens, fed,
        blocks,
    )  # fmt: skip


def target_recall(image: ReducedImage, sources: torch.Tensor, meta: dict) -> float | None:
    """Fraction of the patches of the objects a question refers to that some kept token covers.

    `meta["target_patches"]` index the testbed's own patch grid (`vtc.data.shapes.GRID` squared). A model whose view
    has another grid (Qwen2.5-VL's merged tokens, LLaVA-NeXT's views) covers a testbed patch where the view's cell
    under that patch's centre is covered; each view shows the whole image, and a patch counts once any view covers
    it. sources: [k, N] over the image's N input tokens, views in order (`image.views`)."""
    from vtc.data.shapes import GRID

    targets = meta.get("target_patches")
    if not targets:
        return None
    covered = sources.any(dim=0)
    rows, cols = torch.tensor(targets) // GRID, torch.tensor(targets) % GRID
    hit = torch.zeros(len(targets), dtype=torch.bool)
    offset = 0
    for h, w, _ in image.views:
        cells = ((rows * h) // GRID) * w + (cols * w) // GRID if (h, w) != (GRID, GRID) else rows * w + cols
        hit |= covered[offset + cells]
        offset += h * w
    return hit.float().mean().item()


def in_llm_record(plan) -> dict:
    """What metrics.json records of an in-LLM method's run (`vtc.models.inllm.Plan`): the first prune layer, the
    visual tokens the last layers process, the count of every layer and their average, and each stage."""
    return {
        "prune_layer": plan.layer,
        "visual_tokens_after_pruning": plan.keep,
        "visual_tokens_per_layer": plan.per_layer,
        "visual_tokens_layer_avg": plan.layer_average,
        "budget_mode": plan.budget_mode,
        "positions": plan.positions,
        # per stage: the first layer that processes its tokens, the image tokens it keeps and the tokens it adds
        "stages": [{"layer": s.layer, "kept": s.keep, "added": s.merged} for s in plan.stages],
        # the model keeps its kernel; the attention rows a method needs are recomputed from queries and cached keys
        "attention_weights": "recomputed (the queries a method needs x cached keys of layer K-1)",
    }


def _in_llm(stats: list[dict]) -> dict | None:
    """The run's in-LLM record from its shards' plans (`stats["in_llm"]`: per image token count, its plan's record and
    how many questions it answered): that record where every image had one count (LLaVA-1.5); else the counts per
    layer, after pruning and their layer average as means over the questions, with each count's record under
    `plans`."""
    if not any(s.get("in_llm") for s in stats):
        return None
    plans: dict[str, dict] = {}
    for shard in stats:
        for count, entry in shard["in_llm"].items():
            if count in plans and plans[count]["record"] != entry["record"]:
                raise ValueError(f"the generate shards of one run disagree on the in-LLM plan for {count} tokens")
            plans.setdefault(count, {"record": entry["record"], "questions": 0})["questions"] += entry["questions"]
    if len(plans) == 1:
        return next(iter(plans.values()))["record"]
    total = sum(entry["questions"] for entry in plans.values())

    def mean(field):
        return sum(entry["record"][field] * entry["questions"] for entry in plans.values()) / total

    first = next(iter(plans.values()))["record"]
    per_layer = [
        sum(entry["record"]["visual_tokens_per_layer"][layer] * entry["questions"] for entry in plans.values()) / total
        for layer in range(len(first["visual_tokens_per_layer"]))
    ]
    return {
        **first,
        "visual_tokens_after_pruning": mean("visual_tokens_after_pruning"),
        "visual_tokens_per_layer": per_layer,
        "visual_tokens_layer_avg": mean("visual_tokens_layer_avg"),
        "stages": None,  # each count's own, under plans
        "plans": plans,
    }


def _agreed(stats: list[dict], field: str) -> str:
    """A setting every generate shard of a run reports (the attention kernel, the positions), the same in each."""
    values = {s[field] for s in stats}
    if len(values) != 1:
        raise ValueError(f"the generate shards of one run disagree on {field}: {sorted(values)}")
    return values.pop()


def generate_predictions(
    dataset: Path,
    benchmark_name: str,
    reduced: Path,
    model_cfg: dict,
    batch_size: int,
    shard: int,
    num_shards: int,
    predictions_path: Path,
    stats_path: Path,
    plugins: list[str] = (),
) -> dict:
    """Answers of one shard, with the visual tokens at the position ids the `positions` hyperparameter of the reduce
    store's key names (`vtc.methods.resolved_hparams`; stats record it). For a method that prunes inside the LLM
    (stage "llm") the stats also get `in_llm`: its prune layer, the tokens kept after it, the visual tokens each
    decoder layer processes and their layer average."""
    benchmark = get_benchmark(benchmark_name)
    store = Store.open(reduced)
    adapter = family(model_cfg)
    import_plugins(list(plugins))
    key = store.manifest["key"]
    positions = resolved_hparams(key["method"], key["hparams"], adapter.PROVIDES["positions"])["positions"]
    if method_stage(key["method"]) == "llm" and not adapter.PROVIDES["in_llm"]:
        raise ValueError(f"method {key['method']!r} prunes inside the language model, which the decoder loop does not "
                         f"support for model family {model_cfg.get('family', 'llava')!r} yet (see README, Methods)")  # fmt: skip
    model, processor = adapter.load_from_config(model_cfg)
    plans: dict[int, inllm.Plan] = {}

    def plan_for(num_tokens: int) -> inllm.Plan:
        """The plan for images of `num_tokens` tokens in the LLM's image block (a ratio budget: that share of them)."""
        if num_tokens not in plans:
            budget = image_budget(key["budget"], num_tokens)
            layers = model.config.text_config.num_hidden_layers
            plans[num_tokens] = inllm.plan(key["method"], budget, key["hparams"], layers, num_tokens)
        return plans[num_tokens]

    vision_tower_calls = 0

    def count_calls(module, args, output):
        nonlocal vision_tower_calls
        vision_tower_calls += 1

    adapter.vision_tower(model).register_forward_hook(count_calls)
    rows = list(read_common_parquet(dataset).remove_columns("image"))
    started = time.perf_counter()
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = predictions_path.with_name(f".{predictions_path.name}.tmp")
    count = text_tokens = new_tokens = 0
    fed_tokens: list[float] = []
    plan_questions: dict[int, int] = {}
    in_llm = plan_for if method_stage(key["method"]) == "llm" else None
    answers = _answers(
        model, processor, adapter, benchmark, rows, store, batch_size, shard, num_shards, positions, in_llm
    )
    with open(tmp, "w") as out, tqdm(desc=f"generate shard {shard}/{num_shards}", unit="q", mininterval=5) as progress:
        for row, prediction, image, sources, row_text_tokens, row_new_tokens, row_fed, block in answers:
            meta = json.loads(row["meta"] or "{}")
            record = {k: v for k, v in row.items() if k != "meta"}
            recall = target_recall(image, sources, meta)
            out.write(json.dumps({**record, "prediction": prediction, "target_recall": recall}) + "\n")
            count += 1
            text_tokens += row_text_tokens
            new_tokens += row_new_tokens
            fed_tokens.append(row_fed)
            if block is not None:
                plan_questions[block] = plan_questions.get(block, 0) + 1
            progress.update()
    os.replace(tmp, predictions_path)  # only complete shards ever carry the final name
    stats = {
        "n": count,
        "vision_tower_calls": vision_tower_calls,
        "seconds": time.perf_counter() - started,
        "text_tokens": text_tokens,  # summed over the shard's questions, as the cost model counts them
        "new_tokens": new_tokens,
        # visual tokens the LLM got per question (an in-LLM method: its layer average), summed, least and most
        "visual_tokens": {"sum": sum(fed_tokens), "min": min(fed_tokens, default=0), "max": max(fed_tokens, default=0)},
        "attn_implementation": adapter.attention_implementation(model),
        "positions": positions,
    }
    if in_llm is not None:  # per token count of the image block: its plan and the questions it answered
        stats["in_llm"] = {
            str(count): {"record": in_llm_record(plans[count]), "questions": questions}
            for count, questions in sorted(plan_questions.items())
        }
    stats_path.write_text(json.dumps(stats))
    return stats


def evaluate(
    dataset: Path,
    benchmark_name: str,
    reduced: Path,
    prediction_shards: list[Path],
    stats_files: list[Path],
    predictions_path: Path,
    metrics_path: Path,
    run_info: dict,
    model_cfg: dict,
    wandb_settings: dict,
    device_preset: str,
) -> dict:
    """Merges and scores the shards; metrics.json also gets the run's predicted `cost` (see
    `vtc.pipeline.efficiency.predicted_cost`, roofline times for `device_preset`)."""
    benchmark = get_benchmark(benchmark_name)
    store = Store.open(reduced)
    meta_of = dict(zip(*read_common_parquet(dataset).select_columns(["id", "meta"]).to_dict().values()))
    by_id = {}
    for path in prediction_shards:
        for line in open(path):
            record = json.loads(line)
            by_id[record["id"]] = record
    if set(by_id) != set(meta_of):
        raise ValueError(f"the prediction shards cover {len(by_id)} of the {len(meta_of)} questions of {dataset}")
    records = [{**by_id[i], "meta": meta_of[i]} for i in meta_of]
    stats = [json.loads(Path(p).read_text()) for p in stats_files]
    metrics = benchmark.score(records)
    recalls = [r["target_recall"] for r in records if r["target_recall"] is not None]
    if recalls:
        metrics["target_recall"] = 100 * sum(recalls) / len(recalls)
    attn_implementation = _agreed(stats, "attn_implementation")
    positions = _agreed(stats, "positions")
    in_llm = _in_llm(stats)
    fed = {
        "mean": sum(s["visual_tokens"]["sum"] for s in stats) / len(records),
        "min": min(s["visual_tokens"]["min"] for s in stats if s["n"]),
        "max": max(s["visual_tokens"]["max"] for s in stats if s["n"]),
    }
    # the cost model takes the tokens spliced in (an in-LLM method: all N, its plan gives the per-layer counts)
    visual_tokens = max(store.manifest["num_tokens"]) if in_llm else round(fed["mean"])
    run_cost = predicted_cost(
        text_config(model_cfg),
        model_cfg["dtype"],
        visual_tokens,
        text_tokens_mean=sum(s["text_tokens"] for s in stats) / len(records),
        new_tokens_mean=sum(s["new_tokens"] for s in stats) / len(records),
        device_preset=device_preset,
        # whole tokens per layer (the mean over questions where images differ in count)
        visual_tokens_per_layer=[round(n) for n in in_llm["visual_tokens_per_layer"]] if in_llm else None,
    )
    result = {
        **run_info,
        "benchmark": benchmark_name,
        # the lmms-eval release whose scoring the benchmark reproduces (tests/benchmarks/test_lmms_eval_parity.py)
        "lmms_eval_version": LMMS_EVAL_VERSION,
        "n": len(records),
        "num_visual_tokens": store.manifest["num_tokens"],
        # per question, the visual tokens the LLM got (an in-LLM method: its layer average), structural ones included
        "visual_tokens_fed": fed,
        "metrics": metrics,
        "vision_tower_calls": sum(s["vision_tower_calls"] for s in stats),
        "reduce_seconds": store.manifest["reduce_seconds"],
        "generate_seconds": sum(s["seconds"] for s in stats),
        "shards": len(stats),
        "attn_implementation": attn_implementation,
        # position ids of the visual tokens: "renumbered" (consecutive) or "original" (gapped, as in the full prompt)
        "positions": positions,
        "cost": run_cost,
    }
    if in_llm:
        result["in_llm"] = in_llm
    rows_report = rows_report_path(dataset)
    if rows_report.exists():  # rows prepare_dataset read, kept and skipped (bad images, empty questions or answers)
        result["dataset_rows"] = json.loads(rows_report.read_text())
    name = "/".join(str(run_info[k]) for k in ("model", "dataset", "method", "budget"))
    # Filterable in W&B's runs table, and what the report's panels plot (see vtc.wandb_report); counted as the
    # results tables count them.
    from vtc.pipeline.aggregate import predicted_metrics, visual_tokens, visual_tokens_kept

    tracked = {
        "visual_tokens": visual_tokens(result),
        "visual_tokens_kept": visual_tokens_kept(result),
        "headline_metric": next(iter(metrics)),
    }
    config = {
        **tracked,
        **run_info,
        **{f"model/{k}": v for k, v in model_cfg.items()},
        "benchmark": benchmark_name,
        "lmms_eval_version": LMMS_EVAL_VERSION,
        "max_new_tokens": benchmark.max_new_tokens,
        "decoding": "greedy",
        "padding_side": "left",
        "attn_implementation": attn_implementation,
        "positions": positions,
        "device_preset": device_preset,
        "num_visual_tokens": store.manifest["num_tokens"],
        "reduce_key": store.manifest["key"],
        "in_llm": in_llm,
    }
    with wandb_run(wandb_settings, job_type="evaluate", name=name, config=config) as run:
        run.summary.update(
            {
                **metrics,
                **predicted_metrics(result),
                **tracked,
                "score": metrics[tracked["headline_metric"]],
                "n": len(records),
                "vision_tower_calls": result["vision_tower_calls"],
            }
        )
        import wandb

        columns = ["id", "family", "question", "answers", "prediction"]
        run.log({"predictions": wandb.Table(columns=columns, data=[[str(r[c]) for c in columns] for r in records[:500]])})
    tmp = predictions_path.with_name(f".{predictions_path.name}.tmp")
    tmp.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "meta"}) + "\n" for r in records))
    os.replace(tmp, predictions_path)
    metrics_path.write_text(json.dumps(result, indent=1))
    return result
