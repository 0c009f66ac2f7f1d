import json
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.path.insert(0, str(Path(snakemake.scriptdir).parents[1] / "src"))

import torch

from vtc.pipeline.evaluate import evaluate

torch.set_num_threads(snakemake.threads)
result = evaluate(
    dataset=Path(snakemake.input.dataset),
    benchmark_name=snakemake.params.benchmark,
    reduced=Path(snakemake.input.reduced),
    model_cfg=snakemake.params.model,
    batch_size=snakemake.params.settings["batch_size"],
    predictions_path=Path(snakemake.output.predictions),
    metrics_path=Path(snakemake.output.metrics),
    run_info=snakemake.params.run_info,
    wandb_settings=snakemake.params.wandb,
)
print(json.dumps(result["metrics"]), file=sys.stderr)
