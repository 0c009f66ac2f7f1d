from __future__ import annotations

import pytest
import torch

from vtc.methods import get_method

cls_attention = get_method("cls_attention")


def attention_map(*heads):
    return torch.tensor([heads], dtype=torch.float32)


def kept(reduced):
    return reduced.sources[0].int().argmax(dim=-1).tolist()


def test_keeps_the_patches_with_the_highest_head_mean(make_tokens):
    # Head 0 alone would pick patch 0 first; averaged over heads the ranking is 5 (.45), 2 (.30), 0 (.25), 7 (.20).
    attention = attention_map(
        [0.50, 0.00, 0.20, 0.00, 0.00, 0.30, 0.00, 0.00, 0.00],
        [0.00, 0.10, 0.40, 0.00, 0.00, 0.60, 0.00, 0.40, 0.00],
    )
    tokens = make_tokens(projected=torch.randn(1, 9, 4), cls_attention=attention, grid=(3, 3))
    spatial_order = cls_attention(tokens, 3)
    assert kept(spatial_order) == [0, 2, 5]
    assert torch.equal(spatial_order.tokens[0], tokens.projected[0, [0, 2, 5]])
    assert kept(cls_attention(tokens, 3, order="score")) == [5, 2, 0]
    assert kept(cls_attention(tokens, 4, order="score")) == [5, 2, 0, 7]


def test_ties_go_to_the_lower_index(make_tokens):
    attention = attention_map([0.5, 0.2, 0.5, 0.5], [0.5, 0.2, 0.5, 0.5])
    tokens = make_tokens(projected=torch.randn(1, 4, 2), cls_attention=attention, grid=(2, 2))
    assert kept(cls_attention(tokens, 2)) == [0, 2]
    flat = make_tokens(projected=torch.randn(1, 4, 2), cls_attention=torch.full((1, 3, 4), 0.25), grid=(2, 2))
    assert kept(cls_attention(flat, 3, order="score")) == [0, 1, 2]


def test_each_image_uses_its_own_map(make_tokens):
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.4, 0.3, 0.2, 0.1]]])
    reduced = cls_attention(make_tokens(2, (2, 2), 2, cls_attention=attention), 2)
    assert reduced.sources.int().argmax(dim=-1).tolist() == [[2, 3], [0, 1]]


def test_unknown_order_is_rejected(make_tokens):
    with pytest.raises(ValueError, match="order"):
        cls_attention(make_tokens(1, (2, 2)), 2, order="random")
