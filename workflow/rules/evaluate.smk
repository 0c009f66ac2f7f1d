rule evaluate:
    input:
        dataset="resources/datasets/{dataset}.parquet",
        reduced="results/reduce/{model}/{dataset}/{method}/{budget}",
        model=get_model_files,
    output:
        predictions="results/evaluate/{model}/{dataset}/{method}/{budget}/predictions.jsonl",
        metrics="results/evaluate/{model}/{dataset}/{method}/{budget}/metrics.json",
    log:
        "logs/evaluate/{model}/{dataset}/{method}/{budget}.log",
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
        settings=config["evaluate"],
        run_info=run_info,
        wandb=wandb_settings,
    script:
        "../scripts/evaluate.py"
