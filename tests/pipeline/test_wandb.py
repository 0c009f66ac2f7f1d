"""W&B a researcher can browse: the aggregate run's native charts and method table (logged offline and read back
with `wandb leet inspect`), the evaluate runs' filterable keys, and the structure of the report
`python -m vtc.wandb_report` builds (checked without a server: nothing is saved)."""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr

from vtc.pipeline.aggregate import aggregate, headline_runs, tidy
from vtc.wandb_report import build_report, main, outline

WANDB = Path(sys.executable).parent / "wandb"


def write_run(path: Path, dataset: str, method: str, budget: int, accuracy: float, tflops: float) -> Path:
    cost = {
        "visual_tokens_layer_avg": budget, "prefill_flops": tflops * 1e12, "decode_flops": 1e12,
        "kv_cache_bytes": 1e8, "device_preset": "H100", "prefill_time_s": 0.01, "decode_time_s": 0.05,
    }  # fmt: skip
    result = {
        "model": "m", "dataset": dataset, "method": method, "budget": budget, "n": 10,
        "num_visual_tokens": [budget], "metrics": {"accuracy": accuracy, "target_recall": 50.0}, "cost": cost,
    }  # fmt: skip
    path.write_text(json.dumps(result))
    return path


@pytest.fixture
def metrics_files(tmp_path):
    runs = [("full", 576, 80.0, 8.0), ("pool", 192, 78.0, 3.0), ("pool", 64, 60.0, 1.5), ("random", 64, 62.0, 1.5)]
    return [
        write_run(tmp_path / f"{dataset}-{method}-{budget}.json", dataset, method, budget, accuracy - i, tflops)
        for i, dataset in enumerate(("d1", "d2"))
        for method, budget, accuracy, tflops in runs
    ]


def test_method_table_has_one_row_per_run_with_its_headline(metrics_files):
    runs = headline_runs(tidy(metrics_files))
    assert runs.height == 8
    assert set(runs["metric"]) == {"accuracy"}  # the headline, not target_recall
    row = runs.filter((pl.col("dataset") == "d2") & (pl.col("method") == "pool") & (pl.col("budget") == 64))
    assert row.select("tokens", "kept", "score", "prefill_tflops").row(0) == (64, 64, 59.0, 1.5)


def logged(run_dir: Path) -> tuple[dict, dict]:
    """(config, summary) of an offline run as `wandb leet inspect --json` reads its records (keys flattened with
    dots, later updates winning)."""
    out = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    config, summary = {}, {}
    for line in out.stdout.splitlines():
        record = json.loads(line)
        if record["type"] == "run":  # the config given to wandb.init
            config.update(record["run"].get("config", {}).get("update", {}))
        if record["type"] in ("config", "summary"):
            (config if record["type"] == "config" else summary).update(record[record["type"]].get("update", {}))
    return config, summary


def test_aggregate_run_logs_the_tidy_table_and_native_charts(tmp_path, metrics_files):
    out = tmp_path / "out"
    settings = {"mode": "offline", "group": "study", "dir": str(tmp_path / "wandb")}
    aggregate(
        metrics_files, [], out / "r.parquet", out / "r.csv", out / "r.md", out / "p.png", out / "pareto.png", settings
    )
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    config, summary = logged(run_dir)
    assert summary["results._type"] == "table-file"
    assert summary["results.nrows"] == pl.read_parquet(out / "r.parquet").height
    assert summary["methods.nrows"] == 8
    charts = {
        "accuracy_vs_tokens": "wandb/lineseries/v0",
        "pareto": "wandb/scatter/v0",
        "pareto_frontier": "wandb/line/v0",
    }
    for dataset in ("d1", "d2"):
        for chart, panel in charts.items():
            key = f"{chart}/{dataset}/m"
            # a native chart: a Vega panel over a logged table, re-plottable in the UI (not an image)
            assert config[f"_wandb.visualize.{key}"]["panel_config"]["panelDefId"] == panel, key
            assert summary[f"{key}_table._type"] == "table-file", key
    assert (
        summary["pareto_frontier/d1/m_table.nrows"] == 3
    )  # random/64 (same cost as pool/64, higher score), pool/192, full


def test_report_has_a_section_per_benchmark_and_filters_that_parse():
    report = build_report("team", "vtc", "paper-llava15-7b", ["gqa", "pope"])
    assert (report.entity, report.project, report.title) == ("team", "vtc", "vtc: paper-llava15-7b")
    headings = [block.text for block in report.blocks if isinstance(block, (wr.H1, wr.H2))]
    assert headings == ["Accuracy vs visual tokens, per benchmark", "gqa", "pope", "Methods"]
    grids = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    for dataset, grid in zip(("gqa", "pope"), grids):
        (runset,) = grid.runsets
        assert runset.groupby == ["config.method"]
        parsed = expr.expr_to_filters(runset.filters)  # offline: raises on a malformed expression
        assert f"Config('dataset') == '{dataset}'" in runset.filters and parsed
        scatter_tokens, scatter_cost, bars = grid.panels
        assert (scatter_tokens.x.name, scatter_tokens.y.name) == ("visual_tokens", "score")
        assert (scatter_cost.x.name, scatter_cost.y.name) == ("cost/prefill_tflops", "score")
        assert isinstance(bars, wr.BarPlot) and bars.groupby == "config.method"
    methods = grids[2]
    assert "Metric('JobType') == 'aggregate'" in methods.runsets[0].filters
    assert [panel.table_name for panel in methods.panels] == ["methods", "results"]
    assert isinstance(grids[3].panels[0], wr.ParallelCoordinatesPlot)


def test_report_dry_run_prints_the_outline_without_a_key(capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    main(["--entity", "team", "--experiment", "x", "--datasets", "gqa", "--dry-run"])
    printed = capsys.readouterr().out.splitlines()
    assert printed == outline(build_report("team", "vtc", "x", ["gqa"]))
    assert "  ScatterPlot: gqa: score vs visual tokens" in printed
