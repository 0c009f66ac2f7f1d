import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from vtc.saliency import summary

summary(
    table_paths=[Path(p) for p in snakemake.input.tables],
    oracle_paths=[Path(p) for p in snakemake.input.oracle],
    metrics_paths=[Path(p) for p in snakemake.input.metrics],
    out_parquet=Path(snakemake.output.parquet),
    out_csv=Path(snakemake.output.csv),
    out_markdown=Path(snakemake.output.markdown),
    out_plot=Path(snakemake.output.plot),
)
