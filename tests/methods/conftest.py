from __future__ import annotations

import dataclasses

import pytest
import torch

from vtc.methods import VisualTokens

torch.set_num_threads(1)


def _make_tokens(
    batch_size: int = 2,
    grid: tuple[int, int] = (4, 4),
    dim: int = 8,
    *,
    projected: torch.Tensor | None = None,
    cls_attention: torch.Tensor | None = None,
    seeds: list[int] | None = None,
    heads: int = 2,
    channels: int = 6,
    generator_seed: int = 0,
) -> VisualTokens:
    """Random VisualTokens on a grid; any of projected / cls_attention / seeds can be given instead."""
    g = torch.Generator().manual_seed(generator_seed)
    if projected is not None:
        batch_size, _, dim = projected.shape
    num_patches = grid[0] * grid[1]
    if projected is None:
        projected = torch.randn(batch_size, num_patches, dim, generator=g)
    if cls_attention is None:
        cls_attention = torch.rand(batch_size, heads, num_patches, generator=g).softmax(dim=-1)
    return VisualTokens(
        projected=projected,
        features=torch.randn(batch_size, num_patches, channels, generator=g),
        cls_attention=cls_attention,
        keys=torch.randn(batch_size, num_patches, channels, generator=g),
        seeds=torch.tensor(seeds if seeds is not None else [1000 + b for b in range(batch_size)]),
        grid=grid,
    )


@pytest.fixture
def make_tokens():
    """Builds a VisualTokens batch: `make_tokens(batch_size, grid, dim, projected=..., cls_attention=..., seeds=...)`."""
    return _make_tokens


def _one_image(tokens: VisualTokens, b: int) -> VisualTokens:
    batched = ("projected", "features", "cls_attention", "keys", "seeds")
    return dataclasses.replace(tokens, **{name: getattr(tokens, name)[b : b + 1] for name in batched})


@pytest.fixture
def one_image():
    """Image b of a batch alone, as a batch of one: `one_image(tokens, b)`."""
    return _one_image


def _make_view(grid: tuple[int, int], dim: int = 8, *, heads: int = 2, channels: int = 6, seed: int = 0, sharpness=1.0):
    """A random `EncodedView` on `grid`: CLS attention a softmax per head of normal logits times `sharpness` (larger:
    more peaked, so more IQR outliers)."""
    from vtc.models import EncodedView

    g = torch.Generator().manual_seed(seed)
    num_patches = grid[0] * grid[1]
    return EncodedView(
        projected=torch.randn(num_patches, dim, generator=g),
        features=torch.randn(num_patches, channels, generator=g),
        cls_attention=(sharpness * torch.randn(heads, num_patches, generator=g)).softmax(dim=-1),
        keys=torch.randn(num_patches, channels, generator=g),
        grid=grid,
    )


@pytest.fixture
def make_view():
    """Builds a random view: `make_view(grid, dim, heads=..., channels=..., seed=..., sharpness=...)`."""
    return _make_view


CLIP_WORDS = ["how", "many", "circles", "are", "there", "where", "is", "the", "red", "square", "?"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A random CLIP (vision width 6, the `make_tokens` / `make_view` features' width; text tower of 8 positions, so
    long questions split into segments) and a word-level tokenizer, saved as a hub checkpoint is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *CLIP_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, eos_token_id=3),
        vision_config=dict(hidden_size=6, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=4,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
