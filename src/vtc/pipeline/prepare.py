"""`prepare_dataset`: one configured dataset as local parquet in the common schema, its rows checked.

A row that cannot be evaluated — an image that is missing, unreadable or over PIL's decompression limit
(`PIL.Image.MAX_IMAGE_PIXELS`), an empty question, no non-empty reference answer — would otherwise crash `encode`
without naming the row, or be scored and counted. With `on_bad_rows: skip` (the default) such rows are left out and
counted: `<out>.rows.json` next to the parquet records how many rows were read, kept and skipped (by reason, with the
first skipped rows' ids), `evaluate` copies it into metrics.json (`dataset_rows`) and `aggregate` adds a
`skipped_rows` metric whose `n` is the rows read. With `on_bad_rows: stop` the job stops at the first bad row,
naming the dataset, the row id and the image id.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import warnings
from pathlib import Path

from vtc.benchmarks import get_benchmark, write_common_parquet

ON_BAD_ROWS = ("skip", "stop")
LISTED = 100  # skipped rows named in the report; the counts cover all


def rows_report_path(dataset: Path) -> Path:
    """Where `prepare_dataset` records the rows it read, kept and skipped for the parquet `dataset`."""
    return Path(dataset).with_suffix(".rows.json")


def subsample(rows, limit: int, rng: random.Random, whole_images: bool) -> list[int]:
    """Indices (ascending) of `limit` rows drawn by `rng`; with `whole_images`, of every question of images drawn in
    a random order until at least `limit` rows are in."""
    if not whole_images:
        return sorted(rng.sample(range(len(rows)), limit))
    image_ids = rows["image_id"] if hasattr(rows, "column_names") else [row["image_id"] for row in rows]
    by_image: dict[str, list[int]] = {}
    for index, image_id in enumerate(image_ids):
        by_image.setdefault(image_id, []).append(index)
    keep: list[int] = []
    for image_id in rng.sample(sorted(by_image), len(by_image)):
        if len(keep) >= limit:
            break
        keep += by_image[image_id]
    return sorted(keep)


def prepare_dataset(
    benchmark: str,
    source: str,
    split: str,
    revision: str | None,
    limit: int | None,
    seed: int,
    out: Path,
    on_bad_rows: str = "skip",
    name: str | None = None,
) -> int:
    """Writes the split (or a seeded subsample of `limit` rows, in dataset order; whole images where the benchmark
    scores per image) without its bad rows, and the rows report; returns the number of rows written."""
    if on_bad_rows not in ON_BAD_ROWS:
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    spec = get_benchmark(benchmark)
    rows = spec.load(source, split, revision)
    if limit is not None and limit < len(rows):
        keep = subsample(rows, limit, random.Random(f"{seed}/{benchmark}/{split}"), spec.limit_whole_images)
        rows = rows.select(keep) if hasattr(rows, "select") else [rows[i] for i in keep]
    label = name or source
    kept, skipped = [], []
    for index, (row_id, image_id, problem) in enumerate(check_rows(rows)):
        if problem is None:
            kept.append(index)
            continue
        if on_bad_rows == "stop":
            raise ValueError(f"dataset {label!r}: row {row_id!r} (image {image_id!r}): {problem}")
        skipped.append({"id": row_id, "image_id": image_id, "reason": problem})
    if skipped:
        rows = rows.select(kept) if hasattr(rows, "select") else [rows[i] for i in kept]
    by_reason: dict[str, int] = {}
    for row in skipped:
        reason = row["reason"].split(":")[0]
        by_reason[reason] = by_reason.get(reason, 0) + 1
    report = {
        "dataset": label,
        "read": len(kept) + len(skipped),
        "kept": len(kept),
        "skipped": len(skipped),
        "skipped_by_reason": by_reason,
        "skipped_rows": skipped[:LISTED],
    }
    report_path = rows_report_path(out)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_name(f".{report_path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, report_path)  # before the parquet: a finished parquet always has its report
    for row in skipped[:LISTED]:
        print(f"skipped row {row['id']!r} (image {row['image_id']!r}): {row['reason']}", file=sys.stderr)
    write_common_parquet(rows, out)
    return len(kept)


def check_rows(rows):
    """(id, image_id, problem or None) per row, in order; each distinct image is opened once."""
    if hasattr(rows, "cast_column"):  # a datasets.Dataset: images as their stored bytes, not decoded
        import datasets

        rows = rows.cast_column("image", datasets.Image(decode=False))
    verdicts: dict = {}
    for row in rows:
        problem = None
        if not str(row.get("question") or "").strip():
            problem = "empty question"
        elif not any(str(answer).strip() for answer in row.get("answers") or []):
            problem = "empty answers: no non-empty reference answer"
        else:
            key = row.get("image_id") or row.get("id")
            if key not in verdicts:
                verdicts[key] = image_problem(row.get("image"))
            problem = verdicts[key]
        yield row.get("id"), row.get("image_id"), problem


def image_problem(image) -> str | None:
    """Why an image (a PIL image, or the {bytes, path} dict of an undecoded `datasets.Image`) cannot be encoded."""
    from PIL import Image

    if image is None:
        return "missing image: the row has none"
    if isinstance(image, Image.Image):
        return _size_problem(image.size)
    data, path = image.get("bytes"), image.get("path")
    if data is None:
        if not path:
            return "missing image: neither bytes nor a path"
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            return f"missing image: {path} cannot be read ({error.strerror})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                problem = _size_problem(opened.size)
                if problem is None:
                    opened.load()
                return problem
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"oversized image: {error}"
    except Exception as error:  # noqa: BLE001 - whatever PIL raises, the image cannot be encoded
        return f"unreadable image: {type(error).__name__}: {error}"


def _size_problem(size: tuple[int, int]) -> str | None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        return f"oversized image: {size[0]}×{size[1]} pixels, over PIL's limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)"
    return None
