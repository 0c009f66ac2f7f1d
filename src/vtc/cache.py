"""Sharded safetensors stores with a JSON manifest: the encode cache and the reduced sequences.

A store is a directory of `shard-NNNNN.safetensors` files, each holding tensors stacked over up to
`shard_size` images, and `manifest.json` with the image ids of each shard and a `key` describing
what produced it. Readers check the key before using a store, so a store made under another
configuration (model, revision, feature layer, preprocessing, dtype, method, ...) is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


def fingerprint(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CacheMismatch(RuntimeError):
    pass


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
            yield shard["image_ids"], load_file(self.path / shard["file"])


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
        os.replace(tmp, self.path / name)
        self.manifest["shards"].append({"file": name, "image_ids": list(image_ids)})

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
