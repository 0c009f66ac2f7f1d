"""Benchmarks: where the samples come from, how the model is prompted, how answers are scored.

Every benchmark is normalised by `prepare_dataset` into one local parquet schema (`COMMON_FEATURES`):

    id        unique sample id            image_id  images shared by several questions are encoded once
    image     the image                   question  the question as the dataset states it
    answers   reference answer(s)         family    question type / subtask, for per-family metrics
    meta      JSON string: anything else the prompt or the scorer needs (options, OCR tokens, ...)

A `Benchmark` then turns a normalised row into the user text that follows the image (`prompt`) and
scores the model's answers (`score`). Register one with `@register_benchmark`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Iterable

import datasets

# The lmms-eval release whose task code the scorers reproduce (tests/benchmarks/test_lmms_eval_parity.py proves it
# on generated predictions); every evaluate run records it.
LMMS_EVAL_VERSION = "0.7.3"

COMMON_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image_id": datasets.Value("string"),
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "family": datasets.Value("string"),
        "meta": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class Benchmark:
    """How one benchmark is read, prompted and scored.

    load:      (source, split, revision) -> iterable of rows in the common schema; `source` is a hub id
               or a local path, so the same code reads the hub and the test fixtures.
    prompt:    normalised row -> the text that follows the image in the user turn.
    score:     records (normalised row fields + "prediction") -> {metric: value}; "accuracy"-like
               headline first.
    limit_whole_images: a `limit` subsample keeps all the questions of the images it draws, for a scorer that
               scores per image (MME's acc+ needs both questions of an image, or it reports NaN).
    """

    name: str
    default_source: str | None
    default_split: str
    load: Callable[[str, str, str | None], Iterable[dict]]
    prompt: Callable[[dict], str]
    score: Callable[[list[dict]], dict[str, float]]
    max_new_tokens: int = 16
    notes: str = ""
    options: dict = field(default_factory=dict)
    limit_whole_images: bool = False


_REGISTRY: dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in _REGISTRY:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    _import_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown benchmark {name!r}; registered benchmarks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available_benchmarks() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def _import_builtin() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def write_common_parquet(rows: Iterable[dict], path) -> None:
    """Writes rows in the common schema; atomic, so a crashed job never leaves a complete-looking file."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(rows, datasets.Dataset):
        # Written from the arrow storage: images keep their original bytes. Iterating would decode them and
        # re-encode on write (lossy for JPEG: every COCO/TextVQA image would change).
        dataset = rows if rows.features == COMMON_FEATURES else rows.cast(COMMON_FEATURES)
    else:
        dataset = datasets.Dataset.from_list(list(rows), features=COMMON_FEATURES)
    dataset.to_parquet(str(tmp))
    tmp.rename(path)


def accuracy_by_family(records: list[dict], is_correct: Callable[[dict], bool]) -> dict[str, float]:
    """Accuracy in percent over all records ("accuracy"), then per family ("accuracy/<family>")."""
    by_family: dict[str, list[bool]] = {}
    for record in records:
        by_family.setdefault(record["family"], []).append(is_correct(record))
    hits = [hit for family in by_family.values() for hit in family]
    metrics = {"accuracy": 100.0 * sum(hits) / len(hits) if hits else 0.0}
    metrics |= {f"accuracy/{family}": 100.0 * sum(h) / len(h) for family, h in sorted(by_family.items())}
    return metrics


def read_common_parquet(path) -> datasets.Dataset:
    return datasets.load_dataset("parquet", data_files=str(path), split="train").cast(COMMON_FEATURES)
