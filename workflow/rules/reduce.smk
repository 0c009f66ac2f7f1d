rule reduce:
    input:
        "results/encode/{model}/{dataset}",
    output:
        directory("results/reduce/{model}/{dataset}/{method}/{budget}"),
    log:
        "logs/reduce/{model}/{dataset}/{method}/{budget}.log",
    conda:
        "../../envs/torch.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        model=get_model_config,
        hparams=get_method_hparams,
        seed=config["seed"],
        plugins=config["plugins"],
        settings=config["reduce"],
    script:
        "../scripts/reduce.py"
