import sys
from pathlib import Path

sys.stderr = open(snakemake.log[0], "w")
# resolve(): scriptdir is workflow/rules/../scripts, whose parents[1] would be workflow/rules
sys.path.insert(0, str(Path(snakemake.scriptdir).resolve().parents[1] / "src"))
print(f"vtc: {__import__('vtc').__file__}", file=sys.stderr)

import torch

from vtc.methods import import_plugins, method_stage, parse_budget
from vtc.pipeline.encode import expected_encode_key
from vtc.pipeline.reduce import reduce_dataset, reduce_in_encoder, reduce_questions

torch.set_num_threads(snakemake.threads)
import_plugins(snakemake.params.plugins)
common = dict(
    method=snakemake.params.method,
    budget=parse_budget(snakemake.wildcards.budget),
    hparams=snakemake.params.hparams,
    out=Path(snakemake.output[0]),
    plugins=snakemake.params.plugins,
)
if method_stage(snakemake.params.method) == "encoder":
    manifest = reduce_in_encoder(
        dataset=Path(snakemake.input.dataset),
        model_cfg=snakemake.params.model,
        batch_size=snakemake.params.settings["batch_size"],
        shard_size=snakemake.params.settings["shard_size"],
        **common,
    )
elif method_stage(snakemake.params.method) == "question":
    manifest = reduce_questions(
        encoded=Path(snakemake.input.encoded),
        expected_key=expected_encode_key(snakemake.params.model),
        dataset=Path(snakemake.input.dataset),
        model_cfg=snakemake.params.model,
        seed=snakemake.params.seed,
        batch_size=snakemake.params.settings["batch_size"],
        **common,
    )
else:
    manifest = reduce_dataset(
        encoded=Path(snakemake.input.encoded),
        expected_key=expected_encode_key(snakemake.params.model),
        seed=snakemake.params.seed,
        batch_size=snakemake.params.settings["batch_size"],
        **common,
    )
print(f"{manifest['num_images']} images -> {manifest['num_tokens']} tokens", file=sys.stderr)
