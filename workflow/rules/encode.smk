rule encode:
    input:
        dataset="resources/datasets/{dataset}.parquet",
        model=get_model_files,
    output:
        directory("results/encode/{model}/{dataset}"),
    log:
        "logs/encode/{model}/{dataset}.log",
    params:
        model=get_model_config,
        settings=config["encode"],
    threads: 2
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=gpus,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/encode.py"
