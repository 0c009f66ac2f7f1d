localrules:
    aggregate,


rule aggregate:
    input:
        metrics=get_metrics_files(),
        measured=get_measured_files(),
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
        pareto=report(
            "results/plots/pareto.png",
            caption="../report/pareto.rst",
            category="Results",
            labels={"figure": "accuracy vs cost"},
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
