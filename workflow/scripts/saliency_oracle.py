import json
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

import torch

from vtc.saliency import oracle_accuracy

torch.set_num_threads(snakemake.threads)
result = oracle_accuracy(
    shard_paths=[Path(p) for p in snakemake.input.shards],
    dataset=Path(snakemake.input.dataset),
    benchmark_name=snakemake.params.benchmark,
    encoded=Path(snakemake.input.encoded),
    model_cfg=snakemake.params.model,
    prune_layers=snakemake.params.layers,
    budgets=snakemake.params.budgets,
    batch_size=snakemake.params.batch_size,
    out=Path(snakemake.output[0]),
)
print(json.dumps({"n": result["n"], "seconds": result["seconds"]}), file=sys.stderr)
