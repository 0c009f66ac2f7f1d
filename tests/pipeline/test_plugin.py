"""The README's worked example of a method registered from outside the repository runs through `reduce`."""

import re
from pathlib import Path

import torch

from vtc.cache import Store
from vtc.pipeline.encode import encode_dataset, shard_views
from vtc.pipeline.prepare import prepare_dataset
from vtc.pipeline.reduce import read_reduced, reduce_dataset

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_plugin_example_runs_through_reduce(tmp_path, tiny_model_dir, shapes_dir):
    code = re.search(r"```python\n(# my_methods/keep_corners.py\n.*?)```", README.read_text(), re.S).group(1)
    plugin = tmp_path / "keep_corners.py"
    plugin.write_text(code)
    model_cfg = {"path": str(tiny_model_dir), "revision": None, "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa"}
    prepare_dataset("shapes", str(shapes_dir), "test", None, 6, 0, tmp_path / "d.parquet")
    encode_dataset(tmp_path / "d.parquet", model_cfg, tmp_path / "encode", batch_size=8, shard_size=8)
    reduce_dataset(tmp_path / "encode", None, "keep_corners", 4, {"margin": 0}, 0, tmp_path / "r", plugins=[str(plugin)])
    _, [image, *_] = next(read_reduced(Store.open(tmp_path / "r")))
    kept = image.sources.nonzero()[:, 1].tolist()
    assert kept == [0, 23, 552, 575]  # the four corners of the 24×24 grid
    ids, encoded = next(Store.open(tmp_path / "encode").shards())
    assert torch.equal(image.tokens, shard_views(encoded, len(ids))[0][0].projected[kept])
