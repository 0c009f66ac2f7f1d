"""The Snakemake workflow: config validation, lint, and (slow) an end-to-end run with its rerun behaviour."""

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_API_KEY": ""}
    return subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args],
        capture_output=True, text=True, env=env, timeout=900,
    )


def write_config(workdir: Path, model_dir: Path, **overrides) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["models"] = {"tiny": {"path": str(model_dir), "dtype": "float32", "device": "cpu"}}
    config["shapes"] = {"test": 24}
    config["methods"] = {"full": {}, "random": {}, "pool": {}, "cluster": {"iters": 3}}
    config["budgets"] = [64, 16]
    config["datasets"]["shapes"]["shards"] = 2
    config["wandb"] = {"mode": "offline"}
    config.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"methods": {"full": {}, "tome_typo": {}}}, "config key 'methods.tome_typo': unknown method 'tome_typo'; registered: "),
        ({"methods": {"full": {}, "grid": {"method": "clustr"}}}, "config key 'methods.grid.method': unknown method 'clustr'; registered: "),
        ({"budgets": [64, 700]}, "config key 'budgets': 700 is above the 576 visual tokens of model 'tiny'"),
        ({"methods": {"sparsevlm": {}}}, "config key 'methods.sparsevlm.layers': sparsevlm: layers must be increasing"),
        ({"methods": {"s": {"method": "sparsevlm", "layers": [1, 2], "keep": [9, 30]}}}, "config key 'methods.s.keep'"),
        ({"methods": {"fastv": {}}}, "config key 'budgets': method 'fastv' cannot reach a layer average of 64"),
        ({"budgets": ["64"]}, "config key 'budgets.0': '64' is not of type 'number'"),
        ({"methods": {"full": {}, "pool": {"budgets": [600]}}}, "config key 'methods.pool.budgets': 600 is above the 576 visual tokens"),
        ({"methods": {"full": {}, "pool": {"budgets": []}}}, "config key 'methods.pool.budgets': [] should be non-empty"),
        ({"methods": {"full": {}, "cluster": {"iter": 3}}}, "config key 'methods.cluster.iter': method 'cluster' has no hyperparameter 'iter'"),
        ({"methods": {"full": {}, "c": {"method": "cluster", "positions": "gapped"}}}, "config key 'methods.c.positions': 'gapped' is not one of ['original', 'renumbered']"),
        ({"wandb": {"mode": "sometimes"}}, "config key 'wandb.mode': 'sometimes' is not one of"),
        ({"efficiency": {"device_preset": "B200"}}, "config key 'efficiency.device_preset': 'B200' is not one of"),
        ({"efficiency": {"repeats": 0}}, "config key 'efficiency.repeats': 0 is less than the minimum of 1"),
        ({"datasets": {"shapes": {"benchmark": "gqa2", "source": "x", "split": "test"}}}, "'datasets.shapes.benchmark': unknown benchmark 'gqa2'"),
        ({"datasets": {"shapes": {"benchmark": "shapes", "split": "test"}}}, "config key 'datasets.shapes': 'source' is a required property"),
    ],
)
def test_bad_config_stops_before_any_job_and_names_the_key(tmp_path, tiny_model_dir, overrides, message):
    write_config(tmp_path, tiny_model_dir, **overrides)
    result = snakemake(tmp_path, "-n")
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "resources").exists()


def test_lint_and_format_are_clean():
    lint = subprocess.run([str(SNAKEMAKE), "--lint"], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for" not in lint.stdout + lint.stderr
    snakefmt = Path(sys.executable).parent / "snakefmt"
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    check = subprocess.run([str(snakefmt), "--check", *map(str, files)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def planned_jobs(dry_run_stdout: str) -> dict[str, int]:
    """Rule -> job count, from the "Job stats" table of `snakemake -n`."""
    if "Job stats:" not in dry_run_stdout:
        return {}
    jobs = {}
    for line in dry_run_stdout.split("Job stats:")[1].splitlines()[3:]:
        if not line.strip():
            break
        rule, count = line.split()
        jobs[rule] = int(count)
    jobs.pop("total")
    return jobs


def offline_runs(workdir: Path) -> list[dict]:
    wandb = Path(sys.executable).parent / "wandb"
    runs = []
    for run_dir in sorted((workdir / "results" / "wandb" / "wandb").glob("offline-run-*")):
        out = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(run_dir)], capture_output=True, text=True)
        runs.append(json.loads(out.stdout))
    return runs


@pytest.mark.slow
def test_study_end_to_end_then_reruns_only_what_changed(tmp_path, tiny_model_dir):
    write_config(tmp_path, tiny_model_dir)
    result = snakemake(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    table = pl.read_parquet(tmp_path / "results/tables/shapes-demo/results.parquet")
    assert set(table.columns) >= {"dataset", "method", "budget", "metric", "value", "n", "relative_to_full"}
    accuracy = table.filter(pl.col("metric") == "accuracy")
    assert sorted(accuracy.select("method", "budget").rows()) == sorted(
        [("full", 576)] + [(m, b) for m in ("cluster", "pool", "random") for b in (64, 16)]
    )
    recall = table.filter(pl.col("metric") == "target_recall")
    assert recall.filter(pl.col("method") == "full")["relative_to_full"].to_list() == [1.0]
    assert recall.filter(pl.col("method") == "pool")["relative_to_full"].to_list() == [1.0, 1.0]  # windows cover all
    assert (tmp_path / "results/plots/shapes-demo/accuracy_vs_tokens.png").stat().st_size > 1000
    assert "| pool |" in (tmp_path / "results/tables/shapes-demo/results.md").read_text()

    # The encoder ran once, on every image; no evaluate job ran it again.
    manifest = json.loads((tmp_path / "results/encode/tiny/shapes/manifest.json").read_text())
    assert manifest["vision_tower_images"] == manifest["num_images"] > 0
    for metrics in (tmp_path / "results/evaluate").rglob("metrics.json"):
        result = json.loads(metrics.read_text())
        assert result["vision_tower_calls"] == 0
        assert result["num_visual_tokens"] == [result["budget"]]
    assert len(list((tmp_path / "logs/encode").rglob("*.log"))) == 1

    runs = offline_runs(tmp_path)
    evaluate_runs = [r for r in runs if r["name"].startswith("tiny/shapes/")]
    assert len(evaluate_runs) == 7 and all(r["state"] == "finished" for r in runs)
    full = next(r for r in evaluate_runs if r["name"] == "tiny/shapes/full/576")
    assert full["config"]["method"] == "full" and "version/transformers" in full["config"]
    assert full["summary"]["accuracy"] == accuracy.filter(pl.col("method") == "full")["value"][0]
    assert any(r["name"] == "results" and "results" in r["summary"] for r in runs)

    assert "Nothing to be done" in snakemake(tmp_path, "-n").stdout
    report = snakemake(tmp_path, "--report", "report.html")
    assert report.returncode == 0 and "accuracy_vs_tokens" in (tmp_path / "report.html").read_text()

    (tmp_path / "results/evaluate/tiny/shapes/random/16/metrics.json").unlink()
    assert planned_jobs(snakemake(tmp_path, "-n").stdout) == {"evaluate": 1, "aggregate": 1, "all": 1}


def paper_config_on_fixtures(model_dir: Path) -> dict:
    """configs/paper.yaml with the tiny model, the offline fixtures and two methods at one budget."""
    config = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    config["models"] = {"tiny": {"path": str(model_dir), "dtype": "float32", "device": "cpu"}}
    for name, dataset in config["datasets"].items():
        fixture = {"textvqa_ocr": "textvqa"}.get(dataset["benchmark"], dataset["benchmark"])
        dataset["source"] = str(REPO / "tests" / "fixtures" / fixture)
        dataset["shards"] = 1
    # Every benchmark's loader, prompt and scorer through the whole DAG; methods are covered elsewhere.
    config["methods"] = {"full": {}}
    config["wandb"] = {"mode": "offline"}
    # its saliency layers are LLaVA-1.5-7B's (32), past the tiny model's 4; tests/test_saliency.py covers the study
    config.pop("saliency", None)
    return config


def test_measure_cost_runs_once_per_model_unless_switched_off(tmp_path, tiny_model_dir):
    write_config(tmp_path / "on", tiny_model_dir)
    jobs = planned_jobs(snakemake(tmp_path / "on", "-n").stdout)
    assert jobs["measure_cost"] == 1 and jobs["aggregate"] == 1
    write_config(tmp_path / "off", tiny_model_dir, efficiency={"measure": False})
    jobs = planned_jobs(snakemake(tmp_path / "off", "-n").stdout)
    assert "measure_cost" not in jobs and jobs["aggregate"] == 1


def test_encoder_level_method_reduces_from_the_dataset_not_the_encode_cache(tmp_path, tiny_model_dir):
    write_config(tmp_path, tiny_model_dir, methods={"tome": {}}, budgets=[192], efficiency={"measure": False})
    plan = snakemake(tmp_path, "-n", "-p", "results/reduce/tiny/shapes/tome/192")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert planned_jobs(plan.stdout) == {"generate_shapes": 1, "prepare_dataset": 1, "reduce": 1}
    reduce_job = plan.stdout.split("rule reduce:")[1]
    assert "input: resources/datasets/shapes.parquet" in reduce_job and "model.safetensors" in reduce_job
    assert "threads: 2" in reduce_job


def test_an_entry_can_run_a_registered_method_under_its_own_name(tmp_path, tiny_model_dir):
    methods = {"full": {}, "cluster": {"iters": 2}, "cluster_grid": {"method": "cluster", "init": "grid", "iters": 1}}
    write_config(tmp_path, tiny_model_dir, methods=methods, budgets=[16], shapes={"test": 8}, efficiency={"measure": False})
    run = snakemake(tmp_path, "results/reduce/tiny/shapes/cluster_grid/16", "results/reduce/tiny/shapes/cluster/16")
    assert run.returncode == 0, run.stderr[-2000:]
    keys = {name: json.loads((tmp_path / f"results/reduce/tiny/shapes/{name}/16/manifest.json").read_text())["key"] for name in ("cluster", "cluster_grid")}
    # every hyperparameter is in the key, defaults written out, so that a changed default is a changed key
    defaults = {"space": "projected", "iters": 3, "init": "kmeans++", "distance": "l2", "aggregate": "mean", "positions": "renumbered"}
    assert (keys["cluster_grid"]["method"], keys["cluster_grid"]["hparams"]) == ("cluster", {**defaults, "init": "grid", "iters": 1})
    assert (keys["cluster"]["method"], keys["cluster"]["hparams"]) == ("cluster", {**defaults, "iters": 2})


def test_an_entry_with_its_own_budgets_runs_only_those(tmp_path, tiny_model_dir):
    methods = {"full": {}, "random": {}, "pool": {"budgets": [16]}}
    write_config(tmp_path, tiny_model_dir, methods=methods, budgets=[64, 16], efficiency={"measure": False})
    plan = snakemake(tmp_path, "-n")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert planned_jobs(plan.stdout)["evaluate"] == 1 + 2 + 1  # full once, random at 64 and 16, pool at 16
    assert "results/evaluate/tiny/shapes/pool/16/metrics.json" in plan.stdout
    assert "results/evaluate/tiny/shapes/pool/64/" not in plan.stdout


def test_paper_preset_plans_the_whole_study(tmp_path):
    plan = snakemake(tmp_path, "--configfile", str(REPO / "configs" / "paper.yaml"), "-n")
    assert plan.returncode == 0, plan.stderr[-2000:]
    jobs = planned_jobs(plan.stdout)
    methods = len(yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())["methods"])
    assert jobs["encode"] == 10 and jobs["evaluate"] == 10 * ((methods - 1) * 3 + 1)


@pytest.mark.parametrize("preset", ["qwen2.5-vl", "llava-next"])
def test_model_family_presets_plan_the_nine_benchmarks(tmp_path, preset):
    config = yaml.safe_load((REPO / "configs" / f"{preset}.yaml").read_text())
    plan = snakemake(tmp_path, "--configfile", str(REPO / "configs" / f"{preset}.yaml"), "-n")
    assert plan.returncode == 0, plan.stderr[-2000:]
    jobs = planned_jobs(plan.stdout)
    budgets = config["budgets"]
    assert all(isinstance(b, float) and 0 < b < 1 for b in budgets)  # shares of each image's tokens
    assert jobs["encode"] == len(config["datasets"]) == 9
    runs = sum(len((entry or {}).get("budgets", budgets)) for name, entry in config["methods"].items() if name != "full")
    assert jobs["evaluate"] == 9 * (runs + 1)
    [model] = config["models"]
    assert f"results/evaluate/{model}/gqa/full/1.0/metrics.json" in plan.stdout  # full: every token, ratio 1.0
    assert f"results/evaluate/{model}/gqa/cluster/{budgets[-1]}/metrics.json" in plan.stdout
    assert "measure_cost" not in jobs  # vtc.bench times LLaVA-1.5


@pytest.mark.slow
def test_paper_preset_runs_end_to_end_on_fixtures(tmp_path, tiny_model_dir):
    config_file = tmp_path / "paper.yaml"
    config_file.write_text(yaml.safe_dump(paper_config_on_fixtures(tiny_model_dir)))
    result = snakemake(tmp_path, "--configfile", str(config_file))
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = yaml.safe_load(config_file.read_text())["experiment"]
    table = pl.read_parquet(tmp_path / f"results/tables/{experiment}/results.parquet")
    assert set(table["dataset"]) == set(yaml.safe_load(config_file.read_text())["datasets"])
    assert {"f1_mean", "total", "accuracy"} <= set(table["metric"])
