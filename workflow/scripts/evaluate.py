import json
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

from vtc.pipeline.evaluate import evaluate

result = evaluate(
    dataset=Path(snakemake.input.dataset),
    benchmark_name=snakemake.params.benchmark,
    reduced=Path(snakemake.input.reduced),
    prediction_shards=[Path(p) for p in snakemake.input.predictions],
    stats_files=[Path(p) for p in snakemake.input.stats],
    predictions_path=Path(snakemake.output.predictions),
    metrics_path=Path(snakemake.output.metrics),
    run_info=snakemake.params.run_info,
    model_cfg=snakemake.params.model,
    wandb_settings=snakemake.params.wandb,
    device_preset=snakemake.params.device_preset,
)
print(json.dumps(result["metrics"]), file=sys.stderr)
