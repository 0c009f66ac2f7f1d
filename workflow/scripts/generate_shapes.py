import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

from vtc.data.shapes import generate_split, write_parquet

samples = generate_split(snakemake.params.size, snakemake.params.seed, snakemake.wildcards.split)
write_parquet(samples, Path(snakemake.output[0]))
