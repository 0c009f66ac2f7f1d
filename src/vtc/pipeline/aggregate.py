"""`aggregate`: every evaluate result in one tidy table, a markdown summary and an accuracy-vs-tokens plot."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

KEYS = ["model", "dataset", "method", "budget"]


def tidy(metrics_files: list[Path]) -> pl.DataFrame:
    """One row per (model, dataset, method, budget, metric), with the value relative to `full`."""
    rows = []
    for path in metrics_files:
        result = json.loads(Path(path).read_text())
        for metric, value in result["metrics"].items():
            rows.append(
                {
                    **{k: result[k] for k in KEYS},
                    "tokens": max(result["num_visual_tokens"]),
                    "metric": metric,
                    "value": float(value),
                    "n": result["n"],
                }
            )
    table = pl.DataFrame(rows, schema_overrides={"budget": pl.Int64, "tokens": pl.Int64})
    full = table.filter(pl.col("method") == "full").select("model", "dataset", "metric", full_value="value")
    return (
        table.join(full, on=["model", "dataset", "metric"], how="left")
        .with_columns(
            relative_to_full=pl.when(pl.col("full_value") != 0).then(pl.col("value") / pl.col("full_value"))
        )
        .drop("full_value")
        .sort(["model", "dataset", "metric", "method", "budget"], descending=[False, False, False, False, True])
    )


def headline_metric(table: pl.DataFrame, dataset: str) -> str:
    """The benchmark's first reported metric (scorers put the headline first)."""
    return table.filter(pl.col("dataset") == dataset)["metric"][0]


def markdown(table: pl.DataFrame) -> str:
    """Per model and dataset: methods as rows, budgets as columns, headline metric (and Δ to full)."""
    sections = []
    for (model, dataset), part in table.group_by(["model", "dataset"], maintain_order=True):
        metric = headline_metric(part, dataset)
        part = part.filter(pl.col("metric") == metric)
        budgets = sorted(part.filter(pl.col("method") != "full")["budget"].unique().to_list(), reverse=True)
        full = part.filter(pl.col("method") == "full")["value"]
        lines = [
            f"### {dataset} — {model} — {metric}",
            "",
            "| method | " + " | ".join(f"{b} tokens" for b in budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        if len(full):
            lines.append(f"| full ({part.filter(pl.col('method') == 'full')['tokens'][0]} tokens) | "
                         + " | ".join(f"{full[0]:.1f}" for _ in budgets) + " |")
        for method in sorted(set(part["method"]) - {"full"}):
            cells = []
            for budget in budgets:
                value = part.filter((pl.col("method") == method) & (pl.col("budget") == budget))["value"]
                cells.append(f"{value[0]:.1f}" if len(value) else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
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


def aggregate(metrics_files: list[Path], out_parquet: Path, out_csv: Path, out_markdown: Path, out_plot: Path, wandb_settings: dict) -> pl.DataFrame:
    from vtc.tracking import wandb_run

    table = tidy(metrics_files)
    out_parquet.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out_parquet)
    table.write_csv(out_csv)
    out_markdown.write_text(markdown(table))
    plot(table, out_plot)
    with wandb_run(wandb_settings, job_type="aggregate", name="results", config={"num_results": len(metrics_files)}) as run:
        import wandb

        run.log({"results": wandb.Table(columns=table.columns, data=table.rows()), "accuracy_vs_tokens": wandb.Image(str(out_plot))})
    return table
