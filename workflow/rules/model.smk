# Trains the demo model; the default config uses the committed copy in models/, so this runs only
# when asked for: `snakemake results/demo_model/model.safetensors`.
rule train_demo_model:
    input:
        train="resources/shapes/train.parquet",
        validation="resources/shapes/validation.parquet",
        test="resources/shapes/test.parquet",
    output:
        model="results/demo_model/model.safetensors",
        report="results/demo_model/training_report.json",
    log:
        "logs/train_demo_model.log",
    conda:
        "../../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=attempt_scaled(8000),
        runtime=attempt_scaled(240),
    params:
        settings=config["demo_model"],
    script:
        "../scripts/train_demo_model.py"
