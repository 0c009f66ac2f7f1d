import os
import sys
from pathlib import Path

# The workflow always uses this checkout's library, whatever environment a job runs in.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from vtc.config_check import check_config, check_files
from vtc.models import family as model_family
from vtc.methods import (
    HparamError,
    entry_budgets,
    keeps_own_count,
    parse_budget,
    method_entry,
    method_stage,
    resolved_hparams,
)

SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"

# Everything knowable about the config, before Snakemake plans a job or deletes an output it would redo: a config
# error never costs an existing result (see vtc.config_check).
check_files(workflow.configfiles)
check_config(config, SCHEMA)

# Per experiment, so that a second study on the same results/ adds its tables instead of replacing them (the
# per-run results below them are shared: the same model, dataset, method and budget are computed once).
TABLES = f"results/tables/{config['experiment']}"
PLOTS = f"results/plots/{config['experiment']}"
MODELS = list(config["models"])
DATASETS = list(config["datasets"])
METHODS = list(config["methods"])


wildcard_constraints:
    model="|".join(MODELS),
    dataset="|".join(DATASETS),
    method="|".join(METHODS),
    budget=r"\d+|0\.\d+|1\.0",
    split="train|validation|test",
    shard=r"\d+",


def budgets_for(method, model):
    """`full` runs once, at the model's token count (the ratio 1.0 for a family whose count varies per image), and so
    does a method that keeps its own count per image (adaptive PruMerge); every other method at each of its budgets
    (the entry's `budgets`, else the study's)."""
    if registered_method(method) == "full":
        return [config["models"][model].get("num_visual_tokens", 1.0)]
    if keeps_own_count(registered_method(method)):  # adaptive: the same result at any budget, so one run, labelled 1.0
        return [1.0]
    return entry_budgets(config["methods"][method], config["budgets"])


def language_model_layers(model):
    """Decoder layers of a `models.<name>` entry's LLM, from its config.json when it is on this machine (a local
    directory or the hub cache), else None."""
    from transformers import AutoConfig

    try:
        loaded = AutoConfig.from_pretrained(model["path"], revision=model.get("revision"), local_files_only=True)
    except OSError:
        return None
    return (getattr(loaded, "text_config", None) or loaded).num_hidden_layers


NOMINAL_TOKENS = 1024


def check_in_llm_plans():
    """Stops on an in-LLM method's setting that cannot run on a model at one of its budgets (e.g. an impossible
    SparseVLM schedule), naming the hyperparameter; a model whose config is not on this machine is left to its
    jobs, which stop with the same message. A family whose count varies per image is checked on an image of
    NOMINAL_TOKENS tokens (whether a ratio is reachable hardly depends on the count)."""
    from vtc.models import inllm
    from vtc.pipeline.reduce import image_budget

    in_llm = [name for name in METHODS if method_stage(registered_method(name)) == "llm"]
    for model_name, model in config["models"].items():
        num_layers = language_model_layers(model) if in_llm else None
        tokens = model.get("num_visual_tokens", NOMINAL_TOKENS)
        for name in in_llm if num_layers else []:
            for budget in budgets_for(name, model_name):
                try:
                    inllm.plan(
                        registered_method(name),
                        image_budget(budget, tokens),
                        method_entry(name, config["methods"][name])[1],
                        num_layers,
                        tokens,
                    )
                except HparamError as error:
                    own_budgets = "budgets" in (config["methods"][name] or {})
                    key = f"methods.{name}.{error.key or 'budgets'}" if error.key or own_budgets else "budgets"
                    raise ValueError(f"config key '{key}': {error} (budget {budget}, model {model_name!r})") from None


def get_metrics_files():
    return [
        f"results/evaluate/{model}/{dataset}/{method}/{budget}/metrics.json"
        for model in MODELS
        for dataset in DATASETS
        for method in METHODS
        for budget in budgets_for(method, model)
    ]


def get_measured_files():
    """One measured-cost benchmark per LLaVA-1.5 model (vtc.bench times that family), unless `efficiency.measure` is
    false."""
    if not config["efficiency"]["measure"]:
        return []
    return [
        f"results/efficiency/{model}/measured.json" for model in MODELS if config["models"][model]["family"] == "llava"
    ]


def get_final_outputs():
    """The tables and plots, and every per-run result: a deleted result is a missing target, remade."""
    return (
        get_metrics_files()
        + get_measured_files()
        + [
            f"{TABLES}/results.parquet",
            f"{TABLES}/results.csv",
            f"{TABLES}/results.md",
            f"{PLOTS}/accuracy_vs_tokens.png",
            f"{PLOTS}/pareto.png",
        ]
        + get_saliency_outputs()  # workflow/rules/saliency.smk
    )


def get_dataset_input(wildcards):
    """The generated testbed for `shapes`; hub datasets are fetched by the job itself."""
    dataset = config["datasets"][wildcards.dataset]
    if dataset["benchmark"] == "shapes" and dataset["source"] == "resources/shapes":
        return [f"resources/shapes/{dataset['split']}.parquet"]
    return []


def get_model_files(wildcards):
    """Local model directories are inputs, so that a retrained model re-encodes; hub ids are not files."""
    path = Path(config["models"][wildcards.model]["path"])
    return [str(path / "config.json"), str(path / "model.safetensors")] if path.is_dir() else []


def registered_method(name):
    """The registered method that config entry `name` runs (see `vtc.methods.method_entry`)."""
    return method_entry(name, config["methods"][name])[0]


def get_registered_method(wildcards):
    return registered_method(wildcards.method)


def get_method_hparams(wildcards):
    """Every hyperparameter, defaults written out: a changed default reruns the results it changes."""
    method, hparams = method_entry(wildcards.method, config["methods"][wildcards.method])
    model = config["models"][wildcards.model]
    positions = model_family(model).PROVIDES["positions"]
    return resolved_hparams(method, hparams, positions)


# here, not with the other checks: it needs `budgets_for` and `registered_method`
check_in_llm_plans()


def recompute_damaged_stores():
    """Marks the encode and reduce stores of this study whose shards are missing, truncated or noted damaged by a
    reader (`vtc.cache.damaged`) as older than their inputs, so that they and what depends on them are recomputed
    before anything reads them (the rerun trigger `mtime`). Only a time stamp changes, so a dry run (-n) shows the
    plan and deletes nothing."""
    from vtc.cache import damaged

    stores = [f"results/encode/{model}/{dataset}" for model in MODELS for dataset in DATASETS]
    stores += [
        f"results/reduce/{model}/{dataset}/{method}/{budget}"
        for model in MODELS
        for dataset in DATASETS
        for method in METHODS
        for budget in budgets_for(method, model)
    ]
    for store in stores:
        problems = damaged(store)
        if problems:
            print(f"{store} is damaged, recomputing it: {'; '.join(problems)}", file=sys.stderr)
            # a directory output's time is its .snakemake_timestamp (the directory's own without one)
            stamp = Path(store) / ".snakemake_timestamp"
            os.utime(stamp if stamp.exists() else store, (0, 0))


recompute_damaged_stores()


def get_reduce_input(wildcards):
    """The encode cache (and the dataset, for a method that reduces per question); for an encoder-level method (ToMe),
    the dataset and the model it runs on instead."""
    if method_stage(registered_method(wildcards.method)) == "encoder":
        return {
            "dataset": f"resources/datasets/{wildcards.dataset}.parquet",
            "model": get_model_files(wildcards),
        }
    encoded = {"encoded": f"results/encode/{wildcards.model}/{wildcards.dataset}"}
    if method_stage(registered_method(wildcards.method)) == "question":  # reduced per question: it reads them
        return {**encoded, "dataset": f"resources/datasets/{wildcards.dataset}.parquet"}
    return encoded


def by_reduce_stage(tokens, encoder):
    """A setting of the reduce jobs, `tokens` for a method of the encode cache, `encoder` for one that runs the
    vision tower itself (like encode: threads, memory, time, GPUs, batch sizes); either may be a function of
    wildcards."""

    def pick(wildcards):
        value = encoder if method_stage(registered_method(wildcards.method)) == "encoder" else tokens
        return value(wildcards) if callable(value) else value

    return pick


def wandb_settings(wildcards=None):
    return {**config["wandb"], "group": config["experiment"], "dir": "results/wandb"}


def gpus(wildcards):
    return config["models"][wildcards.model]["gpus"]


def run_info(wildcards):
    return {
        "experiment": config["experiment"],
        "model": wildcards.model,
        "dataset": wildcards.dataset,
        "method": wildcards.method,
        "registered_method": registered_method(wildcards.method),
        "budget": parse_budget(wildcards.budget),
        "seed": config["seed"],
        "hparams": get_method_hparams(wildcards),
    }


def get_model_config(wildcards):
    return config["models"][wildcards.model]


def get_dataset_config(wildcards):
    return config["datasets"][wildcards.dataset]


def get_benchmark_name(wildcards):
    return config["datasets"][wildcards.dataset]["benchmark"]


def get_shapes_split_size(wildcards):
    return config["shapes"][wildcards.split]


def get_num_shards(wildcards):
    return config["datasets"][wildcards.dataset]["shards"]


def get_prediction_shards(wildcards):
    return expand(
        "results/evaluate/{model}/{dataset}/{method}/{budget}/shards/{shard}.jsonl",
        shard=range(get_num_shards(wildcards)),
        **wildcards,
    )


def get_prediction_stats(wildcards):
    return [path.removesuffix(".jsonl") + ".json" for path in get_prediction_shards(wildcards)]


# Cluster execution (workflow/profiles/slurm). Locally, groups are inactive and attempt is 1.


def attempt_scaled(value):
    """A resource of `value` (a number, or a function of wildcards) times the attempt: the retry of a job killed
    for memory or time (`retries` in a profile) asks for twice as much."""

    def resource(wildcards, attempt):
        return (value(wildcards) if callable(value) else value) * attempt

    return resource


def cluster_group(name, *keys):
    """The `group:` of a rule's jobs: one per value of the wildcards `keys`, e.g. every reduce job of a model and
    dataset. A profile's `group-components: {name: N}` then runs up to N of them in one cluster job (the count is
    looked up under `name`)."""

    def group(wildcards):
        resolved = "-".join([name, *(wildcards[key] for key in keys)])
        workflow.parent_groupids[resolved] = name
        return resolved

    return group


def reduce_group(wildcards):
    """Token-level reduce jobs share a cluster job per model and dataset; an encoder-level one (a GPU job that runs
    the vision tower) stays alone, so that no CPU group asks for a GPU."""
    if method_stage(registered_method(wildcards.method)) == "encoder":
        return None
    return cluster_group("reduce", "model", "dataset")(wildcards)
