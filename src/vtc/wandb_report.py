"""A W&B Report of one vtc experiment, built from the runs the workflow logged (after `wandb sync` where the jobs
ran offline), with the `wandb-workspaces` library:

    python -m vtc.wandb_report --entity ENTITY --project vtc --experiment paper-llava15-7b [--datasets gqa pope]

It needs WANDB_API_KEY (or `wandb login`) and saves the report, printing its URL; `--draft` keeps it a draft and
`--dry-run` prints the report's block and panel titles without a key. The report has, per benchmark (dataset), the
headline metric against visual tokens (a point per evaluate run, grouped by method) and against predicted prefill
TFLOPs (the efficiency frontier); the aggregate run's method table and its native charts; and a parallel-coordinates
view of method, budget, tokens and score over the whole study. Every panel reads the evaluate runs' filterable keys
(config: model, dataset, method, budget, visual_tokens, visual_tokens_kept, headline_metric; summary: score,
cost/prefill_tflops; see vtc.pipeline.evaluate), so the report follows reruns without being rebuilt.
"""

from __future__ import annotations

import argparse

import wandb_workspaces.reports.v2 as wr

TOKENS, SCORE, TFLOPS = "visual_tokens", "score", "cost/prefill_tflops"


def runs_filter(experiment: str, job_type: str, dataset: str | None = None) -> str:
    """The filter expression of one experiment's runs of one job type (and dataset)."""
    parts = [f"Metric('Group') == '{experiment}'", f"Metric('JobType') == '{job_type}'"]
    if dataset is not None:
        parts.append(f"Config('dataset') == '{dataset}'")
    return " and ".join(parts)


def evaluate_runs(entity: str, project: str, experiment: str, dataset: str | None = None) -> wr.Runset:
    return wr.Runset(
        entity=entity,
        project=project,
        name=f"{dataset or 'all'} evaluate runs",
        filters=runs_filter(experiment, "evaluate", dataset),
        groupby=["config.method"],
    )


def benchmark_section(entity: str, project: str, experiment: str, dataset: str) -> list:
    return [
        wr.H2(dataset),
        wr.PanelGrid(
            runsets=[evaluate_runs(entity, project, experiment, dataset)],
            panels=[
                wr.ScatterPlot(
                    title=f"{dataset}: score vs visual tokens", x=wr.SummaryMetric(TOKENS), y=wr.SummaryMetric(SCORE)
                ),
                wr.ScatterPlot(
                    title=f"{dataset}: efficiency frontier (score vs predicted prefill TFLOPs)",
                    x=wr.SummaryMetric(TFLOPS),
                    y=wr.SummaryMetric(SCORE),
                ),
                wr.BarPlot(
                    title=f"{dataset}: score per method (mean over budgets)",
                    metrics=[wr.SummaryMetric(SCORE)],
                    groupby="config.method",
                    groupby_aggfunc="mean",
                ),
            ],
        ),
    ]


def build_report(entity: str, project: str, experiment: str, datasets: list[str]) -> wr.Report:
    """The report, unsaved (building it needs no server)."""
    aggregate = wr.Runset(
        entity=entity, project=project, name="aggregate run", filters=runs_filter(experiment, "aggregate")
    )
    blocks = [
        wr.TableOfContents(),
        wr.P(
            f"Visual token reduction study '{experiment}': every point is one evaluate run "
            "(model, dataset, method, budget); score is the benchmark's headline metric."
        ),
        wr.H1("Accuracy vs visual tokens, per benchmark"),
        *[block for dataset in datasets for block in benchmark_section(entity, project, experiment, dataset)],
        wr.H1("Methods"),
        wr.PanelGrid(
            runsets=[aggregate],
            panels=[
                wr.WeavePanelSummaryTable(table_name="methods"),
                wr.WeavePanelSummaryTable(table_name="results"),
            ],
        ),
        wr.PanelGrid(
            runsets=[evaluate_runs(entity, project, experiment)],
            panels=[
                wr.ParallelCoordinatesPlot(
                    title="method, budget, tokens and score",
                    columns=[
                        wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key))
                        for key in ("method", "budget", "dataset", TOKENS, "visual_tokens_kept")
                    ]
                    + [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(SCORE))],
                )
            ],
        ),
        wr.MarkdownBlock(
            "The aggregate run also holds native charts per dataset and model: `accuracy_vs_tokens/...` (a line per "
            "method), `pareto/...` and `pareto_frontier/...` (score vs predicted prefill TFLOPs)."
        ),
    ]
    return wr.Report(
        entity=entity,
        project=project,
        title=f"vtc: {experiment}",
        description="Visual token reduction benchmark (vtc): accuracy vs visual tokens and cost.",
        blocks=blocks,
        width="fluid",
    )


def outline(report: wr.Report) -> list[str]:
    """One line per block and per panel: what --dry-run prints."""
    lines = []
    for block in report.blocks:
        text = getattr(block, "text", None)
        lines.append(f"{type(block).__name__}" + (f": {text}" if isinstance(text, str) else ""))
        for runset in getattr(block, "runsets", []) or []:
            lines.append(f"  runset {runset.name!r}: {runset.filters}")
        for panel in getattr(block, "panels", []) or []:
            lines.append(
                f"  {type(panel).__name__}: {getattr(panel, 'title', None) or getattr(panel, 'table_name', '')}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", required=True)
    parser.add_argument("--project", default="vtc")
    parser.add_argument("--experiment", required=True, help="the study's `experiment` (its W&B group)")
    parser.add_argument("--datasets", nargs="+", help="datasets to give a section (default: those of the runs)")
    parser.add_argument("--draft", action="store_true", help="save as a draft")
    parser.add_argument("--dry-run", action="store_true", help="print the report's outline; save nothing")
    args = parser.parse_args(argv)
    datasets = args.datasets
    if not datasets:
        if args.dry_run:
            parser.error("--dry-run needs --datasets (finding them reads the runs from the server)")
        import wandb

        runs = wandb.Api().runs(
            f"{args.entity}/{args.project}", filters={"group": args.experiment, "jobType": "evaluate"}
        )
        datasets = sorted({run.config["dataset"] for run in runs})
        if not datasets:
            raise SystemExit(f"no evaluate runs of experiment {args.experiment!r} in {args.entity}/{args.project}")
    report = build_report(args.entity, args.project, args.experiment, datasets)
    if args.dry_run:
        print("\n".join(outline(report)))
        return
    report.save(draft=args.draft)
    print(report.url)


if __name__ == "__main__":
    main()
