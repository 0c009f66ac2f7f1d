"""What a run costs: predicted by `vtc.cost` for every `evaluate` run, measured by `vtc.bench` once per model.

`predicted_cost` is the `cost` block of an evaluate run's metrics.json: the analytic FLOPs, KV cache and roofline
times of the run's mean request (its mean prompt length and answer length, the k visual tokens it spliced in) for
the model's own text shape. `measure` is the `measure_cost` rule: `vtc.bench` on the configured model, methods
and budgets, with each record labelled by the config's method name so that it joins the accuracy results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vtc import cost
from vtc.models import llava


def text_config(model_cfg: dict):
    """The language model's config of a `models.<name>` entry: config.json only, no weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg["path"], revision=model_cfg.get("revision"))
    return getattr(config, "text_config", None) or config


def predicted_cost(
    text_cfg,
    dtype: str,
    visual_tokens: int,
    text_tokens_mean: float,
    new_tokens_mean: float,
    device_preset: str,
    visual_tokens_per_layer: list[int] | None = None,
) -> dict:
    """`vtc.cost.estimate` for one request of the run: `text_tokens_mean` prompt tokens besides the image,
    `visual_tokens` (k) spliced in, `new_tokens_mean` generated (the first by prefill), batch 1.

    A method that prunes inside the LLM passes the visual tokens each decoder layer processes
    (`visual_tokens_per_layer`, kind "in-LLM"); otherwise every layer sees the k spliced tokens (kind "pre-LLM").

    The cost model takes whole tokens, so the means are rounded to the nearest integer ("request_*" below); the
    figures are those of a request of mean length, which differs from the mean of per-request costs only by the
    small n² attention term. Units: FLOPs, bytes, seconds; weights and KV cache in `dtype`.
    """
    if device_preset not in cost.PRESETS:
        raise ValueError(
            f"config key 'efficiency.device_preset': {device_preset!r} is not one of {sorted(cost.PRESETS)}"
        )
    shape = cost.ModelShape.from_text_config(text_cfg, bytes_per_param=llava.DTYPES[dtype].itemsize)
    if visual_tokens_per_layer is None:  # reduced before the LLM: each decoder layer sees the k spliced tokens
        kind, per_layer = "pre-LLM", cost.visual_tokens_per_layer_for("pre-LLM", visual_tokens, shape.num_layers)
    else:
        kind, per_layer = "in-LLM", list(visual_tokens_per_layer)
        if len(per_layer) != shape.num_layers:
            raise ValueError(f"{len(per_layer)} per-layer visual token counts for a {shape.num_layers}-layer model")
    text_tokens, new_tokens = round(text_tokens_mean), round(new_tokens_mean)
    device = cost.PRESETS[device_preset]
    estimate = cost.estimate(shape, text_tokens, per_layer, new_tokens, device)
    return {
        "kind": kind,
        "text_tokens_mean": text_tokens_mean,
        "new_tokens_mean": new_tokens_mean,
        "request_text_tokens": text_tokens,
        "request_new_tokens": new_tokens,
        "visual_tokens": visual_tokens,
        "visual_tokens_per_layer": per_layer,
        "visual_tokens_layer_avg": estimate["visual_tokens_layer_avg"],
        "prefill_flops": estimate["prefill_flops"],
        "decode_flops": estimate["decode_flops"],
        "kv_cache_bytes": estimate["kv_cache_bytes"],
        "device_preset": device_preset,
        "device": device.name,
        "prefill_time_s": estimate["prefill_time_s"],
        "decode_time_s": estimate["decode_time_s"],
        "bytes_per_param": shape.bytes_per_param,
        "model_shape": vars(shape),
    }


def bench_argv(
    model_cfg: dict, budgets: list[int], settings: dict, threads: int, seed: int, plugins: list[str]
) -> list[str]:
    """`python -m vtc.bench` arguments for a `models.<name>` entry and the `efficiency` settings (methods apart)."""
    argv = ["--model", model_cfg["path"], "--device", model_cfg["device"], "--dtype", model_cfg["dtype"]]
    argv += ["--attn", model_cfg["attn_implementation"], "--budgets", ",".join(map(str, budgets))]
    argv += ["--batch-size", str(settings["batch_size"]), "--new-tokens", str(settings["new_tokens"])]
    argv += ["--warmup", str(settings["warmup"]), "--repeats", str(settings["repeats"])]
    # auto: the roofline preset of the GPU it runs on (none on CPU), so `predicted` describes this machine
    argv += ["--threads", str(threads), "--seed", str(seed), "--device-preset", "auto"]
    if model_cfg.get("revision"):
        argv += ["--revision", model_cfg["revision"]]
    if plugins:
        argv += ["--plugins", *plugins]
    return argv


def measure(
    model_name: str,
    model_cfg: dict,
    methods: dict[str, dict | None],
    budgets: list[int],
    settings: dict,
    threads: int,
    seed: int,
    plugins: list[str],
    out: Path,
) -> dict:
    """`vtc.bench` for one model over the config's methods (with their hyperparameters) and budgets; writes `out`.

    Each record's label is the config's method name, and the JSON names the config's model, so the records join
    the evaluate results on (model, method, budget). In-LLM methods are timed with the same hyperparameters
    (budget_mode, layer, ...) their evaluate runs use; encoder- and question-stage ones are under `not_measured`."""
    from vtc import bench
    from vtc.methods import import_plugins, method_entry, method_stage

    argv = bench_argv(model_cfg, budgets, settings, threads, seed, plugins)
    import_plugins(plugins)
    # vtc.bench starts from the vision tower's output, so a method that merges inside it (ToMe) cannot be timed there
    entries = {name: method_entry(name, entry) for name, entry in methods.items()}
    # and one that reduces per question (CDPruner) needs the questions and its relevance model, which it does not load
    not_timed = [name for name, (method, _) in entries.items() if method_stage(method) in ("encoder", "question")]
    specs = [(name, method, hparams) for name, (method, hparams) in entries.items() if name not in not_timed]
    result = bench.benchmark(bench.parse_args(argv), specs)
    result["model"] = model_name
    result["not_measured"] = not_timed
    # bench records its own command line; here the methods come from the config, not from --methods
    result["settings"]["command"] = "snakemake rule measure_cost (vtc.pipeline.efficiency.measure)"
    result["settings"]["bench_args"] = argv
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return result
