import json

import polars as pl

from vtc.pipeline.aggregate import markdown, tidy


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


def test_zero_full_value_gives_no_ratio(tmp_path):
    files = [write_result(tmp_path / "a.json", "full", 576, 576, 0.0, 100.0), write_result(tmp_path / "b.json", "pool", 64, 64, 0.0, 90.0)]
    table = tidy(files)
    assert table.filter(pl.col("metric") == "accuracy")["relative_to_full"].null_count() == 2
