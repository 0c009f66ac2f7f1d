# The saliency study (docs/saliency.md): text-to-image attention per decoder layer, recorded once per model x
# dataset of `saliency.datasets` (sharded like generate), then its volatility, grounding and pictures; helpers in
# saliency_common.smk.


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
        mem_mb=attempt_scaled(16000),
        runtime=attempt_scaled(240),
        gpu=gpus,
    params:
        model=get_model_config,
        benchmark=get_benchmark_name,
        num_shards=get_saliency_num_shards,
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
        "../../envs/saliency.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(60),
    params:
        model=get_model_config,
        settings=SALIENCY,
        grounded=lambda wildcards: SALIENCY["grounded_layers"].get(wildcards.model),
        methods=lambda wildcards: picture_methods(wildcards.model),
        budget=picture_budget(),
        wandb=wandb_settings,
    script:
        "../scripts/saliency_analyze.py"


rule saliency_oracle:
    input:
        shards=get_saliency_shards,
        dataset="resources/datasets/{dataset}.parquet",
        encoded="results/encode/{model}/{dataset}",
        model=get_model_files,
    output:
        "results/saliency/{model}/{dataset}/oracle.json",
    log:
        "logs/saliency_oracle/{model}/{dataset}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=attempt_scaled(16000),
        runtime=attempt_scaled(240),
        gpu=gpus,
    params:
        model=get_model_config,
        benchmark=get_benchmark_name,
        layers=SALIENCY["oracle_layers"],
        budgets=SALIENCY["oracle_budgets"] or config["budgets"],
        batch_size=SALIENCY["batch_size"],
    script:
        "../scripts/saliency_oracle.py"


localrules:
    saliency_summary,


rule saliency_summary:
    input:
        tables=get_saliency_tables(),
        oracle=get_oracle_files(),
        metrics=get_selection_metrics(),
    output:
        parquet=f"{TABLES}/saliency.parquet",
        csv=f"{TABLES}/saliency.csv",
        markdown=report(
            f"{TABLES}/saliency.md",
            caption="../report/saliency.rst",
            category="Saliency",
            labels={"figure": "saliency tables"},
        ),
        plot=report(
            f"{PLOTS}/saliency_accuracy_vs_layer.png",
            caption="../report/saliency_accuracy.rst",
            category="Saliency",
            labels={"figure": "accuracy vs prune layer"},
        ),
    log:
        f"logs/saliency_summary/{config['experiment']}.log",
    conda:
        "../../envs/saliency.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(2000),
        runtime=attempt_scaled(10),
    script:
        "../scripts/saliency_summary.py"
