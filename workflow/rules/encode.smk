rule encode:
    input:
        dataset="resources/datasets/{dataset}.parquet",
        model=get_model_files,
    output:
        directory("results/encode/{model}/{dataset}"),
    log:
        "logs/encode/{model}/{dataset}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=attempt_scaled(16000),
        runtime=attempt_scaled(240),
        gpu=gpus,
    params:
        model=get_model_config,
        settings=config["encode"],
    script:
        "../scripts/encode.py"
