import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

import torch

from vtc.pipeline.encode import expected_encode_key
from vtc.pipeline.reduce import reduce_dataset

torch.set_num_threads(snakemake.threads)
manifest = reduce_dataset(
    encoded=Path(snakemake.input[0]),
    expected_key=expected_encode_key(snakemake.params.model),
    method=snakemake.wildcards.method,
    budget=int(snakemake.wildcards.budget),
    hparams=snakemake.params.hparams,
    seed=snakemake.params.seed,
    out=Path(snakemake.output[0]),
    batch_size=snakemake.params.settings["batch_size"],
    plugins=snakemake.params.plugins,
)
print(f"{manifest['num_images']} images -> {manifest['num_tokens']} tokens", file=sys.stderr)
