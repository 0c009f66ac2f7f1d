"""Shared loading helpers for the hub benchmarks (not a benchmark; registers nothing).

`load_source` reads a split either from the Hugging Face hub (`datasets.load_dataset(id, name=config,
split=split, revision=revision)`) or, when `source` is a local parquet file or directory, with the
`parquet` builder, so the same loader code reads the real datasets and the test fixtures.

A local directory mirrors the hub repository layout of the lmms-lab datasets:
``<dir>/<config>/<split>-*.parquet`` for datasets with configs, ``<dir>/<split>-*.parquet`` or
``<dir>/data/<split>-*.parquet`` without (``<split>.parquet`` is accepted too).

`to_common` maps a source dataset into `COMMON_FEATURES` without decoding images: image columns are cast
to `Image(decode=False)`, so the encoded bytes are passed through unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import datasets

from vtc.benchmarks import COMMON_FEATURES

# lmms-eval PR #1416 (commit 4be7ee0e, 2026-07-30) moved the image datasets from `lmms-lab/*` to
# `lmms-lab-encoder/*`. Our defaults keep the `lmms-lab/*` ids every paper used; if those repos disappear,
# override `source` (and pin `revision`) in the config, e.g. with `moved_source(default_source)`.
OLD_ORG = "lmms-lab/"
NEW_ORG = "lmms-lab-encoder/"


def moved_source(source: str) -> str:
    """The post-2026-07-30 lmms-eval id of an `lmms-lab/*` dataset (unchanged for anything else)."""
    return NEW_ORG + source[len(OLD_ORG) :] if source.startswith(OLD_ORG) else source


def is_local(source: str) -> bool:
    return Path(source).exists()


def _local_files(root: Path, split: str, config: str | None) -> list[str]:
    if root.is_file():
        return [str(root)]
    bases = ([root / config] if config else []) + [root, root / "data"]
    for base in bases:
        for pattern in (f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet"):
            files = sorted(base.glob(pattern))
            if files:
                return [str(f) for f in files]
    raise FileNotFoundError(f"no parquet for split {split!r} (config {config!r}) under {root}")


def load_source(source: str, split: str, revision: str | None, config: str | None = None) -> datasets.Dataset:
    """One split of a hub dataset (optionally a named config) or of a local parquet mirror."""
    if is_local(source):
        return datasets.load_dataset("parquet", data_files=_local_files(Path(source), split, config), split="train")
    return datasets.load_dataset(source, name=config, split=split, revision=revision)


def _undecoded(feature):
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False) if feature.decode else None
    if isinstance(feature, datasets.List):
        inner = _undecoded(feature.feature)
        return None if inner is None else datasets.List(inner)
    return None


def undecode_images(ds: datasets.Dataset) -> datasets.Dataset:
    """Casts every image (or list-of-image) column to `decode=False`: rows then carry {bytes, path} dicts."""
    for name, feature in ds.features.items():
        new = _undecoded(feature)
        if new is not None:
            ds = ds.cast_column(name, new)
    return ds


def image_value(value) -> dict | None:
    """An image as the {bytes, path} dict the common `Image()` feature stores (PIL images are PNG-encoded)."""
    if value is None:
        return None
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            data = Path(value["path"]).read_bytes()
        return {"bytes": data, "path": None}
    import io

    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def image_digest(image: dict | None) -> str:
    """A content id for datasets without image ids (identical images share it)."""
    if image is None or image.get("bytes") is None:
        return ""
    return hashlib.sha1(image["bytes"]).hexdigest()[:16]


def to_common(
    ds: datasets.Dataset, convert: Callable[[dict, int], dict], desc: str = "normalising"
) -> datasets.Dataset:
    """Maps `convert(row, index) -> common row` over `ds` into `COMMON_FEATURES`, images undecoded."""
    ds = undecode_images(ds)
    return ds.map(convert, with_indices=True, remove_columns=ds.column_names, features=COMMON_FEATURES, desc=desc)


def dumps(meta: dict) -> str:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True)


def meta_of(row: dict) -> dict:
    meta = row.get("meta")
    if meta is None or meta == "":
        return {}
    return json.loads(meta) if isinstance(meta, str) else dict(meta)


def pct(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0
