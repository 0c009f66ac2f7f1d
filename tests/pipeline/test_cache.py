import json

import pytest
import torch

from vtc.cache import CacheMismatch, Store, StoreWriter, pack_bool, unpack_bool
from vtc.pipeline.encode import encode_dataset, expected_encode_key
from vtc.pipeline.prepare import prepare_dataset
from vtc.pipeline.reduce import read_reduced, reduce_dataset, reduce_in_encoder


def test_pack_roundtrip():
    mask = torch.rand(3, 5, 576) > 0.7
    assert torch.equal(unpack_bool(pack_bool(mask), 576), mask)


def test_store_without_manifest_is_incomplete(tmp_path):
    writer = StoreWriter(tmp_path / "store", {"a": 1})
    writer.add(["x"], {"t": torch.zeros(1, 2)})
    with pytest.raises(FileNotFoundError, match="incomplete"):
        Store.open(tmp_path / "store")
    writer.close()
    assert Store.open(tmp_path / "store", {"a": 1}).image_ids == ["x"]


def test_mismatching_key_names_what_differs(tmp_path):
    StoreWriter(tmp_path / "s", {"model": "m", "dtype": "float16"}).close()
    with pytest.raises(CacheMismatch, match="differs in: dtype"):
        Store.open(tmp_path / "s", {"model": "m", "dtype": "float32"})


@pytest.fixture
def encoded(tiny_model_dir, shapes_dir, tmp_path):
    model_cfg = {"path": str(tiny_model_dir), "revision": None, "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa"}
    dataset = tmp_path / "shapes.parquet"
    prepare_dataset("shapes", str(shapes_dir), "test", None, None, 0, dataset)
    manifest = encode_dataset(dataset, model_cfg, tmp_path / "encode", batch_size=4, shard_size=5)
    return model_cfg, manifest, tmp_path


def test_encoder_runs_once_per_image(encoded):
    _, manifest, _ = encoded
    assert manifest["vision_tower_images"] == manifest["num_images"] == len(set(Store.open(encoded[2] / "encode").image_ids))
    assert [len(s["image_ids"]) for s in manifest["shards"]][0] == 5


def test_encode_key_covers_model_dtype_and_preprocessing(encoded):
    model_cfg, _, tmp_path = encoded
    assert Store.open(tmp_path / "encode", expected_encode_key(model_cfg))
    with pytest.raises(CacheMismatch, match="dtype"):
        Store.open(tmp_path / "encode", expected_encode_key({**model_cfg, "dtype": "bfloat16"}))
    with pytest.raises(CacheMismatch, match="image_aspect_ratio"):
        Store.open(tmp_path / "encode", expected_encode_key({**model_cfg, "image_aspect_ratio": "pad"}))
    key = expected_encode_key(model_cfg)
    key["image_processor"]["crop_size"] = {"height": 336, "width": 336}
    with pytest.raises(CacheMismatch, match="image_processor"):
        reduce_dataset(tmp_path / "encode", key, "random", 8, {}, 0, tmp_path / "r")


def test_reduce_writes_k_tokens_and_sources(encoded):
    model_cfg, _, tmp_path = encoded
    manifest = reduce_dataset(tmp_path / "encode", expected_encode_key(model_cfg), "pool", 64, {}, 0, tmp_path / "r")
    assert manifest["num_tokens"] == [64] and manifest["tokens_per_image"] == {"mean": 64, "min": 64, "max": 64}
    _, images = next(read_reduced(Store.open(tmp_path / "r")))
    for image in images:
        assert image.tokens.shape == (64, 128) and image.sources.shape == (64, 576) and image.views == [(24, 24, 64)]
        assert image.sources.sum() == 576  # 3×3 windows partition the grid
    json.dumps(manifest)


def test_encoder_level_method_reduces_from_the_images(tiny_model_dir, shapes_dir, tmp_path):
    """ToMe runs the vision tower itself: no encode cache, the same reduced store, a key with the encode key."""
    from vtc.methods import get_method
    from vtc.models import llava
    from vtc.pipeline.encode import dataset_images

    model_cfg = {"path": str(tiny_model_dir), "revision": None, "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa"}
    dataset = tmp_path / "shapes.parquet"
    prepare_dataset("shapes", str(shapes_dir), "test", None, None, 0, dataset)
    manifest = reduce_in_encoder(dataset, model_cfg, "tome", 128, {}, tmp_path / "tome", batch_size=4, shard_size=5)
    rows, first_row = dataset_images(dataset)
    assert manifest["num_tokens"] == [128]
    assert manifest["num_images"] == manifest["vision_tower_images"] == len(first_row) == 11
    assert manifest["key"]["encode"] == expected_encode_key(model_cfg)
    store = Store.open(tmp_path / "tome", manifest["key"])
    assert store.image_ids == list(first_row) and [len(s["image_ids"]) for s in manifest["shards"]] == [5, 5, 1]
    image_ids, images = next(read_reduced(store))
    tokens, sources = torch.stack([i.tokens for i in images]), torch.stack([i.sources for i in images])
    assert tokens.shape == (5, 128, 128) and sources.shape == (5, 128, 576)
    assert torch.equal(sources.sum(dim=1), torch.ones(5, 576, dtype=torch.long))  # merged groups partition the grid
    # what the job wrote for an image is what the method gives on that image's pixels
    model, processor = llava.load_from_config(model_cfg)
    pixel_values = processor.image_processor([rows[first_row[image_ids[2]]]["image"].convert("RGB")], return_tensors="pt")
    alone = get_method("tome")(model, pixel_values["pixel_values"], 128)
    torch.testing.assert_close(tokens[2], alone.tokens[0], rtol=0, atol=1e-5)
    assert torch.equal(sources[2], alone.sources[0])

    # `positions` is the pipeline's: in the key, never passed to the method (which would raise TypeError)
    hparams = {"prop_attn": False, "positions": "original"}
    other = reduce_in_encoder(dataset, model_cfg, "tome", 128, hparams, tmp_path / "plain", batch_size=4, shard_size=5)
    assert other["key"]["hparams"]["positions"] == "original"
    assert other["fingerprint"] != manifest["fingerprint"]
    with pytest.raises(CacheMismatch, match="differs in: hparams"):
        Store.open(tmp_path / "tome", other["key"])
    with pytest.raises(ValueError, match="reduce it with reduce_in_encoder"):
        reduce_dataset(tmp_path / "tome", None, "tome", 128, {}, 0, tmp_path / "r")
    with pytest.raises(ValueError, match="reduce it with reduce_dataset"):
        reduce_in_encoder(dataset, model_cfg, "pool", 128, {}, tmp_path / "r")


def test_pad_keeps_the_whole_image_on_a_mean_colour_square():
    from PIL import Image

    from vtc.pipeline.encode import model_images
    from vtc.models.tiny import build_processor

    processor = build_processor()
    wide = Image.new("RGB", (8, 4), (255, 0, 0))
    [padded] = model_images([wide], processor, "pad")
    mean = tuple(round(255 * m) for m in processor.image_processor.image_mean)  # CLIP's mean: (122, 116, 104)
    assert padded.size == (8, 8)
    assert [padded.getpixel((0, y)) for y in range(8)] == [mean] * 2 + [(255, 0, 0)] * 4 + [mean] * 2
    [cropped] = model_images([wide], processor, "crop")
    assert cropped.size == (8, 4)  # left to the processor's resize and centre crop
