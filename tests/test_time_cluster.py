"""scripts/time_cluster.py, the old-vs-new timing of `cluster` (docs/efficiency.md), on a tiny input so it cannot rot."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "time_cluster.py"


def test_times_old_and_new_cluster_and_compares_their_outputs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("time_cluster", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.load_old(module.OLD_REV)
    except (subprocess.CalledProcessError, FileNotFoundError) as error:  # a shallow clone or no git
        pytest.skip(f"old cluster.py not readable from git: {error}")
    out = tmp_path / "times.json"
    argv = ["--batch-sizes", "1,2", "--budgets", "2,5", "--patches", "36", "--width", "8", "--repeats", "2,1"]
    assert module.main(argv + ["--warmup", "0", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["batch_size"], r["budget"]) for r in results] == [(1, 2), (1, 5), (2, 2), (2, 5)]
    for r in results:
        assert set(r["median_ms"]) == {"old", "new", "new_gram", "new_per_step"}
        assert all(len(times) == (2 if r["batch_size"] == 1 else 1) for times in r["ms"].values())
        assert r["same_outputs_as_old"] == {"new": True, "new_gram": True, "new_per_step": True}
    assert "| 2 | 5 |" in capsys.readouterr().out
