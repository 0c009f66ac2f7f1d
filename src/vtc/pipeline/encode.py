"""`encode`: run the vision tower and projector once per image and cache what the methods need."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from vtc.benchmarks import read_common_parquet
from vtc.cache import FORMAT_VERSION, StoreWriter
from vtc.models import llava


def encode_key(model_cfg: dict, processor, model_config) -> dict:
    """Everything the cached tensors depend on; a store with another key is never reused.

    Round-tripped through JSON so it compares equal to the copy read back from a manifest.
    """
    key = {
        "format_version": FORMAT_VERSION,
        "model": model_cfg["path"],
        "revision": model_cfg.get("revision"),
        "dtype": model_cfg["dtype"],
        "vision_feature_layer": model_config.vision_feature_layer,
        "vision_feature_select_strategy": model_config.vision_feature_select_strategy,
        "image_processor": processor.image_processor.to_dict(),
        "image_aspect_ratio": model_cfg.get("image_aspect_ratio", "crop"),
    }
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def expected_encode_key(model_cfg: dict) -> dict:
    """The key an up-to-date cache for this model must have; reads config and processor, not weights."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(model_cfg["path"], revision=model_cfg.get("revision"))
    processor = AutoProcessor.from_pretrained(model_cfg["path"], revision=model_cfg.get("revision"))
    return encode_key(model_cfg, processor, config)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of `fill`, as LLaVA-1.5's `expand2square`: nothing is cropped."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def model_images(images: list[Image.Image], processor, aspect_ratio: str) -> list[Image.Image]:
    """RGB images as the model's preprocessing expects them (`models.<name>.image_aspect_ratio`)."""
    images = [image.convert("RGB") for image in images]
    if aspect_ratio == "pad":
        fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
        images = [pad_to_square(image, fill) for image in images]
    return images


def image_seed(seed: int, image_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{image_id}".encode()).digest()[:7], "little")


def dataset_images(dataset: Path):
    """The dataset's image column and, per unique image id (first-appearance order), the first row holding it."""
    rows = read_common_parquet(dataset).select_columns(["image_id", "image"])
    first_row: dict[str, int] = {}
    for index, image_id in enumerate(rows["image_id"]):
        first_row.setdefault(image_id, index)
    return rows, first_row


def encode_dataset(dataset: Path, model_cfg: dict, out: Path, batch_size: int, shard_size: int) -> dict:
    model, processor = llava.load_from_config(model_cfg)
    images_seen = 0

    def count_images(module, args, kwargs, output):
        nonlocal images_seen
        images_seen += (args[0] if args else kwargs["pixel_values"]).shape[0]

    model.model.vision_tower.register_forward_hook(count_images, with_kwargs=True)
    rows, first_row = dataset_images(dataset)
    image_ids = list(first_row)
    aspect_ratio = model_cfg.get("image_aspect_ratio", "crop")
    writer = StoreWriter(out, encode_key(model_cfg, processor, model.config), dataset=str(dataset))
    started = time.perf_counter()
    progress = tqdm(total=len(image_ids), desc="encode", unit="img", mininterval=5)
    for shard_start in range(0, len(image_ids), shard_size):
        shard_ids = image_ids[shard_start : shard_start + shard_size]
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(shard_ids), batch_size):
            batch_ids = shard_ids[start : start + batch_size]
            images = model_images([rows[first_row[i]]["image"] for i in batch_ids], processor, aspect_ratio)
            pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            encoded = llava.encode(model, pixel_values)
            for name, tensor in vars(encoded).items():
                parts.setdefault(name, []).append(tensor.cpu())
            progress.update(len(batch_ids))
        writer.add(shard_ids, {name: torch.cat(tensors) for name, tensors in parts.items()})
    progress.close()
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return writer.close(
        num_images=len(image_ids),
        vision_tower_images=images_seen,
        grid=[grid, grid],
        seconds=time.perf_counter() - started,
    )
