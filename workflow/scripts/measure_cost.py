import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.stdout = sys.stderr
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

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
