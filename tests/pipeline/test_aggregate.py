import json

import polars as pl
import pytest

from vtc.pipeline.aggregate import (
    efficiency_markdown,
    efficiency_summary,
    headline_metric,
    load_measured,
    markdown,
    pareto_frontier,
    pareto_plot,
    tidy,
)


def write_result(path, method, budget, tokens, accuracy, recall):
    path.write_text(
        json.dumps(
            {
                "model": "m", "dataset": "d", "method": method, "budget": budget, "n": 10,
                "num_visual_tokens": [tokens], "metrics": {"accuracy": accuracy, "target_recall": recall},
            }
        )
    )
    return path


def test_tidy_table_is_long_and_relative_to_full(tmp_path):
    files = [
        write_result(tmp_path / "a.json", "full", 576, 576, 80.0, 100.0),
        write_result(tmp_path / "b.json", "pool", 64, 64, 60.0, 100.0),
        write_result(tmp_path / "c.json", "random", 64, 64, 0.0, 25.0),
    ]
    table = tidy(files)
    assert table.height == 6
    pool = table.filter((pl.col("method") == "pool") & (pl.col("metric") == "accuracy"))
    assert pool["relative_to_full"].to_list() == [0.75]
    assert pool["tokens"].to_list() == [64]
    random = table.filter((pl.col("method") == "random") & (pl.col("metric") == "target_recall"))
    assert random["relative_to_full"].to_list() == [0.25]
    text = markdown(table)
    assert "| full (576 tokens) | 80.0 |" in text and "| pool | 60.0 |" in text
    recall_table = text.split("target_recall")[-1]
    assert "| full (576 tokens) | 100.0 |" in recall_table and "| random | 25.0 |" in recall_table


def test_zero_full_value_gives_no_ratio(tmp_path):
    files = [write_result(tmp_path / "a.json", "full", 576, 576, 0.0, 100.0), write_result(tmp_path / "b.json", "pool", 64, 64, 0.0, 90.0)]
    table = tidy(files)
    assert table.filter(pl.col("metric") == "accuracy")["relative_to_full"].null_count() == 2


def run_cost(prefill_tflops, decode_tflops, kv_mb, layer_avg, prefill_ms, decode_ms):
    """A metrics.json `cost` block (the keys vtc.pipeline.efficiency.predicted_cost writes that aggregate reads)."""
    return {
        "visual_tokens_layer_avg": layer_avg, "prefill_flops": prefill_tflops * 1e12,
        "decode_flops": decode_tflops * 1e12, "kv_cache_bytes": kv_mb * 1e6, "device_preset": "H100",
        "prefill_time_s": prefill_ms / 1e3, "decode_time_s": decode_ms / 1e3,
    }  # fmt: skip


def write_run(path, dataset, method, budget, metrics, cost):
    result = {
        "model": "m", "dataset": dataset, "method": method, "budget": budget, "n": 10,
        "num_visual_tokens": [budget], "metrics": metrics, "cost": cost,
    }  # fmt: skip
    path.write_text(json.dumps(result))
    return path


def bench_summary(median):
    """The parts of a vtc.bench summary that aggregate reads."""
    return {"median": median, "n": 5}


def bench_record(label, budget, prefill_ms, reduce_ms, fraction):
    return {
        "label": label, "method": label, "budget": budget, "visual_tokens": budget,
        "prefill_ms": bench_summary(prefill_ms), "reduce_ms": bench_summary(reduce_ms),
        "e2e_ms_per_sample": bench_summary(40.0),
        "decode_tokens_per_s": bench_summary(800.0), "peak_memory_mb": bench_summary(500.0),
        "reduce_fraction_of_full_prefill": fraction,
    }  # fmt: skip


MEASURED = {
    "model": "m",
    "machine": {"cpu_model": "Test CPU", "usable_cpus": 2, "torch_threads": 1, "load_average_at_start": [0.5, 0, 0]},
    "settings": {
        "dtype": "float32", "attn_implementation": "sdpa", "batch_size": 1, "text_tokens": 11, "new_tokens": 16,
        "repeats": 5,
    },
    # random/64 was measured but not evaluated: it must not join anything
    "records": [bench_record("full", 576, 20.0, 0.2, 0.01), bench_record("pool", 64, 5.0, 0.5, 0.025),
                bench_record("random", 64, 4.0, 0.3, 0.015)],
}  # fmt: skip


@pytest.fixture
def study(tmp_path):
    """Two datasets, full and pool on each, every run with a cost block; measured.json for the model."""
    files = []
    for dataset in ("d1", "d2"):
        full_cost = run_cost(8.0, 1.0, 300.0, 576.0, 8.0, 60.0)
        pool_cost = run_cost(2.0, 0.9, 100.0, 64.0, 4.0, 50.0)
        files.append(write_run(tmp_path / f"{dataset}-full.json", dataset, "full", 576, {"accuracy": 80.0}, full_cost))
        files.append(write_run(tmp_path / f"{dataset}-pool.json", dataset, "pool", 64, {"accuracy": 60.0}, pool_cost))
    (tmp_path / "measured.json").write_text(json.dumps(MEASURED))
    measured = load_measured([tmp_path / "measured.json"])
    return files, measured


def value(table, dataset, method, metric, column="value"):
    row = table.filter((pl.col("dataset") == dataset) & (pl.col("method") == method) & (pl.col("metric") == metric))
    assert row.height == 1, (dataset, method, metric)
    return row[column][0]


def test_cost_and_measured_rows_join_accuracy_on_the_same_keys(study):
    files, measured = study
    table = tidy(files, measured)
    assert table.height == 4 * (1 + 6 + 6)  # per run: accuracy, 6 predicted, 6 measured
    assert value(table, "d1", "pool", "cost/prefill_tflops") == pytest.approx(2.0)
    assert value(table, "d1", "pool", "cost/prefill_tflops", "relative_to_full") == pytest.approx(0.25)
    assert value(table, "d1", "pool", "cost/prefill_ms@H100") == pytest.approx(4.0)
    assert value(table, "d1", "pool", "cost/prefill_ms@H100", "relative_to_full") == pytest.approx(0.5)
    assert value(table, "d2", "pool", "cost/kv_cache_mb") == pytest.approx(100.0)
    assert value(table, "d2", "pool", "cost/decode_ms@H100") == pytest.approx(50.0)
    # measured once per model, joined under every dataset; n is the timed repeats
    for dataset in ("d1", "d2"):
        assert value(table, dataset, "pool", "measured/prefill_ms") == 5.0
        assert value(table, dataset, "pool", "measured/prefill_ms", "relative_to_full") == 0.25
        assert value(table, dataset, "pool", "measured/prefill_ms", "n") == 5
        assert value(table, dataset, "pool", "measured/reduce_fraction_of_full_prefill") == 0.025
        assert value(table, dataset, "full", "measured/e2e_ms_per_sample") == 40.0
    assert "random" not in set(table["method"])
    assert value(table, "d1", "pool", "accuracy", "relative_to_full") == 0.75


def test_efficiency_summary_and_markdown(study):
    files, measured = study
    table = tidy(files, measured)
    summary = efficiency_summary(table)
    assert summary.select("method", "budget").rows() == [("full", 576), ("pool", 64)]
    pool = summary.row(1, named=True)
    assert pool["prefill_tflops_vs_full"] == pytest.approx(0.25) and pool["speedup_measured"] == 4.0
    assert pool["prefill_ms_predicted"] == pytest.approx(4.0) and pool["visual_tokens_layer_avg"] == 64.0
    text = efficiency_markdown(summary, table, measured)
    assert "| pool | 64 | 64.0 | 2 | 0.250 | 4 | 5 | 4.00× | 2.5% |" in text
    assert "Test CPU" in text and "H100" in text and "average over the decoder layers" in text


def test_efficiency_without_measurement(study):
    files, _ = study
    table = tidy(files)
    assert not table["metric"].str.starts_with("measured/").any()
    summary = efficiency_summary(table)
    assert summary["prefill_ms_measured"].null_count() == 2
    assert "| pool | 64 | 64.0 | 2 | 0.250 | 4 | – | – | – |" in efficiency_markdown(summary, table, {})


def test_headline_is_the_scorers_first_metric_not_the_alphabetically_first(tmp_path):
    """MME reports `total` first; sorting by metric name used to make `accuracy` (or a cost) the headline."""
    cost = run_cost(1.0, 1.0, 1.0, 576.0, 1.0, 1.0)
    files = [
        write_run(tmp_path / "a.json", "mme", "full", 576, {"total": 150.0, "accuracy": 60.0}, cost),
        write_run(tmp_path / "b.json", "mme", "pool", 64, {"total": 120.0, "accuracy": 50.0}, cost),
    ]
    table = tidy(files)
    assert headline_metric(table, "mme") == "total"
    assert "### mme — m — total" in markdown(table)


def test_pareto_frontier_of_a_hand_made_set():
    #         F     A    B    C    D    E    G
    costs = [0.5, 1.0, 2.0, 2.0, 3.0, 4.0, 4.0]
    values = [10, 50, 40, 60, 60, 70, 65]
    # B is beaten by A (cheaper and better), D by C (cheaper, as good), G by E (as cheap, better)
    assert pareto_frontier(costs, values) == [0, 1, 3, 5]
    assert pareto_frontier([1.0, 1.0], [5, 5]) == [0]  # identical points: the first stays
    assert pareto_frontier([], []) == []


def test_pareto_plot_is_written(study, tmp_path):
    files, measured = study
    pareto_plot(tidy(files, measured), tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_in_llm_measured_record_joins_without_a_reduce_time(tmp_path):
    """vtc.bench times an in-LLM method's selection inside prefill: its reduce figures are null, the rest joins."""
    cost = run_cost(1.0, 1.0, 1.0, 64.0, 1.0, 1.0)
    files = [
        write_run(tmp_path / "full.json", "d", "full", 576, {"accuracy": 80.0}, cost),
        write_run(tmp_path / "fastv.json", "d", "fastv", 64, {"accuracy": 70.0}, cost),
    ]
    measured = {"m": {**MEASURED, "records": [bench_record("full", 576, 20.0, 0.2, 0.01),
                                              bench_record("fastv", 64, 8.0, None, None)]}}  # fmt: skip
    table = tidy(files, measured)
    assert value(table, "d", "fastv", "measured/prefill_ms") == 8.0
    assert value(table, "d", "fastv", "measured/prefill_ms", "relative_to_full") == 0.4
    fastv = table.filter(pl.col("method") == "fastv")["metric"].to_list()
    assert "measured/reduce_ms" not in fastv and "measured/reduce_fraction_of_full_prefill" not in fastv
    text = efficiency_markdown(efficiency_summary(table), table, measured)
    assert "| fastv | 64 | 64.0 | 1 | 1.000 | 1 | 8 | 2.50× | – |" in text


def test_in_llm_cells_give_both_token_counts(tmp_path):
    files = [write_result(tmp_path / "a.json", "full", 576, 576, 80.0, 100.0)]
    for name, budget, per_layer in (("fastv", 64, [576, 576, 64, 64]), ("fastv_avg", 320, [576, 576, 64, 64])):
        result = {
            "model": "m", "dataset": "d", "method": name, "budget": budget, "n": 10, "num_visual_tokens": [576],
            "metrics": {"accuracy": 70.0},
            "in_llm": {"visual_tokens_per_layer": per_layer, "visual_tokens_layer_avg": sum(per_layer) / 4},
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
        files.append(tmp_path / f"{name}.json")
    table = tidy(files)
    fastv = table.filter((pl.col("method") == "fastv") & (pl.col("metric") == "accuracy"))
    assert (fastv["tokens"][0], fastv["kept"][0]) == (320, 64)
    text = markdown(table)
    # budget_mode kept: the column is the kept count; by layer average: the column is the average
    assert "| fastv | – | 70.0 (kept 64, avg 320) |" in text
    assert "| fastv_avg | 70.0 (kept 64, avg 320) | – |" in text
