import json
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

import torch

from vtc.pipeline.encode import encode_dataset

torch.set_num_threads(snakemake.threads)
manifest = encode_dataset(
    dataset=Path(snakemake.input.dataset),
    model_cfg=snakemake.params.model,
    out=Path(snakemake.output[0]),
    batch_size=snakemake.params.settings["batch_size"],
    shard_size=snakemake.params.settings["shard_size"],
)
print(json.dumps({k: manifest[k] for k in ("num_images", "vision_tower_images", "seconds")}), file=sys.stderr)
