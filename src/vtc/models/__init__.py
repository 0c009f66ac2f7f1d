"""Model families, each one module with the same functions (`vtc.models.family`): LLaVA-1.5 (`llava`), LLaVA-NeXT
(`llava_next`), Qwen2.5-VL (`qwen2_5_vl`). The pipeline sees an image as one or more views of visual tokens on a
grid (`EncodedView`), which methods reduce, and hands the model what remains (`ReducedImage`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncodedView:
    """One view of an image whose tokens a method reduces together: its h × w tokens, row-major.

    projected:     [n, D] what the LLM would get for this view (after the projector or patch merger), n = h·w.
    features:      [n, C] vision-tower features the projected tokens come from (behind a 2 × 2 merger: the mean of the
                   4 patch features of each merged token).
    cls_attention: [heads, n] the CLS token's attention to each token in the feature layer; for a tower without CLS
                   the family's documented substitute (`PROVIDES["cls_attention"]`), summing to 1 over n per head.
    keys:          [n, C] attention keys of that layer (heads concatenated), pooled like the tokens.
    grid:          (h, w).
    """

    projected: torch.Tensor
    features: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor
    grid: tuple[int, int]


@dataclass
class ReducedImage:
    """What the LLM gets for one image after reduction: its views' reduced tokens, concatenated in view order.

    tokens:  [k, D] in feed order (all of view 0's, then view 1's, ...).
    sources: [k, N] bool over the image's N input tokens (view 0's first), which of them each output token covers.
    views:   per view (h, w, k_v): its grid and how many of the k tokens are its (the k_v sum to k).
    """

    tokens: torch.Tensor
    sources: torch.Tensor
    views: list[tuple[int, int, int]]


# `models.<name>.family` → the module that loads, encodes and generates for that architecture
FAMILIES = {"llava": "vtc.models.llava", "llava_next": "vtc.models.llava_next", "qwen2_5_vl": "vtc.models.qwen2_5_vl"}


def family(model_cfg: dict):
    """The module of a `models.<name>` entry's family (default "llava"): `load_from_config`, `encode_images`,
    `user_turn`, `generate`, `decode`, `attention_implementation`, `encode_key_extras`, `vision_tower`, `PROVIDES`."""
    import importlib

    name = model_cfg.get("family", "llava")
    if name not in FAMILIES:
        raise ValueError(f"config key 'models.*.family': {name!r} is not one of {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
