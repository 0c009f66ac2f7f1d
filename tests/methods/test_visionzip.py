from __future__ import annotations

import dataclasses

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.visionzip import default_contextual

visionzip = get_method("visionzip")


def covered(reduced, b=0):
    return [row.nonzero().flatten().tolist() for row in reduced.sources[b]]


def two_head_keys(metric: torch.Tensor) -> torch.Tensor:
    """[N, 2] head-mean keys → [1, N, 4] keys of 2 heads, m + v and m − v: only the head mean carries m."""
    noise = 5 * torch.randn(metric.shape, generator=torch.Generator().manual_seed(0))
    return torch.cat([metric + noise, metric - noise], dim=-1)[None]


def grid_example(make_tokens):
    # 4 × 4 grid, 2 heads. Summed over heads, patches 10 (.5), 5 (.4) and 0 (.3) lead; neither head alone ranks
    # them so (head 0 puts 0 first, head 1 puts 5 first). Every other patch has .01 per head.
    attention = torch.full((1, 2, 16), 0.01)
    attention[0, 0, [0, 5, 10]] = torch.tensor([0.3, 0.0, 0.2])
    attention[0, 1, [0, 5, 10]] = torch.tensor([0.0, 0.4, 0.3])
    # Head-mean key directions of the 13 remaining patches: A = (1, 0), B = (0, 1), C = (-1, -1).
    a, b, c = [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]
    metric = torch.tensor([b, a, a, b, c, b, b, a, b, c, a, c, a, b, c, a])  # dominant 0, 5, 10 get any
    tokens = make_tokens(1, (4, 4), 5, cls_attention=attention)
    return dataclasses.replace(tokens, keys=two_head_keys(metric))


def test_dominant_then_seed_plus_mean_contextual_tokens(make_tokens):
    tokens = grid_example(make_tokens)
    reduced = visionzip(tokens, 6, dominant=3)
    # Dominant 0, 5, 10 in spatial order. Remaining (13): 1 2 3 4 6 7 8 9 11 12 13 14 15; step ⌊13 / 3⌋ = 4
    # puts seeds at positions 0, 4, 8: patches 1 (A), 6 (B), 11 (C). Members: A 2 7 12 15, B 3 8 13, C 4 9 14.
    assert covered(reduced) == [[0], [5], [10], [1, 2, 7, 12, 15], [3, 6, 8, 13], [4, 9, 11, 14]]
    p = tokens.projected[0]
    expected = torch.stack(
        [
            p[0],
            p[5],
            p[10],
            p[1] + p[[2, 7, 12, 15]].mean(dim=0),
            p[6] + p[[3, 8, 13]].mean(dim=0),
            p[11] + p[[4, 9, 14]].mean(dim=0),
        ]
    )
    torch.testing.assert_close(reduced.tokens[0], expected)


def test_seed_without_members_is_fed_alone(make_tokens):
    # Dominant: patch 0. Remaining 1 2 3, two seeds at positions 0, 1 (step ⌊3 / 2⌋ = 1): patches 1 and 2.
    # Patch 3's head-mean key matches seed 2's, so seed 1 stays alone.
    attention = torch.tensor([[[0.7, 0.1, 0.1, 0.1]]])
    tokens = make_tokens(projected=torch.eye(4)[None], cls_attention=attention, grid=(2, 2))
    keys = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]])
    reduced = visionzip(dataclasses.replace(tokens, keys=keys), 3, dominant=1)
    assert covered(reduced) == [[0], [1], [2, 3]]
    torch.testing.assert_close(reduced.tokens[0], torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]))


def test_all_dominant_is_cls_attention_top_k(make_tokens):
    tokens = make_tokens(2, (4, 4), 5)
    zipped = visionzip(tokens, 5, dominant=5)
    # Summing over heads ranks the patches as averaging does.
    top = get_method("cls_attention")(tokens, 5)
    assert torch.equal(zipped.sources, top.sources)
    assert torch.equal(zipped.tokens, top.tokens)


def test_all_contextual_partitions_the_image(make_tokens):
    reduced = visionzip(make_tokens(2, (4, 4), 5), 4, dominant=0)
    assert torch.equal(reduced.sources.sum(dim=1), torch.ones(2, 16, dtype=torch.long))
    # Seeds at positions 0 4 8 12 of all 16 patches.
    assert reduced.sources[:, [0, 1, 2, 3], [0, 4, 8, 12]].all()


@pytest.mark.parametrize(("budget", "contextual"), [(64, 10), (128, 20), (192, 30), (576, 90), (4, 1), (1, 0)])
def test_default_split_follows_the_reference_budgets(budget, contextual):
    assert default_contextual(budget) == contextual


def test_default_split_is_used(make_tokens):
    reduced = visionzip(make_tokens(1, (24, 24), 3), 64)
    counts = reduced.sources.sum(dim=-1)[0]
    # 54 dominant single patches, then 10 contextual tokens covering the other 522 patches.
    assert (counts[:54] == 1).all()
    assert counts[54:].sum() == 576 - 54
    assert torch.equal(reduced.sources.sum(dim=1), torch.ones(1, 576, dtype=torch.long))


@pytest.mark.parametrize("dominant", [-1, 5])
def test_dominant_out_of_range_is_rejected(make_tokens, dominant):
    with pytest.raises(ValueError, match="dominant"):
        visionzip(make_tokens(1, (2, 2)), 4, dominant=dominant)


def test_keys_must_split_into_heads(make_tokens):
    tokens = make_tokens(1, (2, 2), heads=4)  # keys have 6 channels
    with pytest.raises(ValueError, match="heads"):
        visionzip(tokens, 2, dominant=1)


@pytest.mark.parametrize("name", ["visionzip"])
def test_bfloat16_inputs_are_computed_in_float32(make_tokens, name):
    tokens = make_tokens(2, (6, 6), 5)
    low = dataclasses.replace(
        tokens, **{f: getattr(tokens, f).bfloat16() for f in ("projected", "features", "cls_attention", "keys")}
    )
    high = dataclasses.replace(
        low, **{f: getattr(low, f).float() for f in ("projected", "features", "cls_attention", "keys")}
    )
    reduced, reference = get_method(name)(low, 9), get_method(name)(high, 9)
    assert reduced.tokens.dtype == torch.bfloat16
    assert torch.equal(reduced.sources, reference.sources)
    assert torch.equal(reduced.tokens, reference.tokens.bfloat16())
