localrules:
    aggregate,


rule aggregate:
    input:
        get_metrics_files(),
    output:
        parquet="results/tables/results.parquet",
        csv="results/tables/results.csv",
        markdown=report(
            "results/tables/results.md",
            caption="../report/results.rst",
            category="Results",
            labels={"figure": "table"},
        ),
        plot=report(
            "results/plots/accuracy_vs_tokens.png",
            caption="../report/plot.rst",
            category="Results",
            labels={"figure": "accuracy vs tokens"},
        ),
    log:
        "logs/aggregate.log",
    conda:
        "../../envs/aggregate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        wandb=wandb_settings(),
    script:
        "../scripts/aggregate.py"
