"""`aggregate`: every evaluate result in one tidy table, with its cost; a markdown summary and plots.

The long table has one row per (model, dataset, method, budget, metric). Next to the scorer's metrics it holds
each run's predicted cost (`cost/...`, the `cost` block of its metrics.json, see `vtc.pipeline.efficiency`) and,
when rule `measure_cost` ran, the measured cost of the same method and budget on that model (`measured/...`, from
results/efficiency/{model}/measured.json), so accuracy and cost join on the same keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

KEYS = ["model", "dataset", "method", "budget"]
# cost block key -> (metric, factor to the unit the metric's name gives)
PREDICTED = {
    "visual_tokens_layer_avg": ("cost/visual_tokens_layer_avg", 1),
    "prefill_flops": ("cost/prefill_tflops", 1e-12),
    "decode_flops": ("cost/decode_tflops", 1e-12),
    "kv_cache_bytes": ("cost/kv_cache_mb", 1e-6),
}
PREDICTED_TIMES = {"prefill_time_s": "cost/prefill_ms", "decode_time_s": "cost/decode_ms"}  # + "@{preset}", in ms
# vtc.bench record key -> metric; timings are medians over the repeats, the fraction a ratio of medians
MEASURED = {
    "prefill_ms": "measured/prefill_ms",
    "reduce_ms": "measured/reduce_ms",
    "e2e_ms_per_sample": "measured/e2e_ms_per_sample",
    "decode_tokens_per_s": "measured/decode_tokens_per_s",
    "peak_memory_mb": "measured/peak_memory_mb",
    "reduce_fraction_of_full_prefill": "measured/reduce_fraction_of_full_prefill",
}
IS_SCORE = ~(pl.col("metric").str.starts_with("cost/") | pl.col("metric").str.starts_with("measured/"))


def predicted_metrics(result: dict) -> dict[str, float]:
    """The `cost/...` metrics of one metrics.json; none for results written before runs had a cost block."""
    run_cost = result.get("cost")
    if not run_cost:
        return {}
    metrics = {metric: run_cost[key] * factor for key, (metric, factor) in PREDICTED.items()}
    for key, metric in PREDICTED_TIMES.items():
        metrics[f"{metric}@{run_cost['device_preset']}"] = run_cost[key] * 1e3
    return metrics


def _median(figure: dict | float) -> float:
    """The median of a vtc.bench summary ({"median": ..., "values": [...]}); a plain number (a ratio) as it is."""
    return figure["median"] if isinstance(figure, dict) else figure


def measured_metrics(record: dict) -> dict[str, float]:
    """The `measured/...` metrics of one vtc.bench record; none for a figure it could not measure (an in-LLM
    method's reduce time, which is inside its prefill)."""
    values = {metric: _median(record[key]) for key, metric in MEASURED.items()}
    return {metric: value for metric, value in values.items() if value is not None}


def load_measured(paths: list[Path]) -> dict[str, dict]:
    """measured.json of each model (written by `vtc.pipeline.efficiency.measure`), by the config's model name."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    return {result["model"]: result for result in results}


def tidy(metrics_files: list[Path], measured: dict[str, dict] | None = None) -> pl.DataFrame:
    """One row per (model, dataset, method, budget, metric), with the value relative to `full`.

    `metric_rank` keeps each run's order: the scorer's metrics first, as the scorer returns them (the headline
    first), then the predicted and the measured cost. Measured records join the runs of the same model, method
    (the record's label is the config's method name) and budget, under every dataset: the benchmark times one
    fixed prompt, so its figures do not depend on the dataset. `n` is the questions of the run, or for measured
    rows the timed repeats their medians are over; a run whose dataset lost bad rows in `prepare_dataset` also has
    a `skipped_rows` metric, whose `n` is the rows read.
    """
    records = {
        (model, r["label"], r["budget"]): r for model, result in (measured or {}).items() for r in result["records"]
    }
    rows = []
    for path in metrics_files:
        result = json.loads(Path(path).read_text())
        values = [(metric, value, result["n"]) for metric, value in result["metrics"].items()]
        values += [(metric, value, result["n"]) for metric, value in predicted_metrics(result).items()]
        read = result.get("dataset_rows")
        if read and read["skipped"]:  # out of the rows read: the other metrics' n counts only the rows kept
            values.append(("skipped_rows", read["skipped"], read["read"]))
        record = records.get((result["model"], result["method"], result["budget"]))
        if record:
            repeats = record["prefill_ms"]["n"]
            values += [(metric, value, repeats) for metric, value in measured_metrics(record).items()]
        for rank, (metric, value, n) in enumerate(values):
            rows.append(
                {
                    **{k: result[k] for k in KEYS},
                    "tokens": visual_tokens(result),
                    "kept": visual_tokens_kept(result),
                    # least and most visual tokens a question got (differ for images of different token counts)
                    "tokens_min": result.get("visual_tokens_fed", {}).get("min", visual_tokens(result)),
                    "tokens_max": result.get("visual_tokens_fed", {}).get("max", visual_tokens(result)),
                    "metric": metric,
                    "metric_rank": rank,
                    "value": float(value),
                    "n": n,
                }
            )
    # a study with budgets as ratios (of each image's tokens) has float budgets
    budget_type = pl.Int64 if all(isinstance(row["budget"], int) for row in rows) else pl.Float64
    types = {"budget": budget_type, "tokens": pl.Int64, "kept": pl.Int64, "tokens_min": pl.Float64, "tokens_max": pl.Float64}
    table = pl.DataFrame(rows, schema_overrides=types)
    full = table.filter(pl.col("method") == "full").select("model", "dataset", "metric", full_value="value")
    return (
        table.join(full, on=["model", "dataset", "metric"], how="left")
        .with_columns(relative_to_full=pl.when(pl.col("full_value") != 0).then(pl.col("value") / pl.col("full_value")))
        .drop("full_value")
        .sort(
            ["model", "dataset", "metric_rank", "metric", "method", "budget"],
            descending=[False, False, False, False, False, True],
        )
    )


def visual_tokens(result: dict) -> int:
    """The visual tokens of a run as the tables count them: the layer average of an in-LLM method (which splices all
    N and prunes inside the LLM), else the k it spliced (the same at every layer)."""
    if result.get("in_llm"):
        return round(result["in_llm"]["visual_tokens_layer_avg"])
    if "visual_tokens_fed" in result:  # images of different token counts (or budgets as ratios): the mean
        return round(result["visual_tokens_fed"]["mean"])
    return max(result["num_visual_tokens"])


def visual_tokens_kept(result: dict) -> int:
    """The visual tokens of a run's last LLM layers: what an in-LLM method keeps after its (last) prune layer, else
    the k it spliced."""
    if result.get("in_llm"):
        return round(result["in_llm"]["visual_tokens_per_layer"][-1])
    return max(result["num_visual_tokens"])


def headline_metric(table: pl.DataFrame, dataset: str) -> str:
    """The benchmark's first reported metric (scorers put the headline first); never a cost."""
    scores = table.filter((pl.col("dataset") == dataset) & IS_SCORE)
    return scores.sort(["metric_rank", "metric"])["metric"][0]


def markdown(table: pl.DataFrame) -> str:
    """Per model and dataset: methods as rows, budgets as columns, headline metric; an in-LLM run's cell also gives
    both of its token counts (kept after pruning, average over layers). Then `target_recall`, where the benchmark
    records which patches each question is about: whether a method kept the tokens that matter, whatever the model
    makes of them."""
    sections = []
    for (model, dataset), part in table.group_by(["model", "dataset"], maintain_order=True):
        metric = headline_metric(part, dataset)
        lines = [
            f"### {dataset} — {model} — {metric}",
            "",
            "Columns are budgets. A method that reduces before the LLM feeds that many visual tokens to every layer. An "
            "in-LLM method (fastv, dart, sparsevlm) feeds all of them to the layers before it prunes and fewer after; its "
            "cells read `accuracy (kept K, avg A)`: K tokens in the last layers, A averaged over the layers. A is the "
            "budget by default (as those papers count), K with `budget_mode: kept`.",
            "",
            *_method_budget_table(part.filter(pl.col("metric") == metric)),
        ]
        recall = part.filter(pl.col("metric") == "target_recall")
        if metric != "target_recall" and len(recall):
            lines += [
                "",
                f"#### {dataset} — {model} — target_recall",
                "",
                "Share (%) of the patches of the objects a question names that the tokens reaching the LLM's last layers "
                "still cover.",
                "",
                *_method_budget_table(recall),
            ]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def budget_label(budget: int | float) -> str:
    """A column header: "64 tokens" for a count, "11.1% of tokens" for a ratio of each image's tokens."""
    if isinstance(budget, float) and budget <= 1.0:
        return f"{budget:.1%} of tokens"
    return f"{int(budget)} tokens"


def _method_budget_table(part: pl.DataFrame) -> list[str]:
    """Markdown rows of one metric: `full` first, then each method (rows) at each budget (columns)."""
    budgets = sorted(part.filter(pl.col("method") != "full")["budget"].unique().to_list(), reverse=True)
    lines = ["| method | " + " | ".join(budget_label(b) for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    full = part.filter(pl.col("method") == "full")
    if len(full):
        lines.append(
            f"| full ({full['tokens'][0]} tokens) | " + " | ".join(f"{full['value'][0]:.1f}" for _ in budgets) + " |"
        )
    for method in sorted(set(part["method"]) - {"full"}):
        cells = []
        for budget in budgets:
            run = part.filter((pl.col("method") == method) & (pl.col("budget") == budget))
            if not len(run):
                cells.append("–")
            elif run["kept"][0] != run["tokens"][0]:
                cells.append(f"{run['value'][0]:.1f} (kept {run['kept'][0]}, avg {run['tokens'][0]})")
            elif run["tokens_min"][0] != run["tokens_max"][0]:
                low, high = round(run["tokens_min"][0]), round(run["tokens_max"][0])
                cells.append(f"{run['value'][0]:.1f} ({run['tokens'][0]} tokens, {low}–{high})")
            else:
                cells.append(f"{run['value'][0]:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def predicted_preset(table: pl.DataFrame) -> str | None:
    """The device preset of the predicted times ("H100"), from their metric names; None without cost rows."""
    names = sorted(table.filter(pl.col("metric").str.starts_with("cost/prefill_ms@"))["metric"].unique())
    return names[0].split("@", 1)[1] if names else None


def efficiency_summary(table: pl.DataFrame) -> pl.DataFrame:
    """Per (model, method, budget): predicted and measured prefill cost, `full` first, then budgets descending.

    Predicted figures differ by dataset (prompt and answer lengths), so they are averaged over the model's datasets;
    measured ones are the same under every dataset. Columns: visual_tokens_layer_avg (tokens), prefill_tflops,
    prefill_tflops_vs_full (ratio), prefill_ms_predicted (roofline on the preset), prefill_ms_measured,
    speedup_measured (full's measured prefill time / this one's), reduce_fraction_of_full_prefill.
    """
    columns = {
        "cost/visual_tokens_layer_avg": "visual_tokens_layer_avg",
        "cost/prefill_tflops": "prefill_tflops",
        f"cost/prefill_ms@{predicted_preset(table)}": "prefill_ms_predicted",
        "measured/prefill_ms": "prefill_ms_measured",
        "measured/reduce_fraction_of_full_prefill": "reduce_fraction_of_full_prefill",
    }
    part = table.filter(pl.col("metric").is_in(list(columns)))
    if part.is_empty():
        return pl.DataFrame()
    wide = part.pivot(on="metric", index=["model", "method", "budget"], values="value", aggregate_function="mean")
    wide = wide.with_columns([pl.lit(None, pl.Float64).alias(m) for m in columns if m not in wide.columns])
    wide = wide.rename(columns)
    full = wide.filter(pl.col("method") == "full").select(
        "model", full_tflops="prefill_tflops", full_ms="prefill_ms_measured"
    )
    return (
        wide.join(full, on="model", how="left")
        .with_columns(
            prefill_tflops_vs_full=pl.col("prefill_tflops") / pl.col("full_tflops"),
            speedup_measured=pl.col("full_ms") / pl.col("prefill_ms_measured"),
        )
        .sort(["model", pl.col("method") != "full", "method", "budget"], descending=[False, False, False, True])
        .select(
            "model", "method", "budget", "visual_tokens_layer_avg", "prefill_tflops", "prefill_tflops_vs_full",
            "prefill_ms_predicted", "prefill_ms_measured", "speedup_measured", "reduce_fraction_of_full_prefill",
        )  # fmt: skip
    )


def measured_device(result: dict) -> str:
    """Where and how `vtc.bench` measured: the machine, settings and the load it ran under."""
    m, s = result["machine"], result["settings"]
    where = m.get("gpu") or f"{m['cpu_model']} ({m['usable_cpus']} usable CPUs, {m['torch_threads']} torch threads)"
    load = m.get("load_average_at_start")
    return (
        f"{where}; {s['dtype']}, attention {s['attn_implementation']}, batch {s['batch_size']}, {s['text_tokens']} "
        f"text tokens, {s['new_tokens']} new tokens, median of {s['repeats']} runs"
        + (f", 1-min load average {load[0]:.1f} at start" if load else "")
    )


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def efficiency_markdown(summary: pl.DataFrame, table: pl.DataFrame, measured: dict[str, dict]) -> str:
    """The efficiency section of results.md: one table per model (see `efficiency_summary`)."""
    if summary.is_empty():
        return ""
    preset = predicted_preset(table)
    sections = ["## Efficiency"]
    for (model,), part in summary.group_by(["model"], maintain_order=True):
        datasets = table.filter(pl.col("model") == model)["dataset"].n_unique()
        where = (
            f"measured by rule `measure_cost` (`vtc.bench`) on {measured_device(measured[model])}"
            if model in measured
            else "not measured (`efficiency.measure` is off)"
        )
        lines = [
            f"### {model}",
            "",
            f"Visual tokens are the average over the decoder layers (the same at every layer for methods that reduce "
            f"before the LLM). Predicted: `vtc.cost` for the run's mean request, roofline times on the {preset} "
            f"preset, averaged over {datasets} dataset(s). Prefill times {where}.",
            "",
            f"| method | budget | visual tokens / layer | prefill TFLOPs | vs full | prefill ms {preset} (predicted) "
            "| prefill ms (measured) | speed-up (measured) | reduce / full prefill (measured) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in part.iter_rows(named=True):
            cells = [
                r["method"],
                str(r["budget"]),
                _cell(r["visual_tokens_layer_avg"], ".1f"),
                _cell(r["prefill_tflops"], ".3g"),
                _cell(r["prefill_tflops_vs_full"], ".3f"),
                _cell(r["prefill_ms_predicted"], ".3g"),
                _cell(r["prefill_ms_measured"], ".3g"),
                _cell(r["speedup_measured"], ".2f") + ("×" if r["speedup_measured"] is not None else ""),
                _cell(r["reduce_fraction_of_full_prefill"], ".1%"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def plot(table: pl.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = table.select("model", "dataset").unique(maintain_order=True).rows()
    figure, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], groups):
        metric = headline_metric(table, dataset)
        part = table.filter((pl.col("model") == model) & (pl.col("dataset") == dataset) & (pl.col("metric") == metric))
        for method in sorted(set(part["method"]) - {"full"}):
            line = part.filter(pl.col("method") == method).sort("tokens")
            ax.plot(line["tokens"], line["value"], marker="o", label=method)
        full = part.filter(pl.col("method") == "full")
        if len(full):
            ax.axhline(full["value"][0], color="black", linestyle="--", label=f"full ({full['tokens'][0]})")
        ax.set(title=f"{dataset} ({model})", xlabel="visual tokens", ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def pareto_frontier(costs: list[float], values: list[float]) -> list[int]:
    """Indices of the points that no other point beats, by increasing cost.

    A point is beaten when another costs no more and scores at least as much, one of the two strictly; of identical
    points the first is kept. Sweep: by cost (ties: best score first), keep each point that scores above all
    cheaper ones.
    """
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -values[i]))
    frontier, best = [], float("-inf")
    for i in order:
        if values[i] > best:
            frontier.append(i)
            best = values[i]
    return frontier


def cost_and_score(part: pl.DataFrame, cost_metric: str, score_metric: str) -> pl.DataFrame:
    """(method, budget, cost, score) of the runs of one model and dataset that have both metrics."""
    costs = part.filter(pl.col("metric") == cost_metric).select("method", "budget", cost="value")
    scores = part.filter(pl.col("metric") == score_metric).select("method", "budget", score="value")
    return costs.join(scores, on=["method", "budget"]).sort("cost")


def pareto_panel(ax, points: pl.DataFrame, xlabel: str, ylabel: str, title: str) -> None:
    """Every run as a point labelled method/budget, the Pareto frontier as dashed steps (the best score reachable
    at a cost). Runs at the same point share one label (every pre-LLM method at a budget has the same FLOPs)."""
    labels = (
        points.group_by(["cost", "score"], maintain_order=True)
        .agg(pl.format("{}/{}", "method", "budget").str.join(", ").alias("label"))
        .sort("cost")
    )
    frontier = points[pareto_frontier(points["cost"].to_list(), points["score"].to_list())]
    ax.scatter(points["cost"], points["score"], s=25, zorder=3, label="run")
    ax.scatter(frontier["cost"], frontier["score"], s=60, facecolors="none", edgecolors="black", zorder=4)
    # Tied scores are common on small test sets: labels of same-score points close in cost are stacked.
    span = (points["cost"].max() - points["cost"].min()) or 1.0
    last = {}  # score -> (cost, stack level) of its last label
    for cost, score, label in labels.iter_rows():
        near = score in last and cost - last[score][0] < 0.05 * span
        level = last[score][1] + 1 if near else 0
        last[score] = (cost, level)
        ax.annotate(label, (cost, score), fontsize=7, xytext=(4, 3 + 9 * level), textcoords="offset points")
    ax.margins(y=0.15)
    ax.step(frontier["cost"], frontier["score"], where="post", color="black", linestyle="--", linewidth=1,
            label="Pareto frontier")  # fmt: skip
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def pareto_plot(table: pl.DataFrame, path: Path) -> None:
    """Per (model, dataset), a row: headline metric against predicted prefill TFLOPs and, when rule measure_cost
    ran, against measured prefill time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = table.select("model", "dataset").unique(maintain_order=True).rows()
    panels = [("cost/prefill_tflops", "predicted prefill TFLOPs (vtc.cost)")]
    if not table.filter(pl.col("metric") == "measured/prefill_ms").is_empty():
        panels.append(("measured/prefill_ms", "measured prefill ms (vtc.bench)"))
    figure, axes = plt.subplots(len(groups), len(panels), figsize=(6 * len(panels), 4.5 * len(groups)), squeeze=False)
    for row, (model, dataset) in zip(axes, groups):
        part = table.filter((pl.col("model") == model) & (pl.col("dataset") == dataset))
        metric = headline_metric(part, dataset)
        for ax, (cost_metric, xlabel) in zip(row, panels):
            points = cost_and_score(part, cost_metric, metric)
            if points.is_empty():  # this model was not measured, or its runs predate the cost block
                ax.axis("off")
                continue
            pareto_panel(ax, points, xlabel, metric, f"{dataset} ({model})")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def aggregate(
    metrics_files: list[Path],
    measured_files: list[Path],
    out_parquet: Path,
    out_csv: Path,
    out_markdown: Path,
    out_plot: Path,
    out_pareto: Path,
    wandb_settings: dict,
) -> pl.DataFrame:
    from vtc.tracking import wandb_run

    measured = load_measured(measured_files)
    table = tidy(metrics_files, measured)
    summary = efficiency_summary(table)
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out_parquet)
    table.write_csv(out_csv)
    out_markdown.write_text("\n".join(filter(None, [markdown(table), efficiency_markdown(summary, table, measured)])))
    plot(table, out_plot)
    pareto_plot(table, out_pareto)
    config = {"num_results": len(metrics_files), "measured_models": sorted(measured)}
    with wandb_run(wandb_settings, job_type="aggregate", name="results", config=config) as run:
        import wandb

        logged = {
            "results": wandb.Table(columns=table.columns, data=table.rows()),
            "accuracy_vs_tokens": wandb.Image(str(out_plot)),
            "pareto": wandb.Image(str(out_pareto)),
            **wandb_charts(table),
        }
        if not summary.is_empty():
            logged["efficiency"] = wandb.Table(columns=summary.columns, data=summary.rows())
        run.log(logged)
    return table


def headline_runs(table: pl.DataFrame) -> pl.DataFrame:
    """One row per run (model, dataset, method, budget): its visual tokens, kept tokens, headline metric (name and
    value) and predicted prefill TFLOPs; the rows of W&B's method table and charts."""
    parts = []
    for (model, dataset), part in table.group_by(["model", "dataset"], maintain_order=True):
        metric = headline_metric(part, dataset)
        scores = part.filter(pl.col("metric") == metric).select(*KEYS, "tokens", "kept", score="value")
        cost = part.filter(pl.col("metric") == "cost/prefill_tflops").select(*KEYS, prefill_tflops="value")
        parts.append(scores.join(cost, on=KEYS, how="left").with_columns(metric=pl.lit(metric)))
    return pl.concat(parts).sort(["model", "dataset", "method", "tokens"]) if parts else pl.DataFrame()


def wandb_charts(table: pl.DataFrame) -> dict:
    """Native W&B charts of a study (re-plottable, filterable in the UI, unlike the PNGs), per model and dataset:
    `accuracy_vs_tokens/<dataset>/<model>`, the headline metric against visual tokens, one line per method;
    `pareto/<dataset>/<model>`, every run's headline metric against predicted prefill TFLOPs;
    `pareto_frontier/<dataset>/<model>`, the frontier's steps (the best score reachable at a cost). Plus
    `methods`, one row per run (see `headline_runs`)."""
    import wandb

    runs = headline_runs(table)
    charts = {"methods": wandb.Table(columns=runs.columns, data=runs.rows())} if not runs.is_empty() else {}
    for (model, dataset), part in runs.group_by(["model", "dataset"], maintain_order=True):
        metric = part["metric"][0]
        lines = part.sort("tokens").group_by("method", maintain_order=True).agg("tokens", "score")
        charts[f"accuracy_vs_tokens/{dataset}/{model}"] = wandb.plot.line_series(
            xs=lines["tokens"].to_list(), ys=lines["score"].to_list(), keys=lines["method"].to_list(),
            title=f"{dataset} ({model}): {metric} vs visual tokens", xname="visual tokens",
        )  # fmt: skip
        points = part.filter(pl.col("prefill_tflops").is_not_null()).sort("prefill_tflops")
        if points.is_empty():
            continue
        columns = ["method", "budget", "tokens", "prefill_tflops", "score"]
        charts[f"pareto/{dataset}/{model}"] = wandb.plot.scatter(
            wandb.Table(columns=columns, data=points.select(columns).rows()), "prefill_tflops", "score",
            title=f"{dataset} ({model}): {metric} vs predicted prefill TFLOPs",
        )  # fmt: skip
        frontier = points[pareto_frontier(points["prefill_tflops"].to_list(), points["score"].to_list())]
        charts[f"pareto_frontier/{dataset}/{model}"] = wandb.plot.line(
            wandb.Table(columns=columns, data=frontier.select(columns).rows()), "prefill_tflops", "score",
            title=f"{dataset} ({model}): Pareto frontier ({metric} vs prefill TFLOPs)",
        )  # fmt: skip
    return charts
