"""Sharded safetensors stores with a JSON manifest: the encode cache and the reduced sequences.

A store is a directory of `shard-NNNNN.safetensors` files, each holding tensors stacked over up to
`shard_size` images, and `manifest.json` with the image ids of each shard and a `key` describing
what produced it. Readers check the key before using a store, so a store made under another
configuration (model, revision, feature layer, preprocessing, dtype, method, ...) is never reused.

Each shard's size and sha256 are in the manifest. A reader checks both before it parses a shard, so a damaged or
truncated shard is never read: the reader stops naming the shard and leaves a `DAMAGED.json` note in the store, and
`damaged(path)` (sizes, missing files and that note; no hashing) lets the workflow recompute such a store on its next
run (workflow/rules/common.smk). Stores written before the manifest held hashes are read unchecked.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load, save_file

FORMAT_VERSION = 2  # 2: ragged views (vtc.pipeline.encode.pack_views)


def fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CacheMismatch(RuntimeError):
    pass


class DamagedStore(RuntimeError):
    """A shard whose bytes are not what the manifest recorded (truncated, overwritten, missing)."""


DAMAGED_NOTE = "DAMAGED.json"


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return path.stat().st_size, digest.hexdigest()


def damaged(path: Path | str) -> list[str]:
    """What is wrong with a finished store without reading its shards: missing shards, sizes that differ from the
    manifest, or the note a reader left on finding a shard whose hash differs. [] for a sound store, and for one
    that is absent or unfinished (no manifest), which Snakemake handles itself."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return []
    problems = []
    note = path / DAMAGED_NOTE
    if note.is_file():
        problems.append(note.read_text().strip())
    try:
        shards = json.loads(manifest_path.read_text())["shards"]
    except (ValueError, KeyError) as error:
        return [*problems, f"{manifest_path} cannot be read ({error})"]
    for shard in shards:
        file = path / shard["file"]
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif "bytes" in shard and file.stat().st_size != shard["bytes"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, the manifest recorded {shard['bytes']}")
    return problems


@dataclass
class Store:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path | str, expected_key: dict | None = None) -> "Store":
        path = Path(path)
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"{manifest_path} is missing: the store at {path} is incomplete or absent")
        manifest = json.loads(manifest_path.read_text())
        if expected_key is not None and manifest["key"] != expected_key:
            differences = sorted(
                k for k in set(manifest["key"]) | set(expected_key) if manifest["key"].get(k) != expected_key.get(k)
            )
            raise CacheMismatch(
                f"{path} was made with a different configuration (differs in: {', '.join(differences)}); "
                "delete it or rerun the rule that makes it"
            )
        return cls(path, manifest)

    @property
    def image_ids(self) -> list[str]:
        return [image_id for shard in self.manifest["shards"] for image_id in shard["image_ids"]]

    def shards(self) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        for shard in self.manifest["shards"]:
            yield shard["image_ids"], self.read_shard(shard)

    def read_shard(self, shard: dict) -> dict[str, torch.Tensor]:
        """The tensors of one manifest entry, after checking the file's size and sha256 against the manifest."""
        file = self.path / shard["file"]
        if not file.is_file():
            self._damaged(f"{file} is missing")
        data = file.read_bytes()
        if "sha256" in shard:
            if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
                self._damaged(
                    f"{file} is damaged: {len(data)} bytes with sha256 {hashlib.sha256(data).hexdigest()[:16]}…, the "
                    f"manifest recorded {shard['bytes']} bytes with sha256 {shard['sha256'][:16]}…"
                )
        return load(data)

    def _damaged(self, problem: str):
        """Leaves a note that makes the next run of the workflow recompute this store (see `damaged`), and stops."""
        try:
            (self.path / DAMAGED_NOTE).write_text(problem + "\n")
        except OSError:
            pass  # a read-only store is still reported below
        raise DamagedStore(f"{problem}; the store is not read. Run the same command again: the workflow recomputes it")


class StoreWriter:
    """Writes shards one at a time and the manifest last, so a manifest means a complete store."""

    def __init__(self, path: Path | str, key: dict, **info):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = {"format_version": FORMAT_VERSION, "key": key, "fingerprint": fingerprint(key), **info, "shards": []}

    def add(self, image_ids: list[str], tensors: dict[str, torch.Tensor]) -> None:
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        tmp = self.path / f".{name}.tmp"
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
        size, sha256 = file_digest(tmp)
        os.replace(tmp, self.path / name)
        self.manifest["shards"].append({"file": name, "image_ids": list(image_ids), "bytes": size, "sha256": sha256})

    def close(self, **info) -> dict:
        self.manifest.update(info)
        tmp = self.path / ".manifest.json.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.path / "manifest.json")
        return self.manifest


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """[..., N] bool -> [..., ceil(N/8)] uint8; 8× smaller source maps on disk."""
    import numpy as np

    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1))


def unpack_bool(packed: torch.Tensor, length: int) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=length).astype(bool))
