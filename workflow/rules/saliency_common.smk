# Helpers of the saliency study's rules (workflow/rules/saliency.smk; docs/saliency.md).
SALIENCY = config["saliency"]


def check_saliency():
    for name in SALIENCY["datasets"]:
        if name not in config["datasets"]:
            raise ValueError(
                f"config key 'saliency.datasets': {name!r} is not a configured dataset; configured: "
                f"{', '.join(DATASETS)}"
            )
    for model_name, model in config["models"].items():
        num_layers = language_model_layers(model) if SALIENCY["datasets"] else None
        own = SALIENCY["grounded_layers"].get(model_name, [])
        for key, layers in {
            "layers": SALIENCY["layers"] or [],
            "picture_layers": SALIENCY["picture_layers"] or [],
            f"grounded_layers.{model_name}": own,
        }.items():
            if num_layers and any(layer >= num_layers for layer in layers):
                raise ValueError(
                    f"config key 'saliency.{key}': {layers} names a layer past the {num_layers} decoder layers "
                    f"(0 … {num_layers - 1}) of model {model_name!r}"
                )
        if num_layers and any(layer > num_layers for layer in SALIENCY["oracle_layers"]):
            raise ValueError(
                f"config key 'saliency.oracle_layers': prune layers must lie in 1 … {num_layers} for model "
                f"{model_name!r}, got {SALIENCY['oracle_layers']}"
            )
    recorded = set(SALIENCY["layers"] or [])
    unrecorded = sorted({k - 1 for k in SALIENCY["oracle_layers"]} - recorded) if recorded else []
    if unrecorded:
        raise ValueError(
            f"config key 'saliency.oracle_layers': the oracle at K reads layer K-1, and layers {unrecorded} "
            "are not in saliency.layers"
        )
    missing = sorted(set(SALIENCY["picture_layers"] or []) - recorded) if recorded else []
    if missing:
        raise ValueError(f"config key 'saliency.picture_layers': layers {missing} are not in saliency.layers")


check_saliency()


def get_saliency_num_shards(wildcards):
    return SALIENCY["shards"] or get_num_shards(wildcards)


def get_saliency_shards(wildcards):
    return expand(
        "results/saliency/{model}/{dataset}/shards/{shard}.safetensors",
        shard=range(get_saliency_num_shards(wildcards)),
        **wildcards,
    )


def picture_budget():
    return SALIENCY["picture_budget"] or min(config["budgets"])


def picture_methods(model):
    """Config entries whose kept patches the pictures show: methods that reduce before the LLM and run at the
    pictures' budget (an in-LLM method's selection depends on the question; the saliency maps show it)."""
    budget = picture_budget()
    return [
        name
        for name in METHODS
        if registered_method(name) != "full"
        and method_stage(registered_method(name)) != "llm"
        and budget in budgets_for(name, model)
    ]


def get_picture_stores(wildcards):
    return {
        name: f"results/reduce/{wildcards.model}/{wildcards.dataset}/{name}/{picture_budget()}"
        for name in picture_methods(wildcards.model)
    }


def get_saliency_tables():
    return [
        f"results/saliency/{model}/{dataset}/saliency.parquet" for model in MODELS for dataset in SALIENCY["datasets"]
    ]


def get_oracle_files():
    if not SALIENCY["oracle_layers"]:
        return []
    return [f"results/saliency/{model}/{dataset}/oracle.json" for model in MODELS for dataset in SALIENCY["datasets"]]


def get_selection_metrics():
    """metrics.json of the saliency_select entries and, at their budgets, of full and the compared methods (cluster,
    random, cls_attention) on the saliency datasets; none without a saliency_select entry."""
    select = [name for name in METHODS if registered_method(name) == "saliency_select"]
    compared = [name for name in METHODS if registered_method(name) in ("full", "cluster", "random", "cls_attention")]
    files = []
    for model in MODELS:
        budgets = {budget for name in select for budget in budgets_for(name, model)}
        runs = [(name, budget) for name in select for budget in budgets_for(name, model)]
        runs += [
            (name, budget)
            for name in compared
            for budget in budgets_for(name, model)
            if budget in budgets or registered_method(name) == "full"
        ]
        files += [
            f"results/evaluate/{model}/{dataset}/{name}/{budget}/metrics.json"
            for dataset in SALIENCY["datasets"]
            for name, budget in runs
            if select
        ]
    return files


def get_saliency_outputs():
    """The study's saliency table and accuracy-vs-layer plot (which need every per model x dataset table)."""
    if not SALIENCY["datasets"]:
        return []
    return [
        f"{TABLES}/saliency.parquet",
        f"{TABLES}/saliency.csv",
        f"{TABLES}/saliency.md",
        f"{PLOTS}/saliency_accuracy_vs_layer.png",
    ]
