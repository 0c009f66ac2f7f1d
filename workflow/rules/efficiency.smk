# The measured side of the cost (the predicted side is in every evaluate run's metrics.json): vtc.bench
# on each model, for the configured methods and budgets. Timings describe the machine and the load it
# runs under; run it alone (`snakemake --forcerun measure_cost`) for figures to quote.
rule measure_cost:
    input:
        model=get_model_files,
    output:
        "results/efficiency/{model}/measured.json",
    log:
        "logs/measure_cost/{model}.log",
    conda:
        "../../envs/torch.yaml"
    threads: config["efficiency"]["threads"]
    resources:
        mem_mb=attempt_scaled(16000),
        runtime=attempt_scaled(60),
        gpu=gpus,
    params:
        model=get_model_config,
        methods=config["methods"],
        budgets=config["budgets"],
        settings=config["efficiency"],
        seed=config["seed"],
        plugins=config["plugins"],
    script:
        "../scripts/measure_cost.py"
