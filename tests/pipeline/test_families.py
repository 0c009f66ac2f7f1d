"""LLaVA-NeXT and Qwen2.5-VL through the pipeline (prepare → encode → reduce → generate → evaluate) on tiny random
models and images of different sizes, so that images have different token counts."""

import json

import pytest
import torch

from vtc.benchmarks import get_benchmark, read_common_parquet
from vtc.cache import Store
from vtc.models import family
from vtc.pipeline.encode import encode_dataset, expected_encode_key, model_images
from vtc.pipeline.evaluate import evaluate, generate_predictions
from vtc.pipeline.prepare import prepare_dataset
from vtc.pipeline.reduce import image_budget, read_reduced, reduce_dataset, split_budget

FAMILIES = {"qwen2_5_vl": "tiny_qwen_model_dir", "llava_next": "tiny_next_model_dir"}


@pytest.fixture(params=sorted(FAMILIES))
def family_run(request, ragged_shapes_dir, tmp_path):
    """(model config, dataset, encode store) of one family on 12 questions of the ragged shapes split."""
    model_dir = request.getfixturevalue(FAMILIES[request.param])
    model_cfg = {"path": str(model_dir), "revision": None, "dtype": "float32", "device": "cpu",
                 "attn_implementation": "sdpa", "family": request.param}  # fmt: skip
    dataset = tmp_path / "shapes.parquet"
    prepare_dataset("shapes", str(ragged_shapes_dir), "test", None, 12, 0, dataset)
    encode_dataset(dataset, model_cfg, tmp_path / "encode", batch_size=3, shard_size=4)
    return model_cfg, dataset, tmp_path


def run_pipeline(model_cfg, dataset, tmp_path, method, budget, hparams=None):
    key = expected_encode_key(model_cfg)
    out = tmp_path / f"{method}-{budget}"
    manifest = reduce_dataset(tmp_path / "encode", key, method, budget, hparams or {}, 0, out / "reduce")
    shards = [(out / f"{i}.jsonl", out / f"{i}.json") for i in range(2)]
    for shard, (predictions, stats) in enumerate(shards):
        generate_predictions(dataset, "shapes", out / "reduce", model_cfg, 4, shard, 2, predictions, stats)
    run_info = {"model": "tiny", "dataset": "shapes", "method": method, "budget": budget}
    evaluate(
        dataset, "shapes", out / "reduce", [p for p, _ in shards], [s for _, s in shards], out / "p.jsonl",
        out / "m.json", run_info, model_cfg, {"mode": "disabled", "group": "test", "dir": str(tmp_path)}, "H100",
    )  # fmt: skip
    predictions = {r["id"]: r["prediction"] for r in map(json.loads, open(out / "p.jsonl"))}
    return manifest, predictions, json.loads((out / "m.json").read_text())


def test_full_through_the_pipeline_generates_what_the_models_generate_does(family_run):
    model_cfg, dataset, tmp_path = family_run
    manifest, pipeline, metrics = run_pipeline(model_cfg, dataset, tmp_path, "full", 1.0)
    encoded = Store.open(tmp_path / "encode").manifest
    assert encoded["vision_tower_images"] == encoded["num_images"] and encoded["grid"] is None  # ragged grids
    counts = manifest["tokens_per_image"]
    assert counts["min"] < counts["max"], "the images must differ in token count for this test to mean anything"
    assert metrics["vision_tower_calls"] == 0 and metrics["n"] == 12

    adapter = family(model_cfg)
    model, processor = adapter.load_from_config(model_cfg)
    benchmark = get_benchmark("shapes")
    for row in read_common_parquet(dataset):
        [image] = model_images([row["image"]], processor, "crop")
        prompt = adapter.user_turn(processor, benchmark.prompt(row))
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=benchmark.max_new_tokens, do_sample=False)
        plain = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert pipeline[row["id"]] == plain, row["id"]


def test_a_ratio_keeps_that_share_of_each_images_tokens(family_run):
    model_cfg, dataset, tmp_path = family_run
    manifest, _, metrics = run_pipeline(model_cfg, dataset, tmp_path, "random", 0.25)
    store = Store.open(tmp_path / "random-0.25" / "reduce")
    structural = 0
    for _, images in read_reduced(store):
        for image in images:
            sizes = [h * w for h, w, _ in image.views]
            expected = split_budget(image_budget(0.25, sum(sizes)), sizes)
            assert [k for _, _, k in image.views] == expected
            assert image.tokens.shape[0] == sum(expected) == image.sources.shape[0]
            offset = 0
            for (h, w, k), start in zip(image.views, torch.tensor([0, *expected]).cumsum(0).tolist()):
                # each token's sources lie in its own view
                assert image.sources[start : start + k, offset : offset + h * w].any(dim=1).all()
                offset += h * w
    fed = metrics["visual_tokens_fed"]
    assert fed["min"] < fed["max"] and fed["min"] <= fed["mean"] <= fed["max"]
    if model_cfg["family"] == "llava_next":
        structural = 1  # row-end newlines are fed besides the reduced tokens
    assert fed["min"] >= manifest["tokens_per_image"]["min"] + structural
    assert metrics["cost"]["visual_tokens"] == round(fed["mean"])
    assert 0 <= metrics["metrics"]["target_recall"] <= 100


@pytest.mark.parametrize("name", ["llava_next", "qwen2_5_vl"])
def test_methods_a_family_cannot_run_are_refused_before_any_job(name):
    from vtc.config_check import check_method_models

    config = {
        "models": {"m": {"path": "org/model", "family": name}},
        "methods": {"tome": {}, "fastv": {}, "pool": {}},
        "saliency": {"datasets": ["shapes"]},
    }
    problems = "\n".join(check_method_models(config))
    assert "config key 'methods.tome': method 'tome' cannot run on model 'm'" in problems
    assert "methods.pool" not in problems
    assert "config key 'saliency.datasets'" in problems


def applicable_methods(model_cfg) -> dict[str, dict]:
    """Every configured method of the zoo preset (its settings for a 4-layer demo LLM) that the family runs."""
    import yaml

    from vtc.config_check import check_method_models

    zoo = yaml.safe_load(open("configs/shapes-zoo.yaml"))["methods"]
    zoo["pool"] = {"fit": True}  # ratios of ragged grids: the largest rows × cols below the budget
    zoo |= {"prumerge_adaptive": {}, "prumerge_plus_adaptive": {}}
    if model_cfg["family"] == "qwen2_5_vl":  # the zoo's in-LLM settings are for 4 layers; the tiny Qwen's LLM has 2
        one_stage = {"layer": 1, "budget_mode": "kept"}
        zoo |= {"fastv": one_stage, "dart": one_stage, "pyramiddrop": {"layers": [1], "budget_mode": "kept"},
                "sparsevlm": {"layers": [1], "keep": "fit", "budget_mode": "kept"}}  # fmt: skip
    refused = "\n".join(check_method_models({"models": {"m": model_cfg}, "methods": zoo}))
    return {name: entry for name, entry in zoo.items() if f"'methods.{name}'" not in refused and name != "full"}


@pytest.mark.slow
def test_every_method_the_family_runs_goes_through_the_pipeline(family_run):
    """Each method that applies to the family (the README's table), at a ratio, on 12 questions of ragged images."""
    from vtc.methods import method_entry, method_stage
    from vtc.pipeline.reduce import reduce_questions

    model_cfg, dataset, tmp_path = family_run
    methods = applicable_methods(model_cfg)
    assert {"random", "pool", "cluster", "visionzip", "vispruner", "cdpruner"} <= set(methods)
    key = expected_encode_key(model_cfg)
    for name, entry in methods.items():
        method, hparams = method_entry(name, entry)
        out = tmp_path / name
        if method_stage(method) == "question":
            reduce_questions(tmp_path / "encode", key, dataset, model_cfg, method, 0.25, hparams, 0, out / "r")
        else:
            reduce_dataset(tmp_path / "encode", key, method, 0.25, hparams, 0, out / "r")
        # the questions of the first of the cache's 3 shards (4 images): enough to run the method's tokens through the LLM
        stats = generate_predictions(dataset, "shapes", out / "r", model_cfg, 8, 0, 3, out / "p.jsonl", out / "s.json")
        assert stats["n"] > 0 and stats["vision_tower_calls"] == 0, name
        assert all(json.loads(line)["prediction"] is not None for line in open(out / "p.jsonl")), name


@pytest.mark.slow
def test_tiny_qwen_and_llava_next_study_runs_end_to_end(tmp_path, tiny_qwen_model_dir, tiny_next_model_dir,
                                                        ragged_shapes_dir):  # fmt: skip
    """The workflow on both families at once: a ratio and a count budget, an adaptive and an in-LLM method, tables of
    the tokens fed. (Every method a family runs goes through the pipeline in the test above.)"""
    import polars as pl
    from test_workflow import snakemake, write_config

    models = {
        "qwen": {"path": str(tiny_qwen_model_dir), "family": "qwen2_5_vl", "dtype": "float32", "device": "cpu"},
        "next": {"path": str(tiny_next_model_dir), "family": "llava_next", "dtype": "float32", "device": "cpu"},
    }
    write_config(
        tmp_path, tiny_qwen_model_dir, experiment="families", models=models, budgets=[0.25, 8],
        datasets={"ragged": {"benchmark": "shapes", "source": str(ragged_shapes_dir), "split": "test", "limit": 6}},
        methods={"full": {}, "random": {"budgets": [0.25]}, "prumerge_adaptive": {},
                 "fastv": {"layer": 1, "budget_mode": "kept", "budgets": [8]}},
        saliency={"datasets": []},
    )  # fmt: skip
    result = snakemake(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pl.read_parquet(tmp_path / "results/tables/families/results.parquet")
    accuracy = table.filter(pl.col("metric") == "accuracy")
    runs = set(accuracy.select("model", "method", "budget").rows())
    expected = {(m, "full", 1.0) for m in models} | {(m, "prumerge_adaptive", 1.0) for m in models}
    expected |= {(m, "random", 0.25) for m in models} | {(m, "fastv", 8) for m in models}
    assert runs == expected
    ragged = accuracy.filter((pl.col("method") == "random") & (pl.col("budget") == 0.25))
    assert (ragged["tokens_min"] < ragged["tokens_max"]).all()  # images of different token counts
    markdown = (tmp_path / "results/tables/families/results.md").read_text()
    assert "25.0% of tokens" in markdown and "8 tokens" in markdown
    for metrics in (tmp_path / "results/evaluate").rglob("metrics.json"):
        assert json.loads(metrics.read_text())["vision_tower_calls"] == 0
    assert not (tmp_path / "results/efficiency").exists()  # vtc.bench times LLaVA-1.5 only


@pytest.mark.parametrize("method, hparams", [("fastv", {"layer": 1}), ("pyramiddrop", {"layers": [1, 2, 3]})])
def test_in_llm_methods_prune_images_of_different_counts_each_by_its_own_plan(family_run, method, hparams):
    model_cfg, dataset, tmp_path = family_run
    if model_cfg["family"] == "qwen2_5_vl" and method == "pyramiddrop":
        pytest.skip("the tiny Qwen2.5-VL's LLM has 2 layers; this schedule needs 4")
    _, _, metrics = run_pipeline(model_cfg, dataset, tmp_path, method, 0.25, {**hparams, "budget_mode": "kept"})
    in_llm = metrics["in_llm"]
    assert len(in_llm["plans"]) > 1  # one plan per image block length
    counts = {int(count): entry["questions"] for count, entry in in_llm["plans"].items()}
    assert sum(counts.values()) == metrics["n"]
    for count, entry in in_llm["plans"].items():
        assert entry["record"]["visual_tokens_after_pruning"] == image_budget(0.25, int(count))
    expected = sum(entry["record"]["visual_tokens_layer_avg"] * entry["questions"] for entry in in_llm["plans"].values())
    assert in_llm["visual_tokens_layer_avg"] == pytest.approx(expected / metrics["n"])
    assert metrics["visual_tokens_fed"]["mean"] == pytest.approx(in_llm["visual_tokens_layer_avg"])
