import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

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
)
print(f"wrote {rows} rows to {snakemake.output[0]}", file=sys.stderr)
