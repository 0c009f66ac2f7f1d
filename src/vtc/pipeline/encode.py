"""`encode`: run the vision tower and projector once per image and cache what the methods need.

An image is one or more views (`vtc.models.EncodedView`: LLaVA-1.5 and Qwen2.5-VL one, LLaVA-NeXT its base view and
its high-resolution view), each a grid of tokens whose size may differ from image to image. A shard stores the views
of its images one after another: `projected` [T, D], `features` [T, C], `keys` [T, C] and `cls_attention` [T, heads]
over the shard's T tokens, and `views` [V, 3] int64 (image index in the shard, h, w) in token order;
`shard_views` reads them back.
"""

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
from vtc.models import EncodedView, family


def encode_key(model_cfg: dict, processor, model_config) -> dict:
    """Everything the cached tensors depend on; a store with another key is never reused.

    Round-tripped through JSON so it compares equal to the copy read back from a manifest.
    """
    key = {
        "format_version": FORMAT_VERSION,
        "model": model_cfg["path"],
        "revision": model_cfg.get("revision"),
        "dtype": model_cfg["dtype"],
        # LLaVA's; Qwen2.5-VL has neither (its projected tokens are the merger's output of the last block)
        "vision_feature_layer": getattr(model_config, "vision_feature_layer", None),
        "vision_feature_select_strategy": getattr(model_config, "vision_feature_select_strategy", None),
        "image_processor": processor.image_processor.to_dict(),
        "image_aspect_ratio": model_cfg.get("image_aspect_ratio", "crop"),
        "family": model_cfg.get("family", "llava"),
        **family(model_cfg).encode_key_extras(model_cfg, processor, model_config),
    }
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def expected_encode_key(model_cfg: dict) -> dict:
    """The key an up-to-date cache for this model must have; reads config and processor, not weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg["path"], revision=model_cfg.get("revision"))
    return encode_key(model_cfg, family(model_cfg).processor_from_config(model_cfg), config)


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
    adapter = family(model_cfg)
    model, processor = adapter.load_from_config(model_cfg)
    tower_calls = images_seen = 0

    def count_calls(module, args, output):
        nonlocal tower_calls
        tower_calls += 1

    adapter.vision_tower(model).register_forward_hook(count_calls)
    rows, first_row = dataset_images(dataset)
    image_ids = list(first_row)
    aspect_ratio = model_cfg.get("image_aspect_ratio", "crop")
    writer = StoreWriter(out, encode_key(model_cfg, processor, model.config), dataset=str(dataset))
    started = time.perf_counter()
    grids, counts = set(), []
    progress = tqdm(total=len(image_ids), desc="encode", unit="img", mininterval=5)
    for shard_start in range(0, len(image_ids), shard_size):
        shard_ids = image_ids[shard_start : shard_start + shard_size]
        encoded: list[list[EncodedView]] = []
        for start in range(0, len(shard_ids), batch_size):
            batch_ids = shard_ids[start : start + batch_size]
            images = model_images([rows[first_row[i]]["image"] for i in batch_ids], processor, aspect_ratio)
            encoded += adapter.encode_images(model, processor, images, model_cfg)
            images_seen += len(images)
            progress.update(len(batch_ids))
        writer.add(shard_ids, pack_views(encoded))
        grids |= {view.grid for views in encoded for view in views}
        counts += [sum(view.projected.shape[0] for view in views) for views in encoded]
    progress.close()
    return writer.close(
        num_images=len(image_ids),
        vision_tower_images=images_seen,  # each unique image once
        vision_tower_calls=tower_calls,
        # one grid for every view (LLaVA-1.5): its (h, w); else None, and each view has its own (`views`)
        grid=list(grids.pop()) if len(grids) == 1 else None,
        tokens_per_image=token_counts(counts)["tokens_per_image"],
        seconds=time.perf_counter() - started,
    )


def token_counts(counts: list[int]) -> dict:
    """A store manifest's token counts: the distinct counts of its images (or questions), and their mean, min, max."""
    spread = {"mean": sum(counts) / max(len(counts), 1), "min": min(counts, default=0), "max": max(counts, default=0)}
    return {"num_tokens": sorted(set(counts)), "tokens_per_image": spread}


def pack_views(encoded: list[list[EncodedView]]) -> dict[str, torch.Tensor]:
    """The views of a shard's images as one store shard (see the module docstring)."""
    views = [(image, view) for image, image_views in enumerate(encoded) for view in image_views]
    return {
        "projected": torch.cat([v.projected.cpu() for _, v in views]),
        "features": torch.cat([v.features.cpu() for _, v in views]),
        "cls_attention": torch.cat([v.cls_attention.cpu().T for _, v in views]),
        "keys": torch.cat([v.keys.cpu() for _, v in views]),
        "views": torch.tensor([[image, *v.grid] for image, v in views], dtype=torch.int64).view(-1, 3),
    }


def shard_views(tensors: dict[str, torch.Tensor], num_images: int) -> list[list[EncodedView]]:
    """The views of each of a shard's `num_images` images, as `pack_views` stored them (tensors in their stored
    dtype)."""
    images: list[list[EncodedView]] = [[] for _ in range(num_images)]
    start = 0
    for image, h, w in tensors["views"].tolist():
        window = slice(start, start + h * w)
        images[image].append(
            EncodedView(
                projected=tensors["projected"][window],
                features=tensors["features"][window],
                cls_attention=tensors["cls_attention"][window].T,
                keys=tensors["keys"][window],
                grid=(h, w),
            )
        )
        start += h * w
    return images
