"""Does `cluster` give the clusters it gave before issue 19, on a real encode cache? And the same in any batch?

For every image of an encode cache (`results/encode/{model}/{dataset}`, as `reduce` reads it: windows of
--batch-size images, seeds from `image_seed(--seed, image id)`), counts the images whose clusters (sources) differ
from the old implementation's as the pipeline ran it (batched): today's code with the path `_seed_from_gram`
chooses, with each seeding path forced, and the old code run on each image alone. Then today's code batched
against today's code on each image alone (clusters and tokens).

    PYTHONPATH=src python scripts/cluster_outputs.py results/encode/vtc-shapes-tiny/shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from time_cluster import OLD_REV, forced, load_old
from vtc.pipeline.encode import image_seed, shard_views
from vtc.pipeline.reduce import view_batch

BATCHED = ("projected", "features", "cls_attention", "keys", "seeds")


def alone(tokens, b):
    return dataclasses.replace(tokens, **{name: getattr(tokens, name)[b : b + 1] for name in BATCHED})


def batches(encoded: Path, batch_size: int, seed: int):
    manifest = json.loads((encoded / "manifest.json").read_text())
    for shard in manifest["shards"]:
        ids = shard["image_ids"]
        views = [image_views[0] for image_views in shard_views(load_file(encoded / shard["file"]), len(ids))]
        for start in range(0, len(ids), batch_size):
            window = slice(start, start + batch_size)
            yield view_batch(views[window], [image_seed(seed, i) for i in ids[window]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("encoded", type=Path, help="an encode cache directory (manifest.json, shard-*.safetensors)")
    p.add_argument("--budgets", default="192,128,64")
    p.add_argument("--spaces", default="projected,features")
    p.add_argument("--batch-size", type=int, default=64, help="reduce's batch size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the study's seed (default %(default)s)")
    p.add_argument("--old-rev", default=OLD_REV)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    old = load_old(args.old_rev).cluster
    rows = {"new": forced(None), "new_gram": forced(True), "new_per_step": forced(False)}
    print("| space | k | images | differ from old (batched): new | new_gram | new_per_step | old alone "
          "| new: batched ≠ alone |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for space in args.spaces.split(","):
        for budget in (int(b) for b in args.budgets.split(",")):
            differ = dict.fromkeys([*rows, "old_alone", "new_batch"], 0)
            images = 0
            for tokens in batches(args.encoded, args.batch_size, args.seed):
                reference = old(tokens, budget, space=space).sources
                images += len(reference)
                outputs = {name: run(tokens, budget, space=space) for name, run in rows.items()}
                for b in range(len(reference)):
                    for name, out in outputs.items():
                        differ[name] += not torch.equal(out.sources[b], reference[b])
                    differ["old_alone"] += not torch.equal(old(alone(tokens, b), budget, space=space).sources[0],
                                                           reference[b])  # fmt: skip
                    single = rows["new"](alone(tokens, b), budget, space=space)
                    differ["new_batch"] += not (torch.equal(single.sources[0], outputs["new"].sources[b])
                                                and torch.equal(single.tokens[0], outputs["new"].tokens[b]))  # fmt: skip
            print(
                f"| {space} | {budget} | {images} | " + " | ".join(str(v) for v in differ.values()) + " |", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
