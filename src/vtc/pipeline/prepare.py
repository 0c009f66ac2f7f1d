"""`prepare_dataset`: one configured dataset as local parquet in the common schema."""

from __future__ import annotations

import random
from pathlib import Path

from vtc.benchmarks import get_benchmark, write_common_parquet


def prepare_dataset(
    benchmark: str, source: str, split: str, revision: str | None, limit: int | None, seed: int, out: Path
) -> int:
    """Writes the split (or a seeded subsample of `limit` rows, in dataset order) and returns its size."""
    rows = get_benchmark(benchmark).load(source, split, revision)
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(f"{seed}/{benchmark}/{split}").sample(range(len(rows)), limit))
        rows = rows.select(keep) if hasattr(rows, "select") else [rows[i] for i in keep]
    write_common_parquet(rows, out)
    return len(rows)
