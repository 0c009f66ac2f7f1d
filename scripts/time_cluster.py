"""Times `cluster` as it was before issue 19 against today's, interleaved in one process, on the same tokens.

The old implementation is read from git (`git show REV:src/vtc/methods/cluster.py`, by default the commit before
the Gram-matrix seeding) and loaded next to the current one without registering it. Rows: `old`, `new` (the path
`_seed_from_gram` chooses), and `new_gram` / `new_per_step` (each seeding path forced). Every round runs every
row once per (batch size, budget), in the same order, so load drifts hit all rows alike; medians over the rounds.
Each row's outputs are compared with `old`'s (sources and tokens, `torch.equal`).

    PYTHONPATH=src python scripts/time_cluster.py --batch-sizes 1,16 --budgets 192,128,64 --repeats 6,2

prints a markdown table (median wall-clock ms and, in parentheses, the process's CPU ms, which preemption by other
processes inflates less; the 1-minute load average at the start and end of each cell's rounds) and, with --out,
writes every time as JSON. One torch thread by default (--threads), as in docs/efficiency.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types

import torch

import vtc.methods
from vtc.methods import VisualTokens
from vtc.methods import cluster as new_module

OLD_REV = "5f968a9^"  # the parent of "k-means++ seeding takes every distance from one Gram matrix"


def load_old(rev: str) -> types.ModuleType:
    """`src/vtc/methods/cluster.py` at `rev` as a module, its `register_method` made a no-op (the name is taken)."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
    source = subprocess.run(
        ["git", "show", f"{rev}:src/vtc/methods/cluster.py"],
        capture_output=True, text=True, check=True, cwd=root.stdout.strip(),
    ).stdout  # fmt: skip
    module = types.ModuleType("vtc_cluster_old")
    register = vtc.methods.register_method
    vtc.methods.register_method = lambda *args, **kwargs: (lambda function: function)
    try:
        exec(compile(source, f"{rev}:src/vtc/methods/cluster.py", "exec"), module.__dict__)
    finally:
        vtc.methods.register_method = register
    return module


def forced(gram: bool | None):
    """`cluster` with the seeding path forced (None: chosen by `_seed_from_gram`)."""

    def run(tokens, budget, **hparams):
        chooser = new_module._seed_from_gram
        if gram is not None:
            new_module._seed_from_gram = lambda points, k: gram
        try:
            return new_module.cluster(tokens, budget, **hparams)
        finally:
            new_module._seed_from_gram = chooser

    return run


def random_tokens(batch_size: int, num_patches: int, width: int, seed: int) -> VisualTokens:
    g = torch.Generator().manual_seed(seed)
    side = int(num_patches**0.5)
    return VisualTokens(
        projected=torch.randn(batch_size, num_patches, width, generator=g),
        features=torch.randn(batch_size, num_patches, 8, generator=g),
        cls_attention=torch.rand(batch_size, 1, num_patches, generator=g),
        keys=None,
        seeds=torch.arange(batch_size) + seed,
        grid=(side, num_patches // side),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-rev", default=OLD_REV, help="git revision of the old cluster.py (default %(default)s)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--budgets", default="192,128,64")
    p.add_argument("--patches", type=int, default=576)
    p.add_argument("--width", type=int, default=4096, help="projected width (4096: LLaVA-1.5-7B)")
    p.add_argument("--repeats", default="6,2", help="timed rounds per batch size, comma-separated (one for all)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default="old,new,new_gram,new_per_step")
    p.add_argument("--out", help="JSON file for every time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    budgets = [int(k) for k in args.budgets.split(",")]
    repeats = [int(r) for r in args.repeats.split(",")]
    repeats = repeats * len(batch_sizes) if len(repeats) == 1 else repeats
    if len(repeats) != len(batch_sizes):
        p.error("--repeats needs one value or one per batch size")
    old = load_old(args.old_rev)
    functions = {"old": old.cluster, "new": forced(None), "new_gram": forced(True), "new_per_step": forced(False)}
    rows = args.rows.split(",")
    unknown = set(rows) - set(functions)
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)}, allowed {sorted(functions)}")

    results = []
    for batch_size, rounds in zip(batch_sizes, repeats):
        tokens = random_tokens(batch_size, args.patches, args.width, args.seed)
        for budget in budgets:
            times = {row: [] for row in rows}
            cpu_times = {row: [] for row in rows}
            outputs = {}
            load_start = os.getloadavg()[0]
            for round_ in range(-args.warmup, rounds):
                for row in rows:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    reduced = functions[row](tokens, budget)
                    took, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                    if round_ >= 0:
                        times[row].append(took * 1e3)
                        cpu_times[row].append(cpu * 1e3)
                    outputs.setdefault(row, reduced)
            reference = outputs.get("old")
            same = {
                row: torch.equal(out.sources, reference.sources) and torch.equal(out.tokens, reference.tokens)
                for row, out in outputs.items()
                if reference is not None and row != "old"
            }
            cell = {
                "batch_size": batch_size,
                "budget": budget,
                "load_average_1min": [load_start, os.getloadavg()[0]],
                "median_ms": {row: statistics.median(times[row]) for row in rows},
                "median_cpu_ms": {row: statistics.median(cpu_times[row]) for row in rows},
                "ms": times,
                "cpu_ms": cpu_times,
                "same_outputs_as_old": same,
            }
            results.append(cell)
            medians = ", ".join(
                f"{row} {cell['median_ms'][row]:.1f} ({cell['median_cpu_ms'][row]:.1f})" for row in rows
            )
            print(f"batch {batch_size}, k={budget}: {medians} ms (load {load_start:.2f} → {os.getloadavg()[0]:.2f})",
                  flush=True)  # fmt: skip

    print(f"\nms, wall (CPU) median\n\n| batch | k | {' | '.join(rows)} | same outputs as old | load (1 min) |")
    print("|---|---|" + "---|" * (len(rows) + 2))
    for cell in results:
        ms = " | ".join(f"{cell['median_ms'][row]:.1f} ({cell['median_cpu_ms'][row]:.1f})" for row in rows)
        same = ", ".join(f"{row} {'yes' if v else 'NO'}" for row, v in cell["same_outputs_as_old"].items())
        load = "–".join(f"{v:.2f}" for v in cell["load_average_1min"])
        print(f"| {cell['batch_size']} | {cell['budget']} | {ms} | {same} | {load} |")
    if args.out:
        machine = {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"command": " ".join([sys.executable, *sys.argv]), "machine": machine, "args": vars(args),
                       "results": results}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
