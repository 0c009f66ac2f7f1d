# The saliency study (docs/saliency.md): text-to-image attention per decoder layer, recorded once per model x
# dataset of `saliency.datasets` (sharded like generate), then its volatility, grounding and pictures.
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
        if num_layers and any(layer >= num_layers for layer in SALIENCY["oracle_layers"]):
            raise ValueError(
                f"config key 'saliency.oracle_layers': prune layers must lie in 1 … {num_layers - 1} for model "
                f"{model_name!r}, got {SALIENCY['oracle_layers']}"
            )
    recorded = set(SALIENCY["layers"] or [])
    missing = sorted(set(SALIENCY["picture_layers"] or []) - recorded) if recorded else []
    if missing:
        raise ValueError(f"config key 'saliency.picture_layers': layers {missing} are not in saliency.layers")


check_saliency()


def get_saliency_shards(wildcards):
    return expand(
        "results/saliency/{model}/{dataset}/shards/{shard}.safetensors",
        shard=range(get_num_shards(wildcards)),
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


def get_saliency_outputs():
    return [
        f"results/saliency/{model}/{dataset}/saliency.parquet"
        for model in MODELS
        for dataset in SALIENCY["datasets"]
    ]


rule saliency_record:
    input:
        dataset="resources/datasets/{dataset}.parquet",
        encoded="results/encode/{model}/{dataset}",
        model=get_model_files,
    output:
        "results/saliency/{model}/{dataset}/shards/{shard}.safetensors",
    log:
        "logs/saliency_record/{model}/{dataset}/{shard}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=gpus,
    params:
        model=get_model_config,
        benchmark=get_benchmark_name,
        num_shards=get_num_shards,
        settings=SALIENCY,
        seed=config["seed"],
    script:
        "../scripts/saliency_record.py"


rule saliency_analyze:
    input:
        unpack(get_picture_stores),
        shards=get_saliency_shards,
        dataset="resources/datasets/{dataset}.parquet",
    output:
        parquet="results/saliency/{model}/{dataset}/saliency.parquet",
        csv="results/saliency/{model}/{dataset}/saliency.csv",
        markdown=report(
            "results/saliency/{model}/{dataset}/saliency.md",
            caption="../report/saliency.rst",
            category="Saliency",
            subcategory="{model} / {dataset}",
            labels={"figure": "volatility and grounding table"},
        ),
        heatmap=report(
            "results/saliency/{model}/{dataset}/layer_correlation.png",
            caption="../report/saliency_heatmap.rst",
            category="Saliency",
            subcategory="{model} / {dataset}",
            labels={"figure": "layer x layer rank correlation"},
        ),
        pictures=report(
            directory("results/saliency/{model}/{dataset}/pictures"),
            patterns=["{name}.png"],
            caption="../report/saliency_pictures.rst",
            category="Saliency",
            subcategory="{model} / {dataset}",
            labels={"figure": "{name}"},
        ),
    log:
        "logs/saliency_analyze/{model}/{dataset}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        model=get_model_config,
        settings=SALIENCY,
        grounded=lambda wildcards: SALIENCY["grounded_layers"].get(wildcards.model),
        methods=lambda wildcards: picture_methods(wildcards.model),
        budget=picture_budget(),
        wandb=wandb_settings,
    script:
        "../scripts/saliency_analyze.py"
