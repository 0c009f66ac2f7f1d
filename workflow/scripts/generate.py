import json
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

import torch

from vtc.pipeline.evaluate import generate_predictions

torch.set_num_threads(snakemake.threads)
stats = generate_predictions(
    dataset=Path(snakemake.input.dataset),
    benchmark_name=snakemake.params.benchmark,
    reduced=Path(snakemake.input.reduced),
    model_cfg=snakemake.params.model,
    batch_size=snakemake.params.settings["batch_size"],
    shard=int(snakemake.wildcards.shard),
    num_shards=snakemake.params.num_shards,
    predictions_path=Path(snakemake.output.predictions),
    stats_path=Path(snakemake.output.stats),
    plugins=snakemake.params.plugins,
)
print(json.dumps(stats), file=sys.stderr)
