import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

from vtc.data.shapes import generate_split, write_parquet

samples = generate_split(snakemake.params.size, snakemake.params.seed, snakemake.wildcards.split)
write_parquet(samples, Path(snakemake.output[0]))
