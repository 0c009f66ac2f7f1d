import json
import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
sys.stdout = sys.stderr
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

import torch

from vtc.train import train

torch.set_num_threads(snakemake.threads)
settings = snakemake.params.settings
report = train(
    data_dir=Path(snakemake.input.train).parent,
    out_dir=Path(snakemake.output.model).parent,
    steps=settings["steps"],
    batch_size=settings["batch_size"],
    lr=settings["lr"],
    seed=settings["seed"],
    eval_every=settings["eval_every"],
    eval_samples=settings["eval_samples"],
    max_turns=settings["max_turns"],
    vision_steps=settings["vision_steps"],
    vision_batch_size=settings["vision_batch_size"],
    vision_lr=settings["vision_lr"],
)
print(json.dumps(report["test_accuracy"]))
