"""The embedded `shapes` testbed (see `vtc.data.shapes`): exact-match accuracy, overall and per family."""

from __future__ import annotations

import re
from pathlib import Path

from vtc.benchmarks import Benchmark, accuracy_by_family, read_common_parquet, register_benchmark


def _load(source: str, split: str, revision: str | None):
    path = Path(source) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(
            f"shapes split {split!r} not found at {path}; generate it with `python -m vtc.data.shapes`"
        )
    return read_common_parquet(path)


def normalize(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def score(records: list[dict]) -> dict[str, float]:
    return accuracy_by_family(records, lambda r: normalize(r["prediction"]) in {normalize(a) for a in r["answers"]})


SHAPES = register_benchmark(
    Benchmark(
        name="shapes",
        default_source="resources/shapes",
        default_split="test",
        load=_load,
        prompt=lambda row: row["question"],
        score=score,
        max_new_tokens=4,
        notes="Procedural testbed; answers are single words, scored by exact match after lower-casing.",
    )
)
