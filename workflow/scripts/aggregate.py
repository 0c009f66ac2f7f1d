import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

from vtc.pipeline.aggregate import aggregate

table = aggregate(
    metrics_files=[Path(p) for p in snakemake.input.metrics],
    measured_files=[Path(p) for p in snakemake.input.measured],
    out_parquet=Path(snakemake.output.parquet),
    out_csv=Path(snakemake.output.csv),
    out_markdown=Path(snakemake.output.markdown),
    out_plot=Path(snakemake.output.plot),
    out_pareto=Path(snakemake.output.pareto),
    wandb_settings=snakemake.params.wandb,
)
print(f"{len(table)} rows", file=sys.stderr)
