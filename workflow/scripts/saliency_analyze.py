import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from vtc.saliency import analyze

stores = {name: Path(snakemake.input[name]) for name in snakemake.params.methods}
table = analyze(
    shard_paths=[Path(p) for p in snakemake.input.shards],
    dataset=Path(snakemake.input.dataset),
    model_cfg=snakemake.params.model,
    settings=snakemake.params.settings,
    grounded=snakemake.params.grounded,
    method_stores=stores,
    budget=snakemake.params.budget,
    out_parquet=Path(snakemake.output.parquet),
    out_csv=Path(snakemake.output.csv),
    out_markdown=Path(snakemake.output.markdown),
    out_heatmap=Path(snakemake.output.heatmap),
    out_pictures=Path(snakemake.output.pictures),
    wandb_settings=snakemake.params.wandb,
    title=f"{snakemake.wildcards.model} / {snakemake.wildcards.dataset}",
)
print(f"{len(table)} rows", file=sys.stderr)
