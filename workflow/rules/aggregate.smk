localrules:
    aggregate,


rule aggregate:
    input:
        metrics=get_metrics_files(),
        measured=get_measured_files(),
    output:
        parquet=f"{TABLES}/results.parquet",
        csv=f"{TABLES}/results.csv",
        markdown=report(
            f"{TABLES}/results.md",
            caption="../report/results.rst",
            category="Results",
            labels={"figure": "table"},
        ),
        plot=report(
            f"{PLOTS}/accuracy_vs_tokens.png",
            caption="../report/plot.rst",
            category="Results",
            labels={"figure": "accuracy vs tokens"},
        ),
        pareto=report(
            f"{PLOTS}/pareto.png",
            caption="../report/pareto.rst",
            category="Results",
            labels={"figure": "accuracy vs cost"},
        ),
    log:
        f"logs/aggregate/{config['experiment']}.log",
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
