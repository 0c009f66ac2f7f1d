rule generate_shapes:
    output:
        "resources/shapes/{split}.parquet",
    log:
        "logs/generate_shapes/{split}.log",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(4000),
        runtime=attempt_scaled(30),
    params:
        size=get_shapes_split_size,
        seed=config["shapes"]["seed"],
    script:
        "../scripts/generate_shapes.py"


rule prepare_dataset:
    input:
        get_dataset_input,
    output:
        "resources/datasets/{dataset}.parquet",
    log:
        "logs/prepare_dataset/{dataset}.log",
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(120),
    params:
        dataset=get_dataset_config,
        seed=config["seed"],
    script:
        "../scripts/prepare_dataset.py"
