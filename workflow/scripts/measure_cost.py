import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.stdout = sys.stderr
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from vtc.bench import describe, table
from vtc.pipeline.efficiency import measure

result = measure(
    model_name=snakemake.wildcards.model,
    model_cfg=snakemake.params.model,
    methods=snakemake.params.methods,
    budgets=snakemake.params.budgets,
    settings=snakemake.params.settings,
    threads=snakemake.threads,
    seed=snakemake.params.seed,
    plugins=snakemake.params.plugins,
    out=Path(snakemake.output[0]),
)
print(describe(result) + "\n\n" + table(result))
