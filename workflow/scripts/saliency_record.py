import json
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

import torch

from vtc.saliency import record_dataset

torch.set_num_threads(snakemake.threads)
settings = snakemake.params.settings
info = record_dataset(
    dataset=Path(snakemake.input.dataset),
    benchmark_name=snakemake.params.benchmark,
    encoded=Path(snakemake.input.encoded),
    model_cfg=snakemake.params.model,
    layers=settings["layers"],
    batch_size=settings["batch_size"],
    shard=int(snakemake.wildcards.shard),
    num_shards=snakemake.params.num_shards,
    limit=settings["limit"],
    seed=snakemake.params.seed,
    out=Path(snakemake.output[0]),
)
print(json.dumps({k: v for k, v in info.items() if k not in ("ids", "image_ids")}), file=sys.stderr)
