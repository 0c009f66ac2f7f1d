rule generate:
    input:
        dataset="resources/datasets/{dataset}.parquet",
        reduced="results/reduce/{model}/{dataset}/{method}/{budget}",
        model=get_model_files,
    output:
        predictions="results/evaluate/{model}/{dataset}/{method}/{budget}/shards/{shard}.jsonl",
        stats="results/evaluate/{model}/{dataset}/{method}/{budget}/shards/{shard}.json",
    log:
        "logs/generate/{model}/{dataset}/{method}/{budget}/{shard}.log",
    group:
        cluster_group("generate", "model", "dataset", "shard")
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
        num_shards=get_num_shards,
        settings=config["evaluate"],
        plugins=config["plugins"],
    script:
        "../scripts/generate.py"


rule evaluate:
    input:
        dataset="resources/datasets/{dataset}.parquet",
        reduced="results/reduce/{model}/{dataset}/{method}/{budget}",
        predictions=get_prediction_shards,
        stats=get_prediction_stats,
    output:
        predictions="results/evaluate/{model}/{dataset}/{method}/{budget}/predictions.jsonl",
        metrics="results/evaluate/{model}/{dataset}/{method}/{budget}/metrics.json",
    log:
        "logs/evaluate/{model}/{dataset}/{method}/{budget}.log",
    group:
        cluster_group("evaluate", "model", "dataset")
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(30),
    params:
        model=get_model_config,
        benchmark=get_benchmark_name,
        run_info=run_info,
        wandb=wandb_settings,
        device_preset=config["efficiency"]["device_preset"],
    script:
        "../scripts/evaluate.py"
