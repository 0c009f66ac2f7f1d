import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

from vtc.pipeline.prepare import prepare_dataset

dataset = snakemake.params.dataset
rows = prepare_dataset(
    benchmark=dataset["benchmark"],
    source=dataset["source"],
    split=dataset["split"],
    revision=dataset["revision"],
    limit=dataset["limit"],
    seed=snakemake.params.seed,
    out=Path(snakemake.output[0]),
    on_bad_rows=dataset["on_bad_rows"],
    name=snakemake.wildcards.dataset,
)
print(f"wrote {rows} rows to {snakemake.output[0]}", file=sys.stderr)
