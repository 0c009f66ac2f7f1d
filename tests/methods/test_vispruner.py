from __future__ import annotations

import dataclasses

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.vispruner import remove_duplicates

vispruner = get_method("vispruner")


def kept(reduced, b=0):
    return reduced.sources[b].int().argmax(dim=-1).tolist()


def example(make_tokens):
    # Head-mean attention ranks the 8 patches 5, 2, 0, 7, 1, 6, 3, 4 (neither head alone does).
    mean = torch.tensor([0.6, 0.4, 0.7, 0.2, 0.1, 0.8, 0.3, 0.5])
    noise = torch.tensor([0.5, -0.3, 0.2, 0.1, -0.1, 0.4, -0.2, 0.3])
    attention = torch.stack([mean + noise, mean - noise])[None]
    e = torch.eye(3)
    # Vision features: 7, 6, 4 along e1, e2, e3; 0 repeats 7 and 3 repeats 4 (norms differ: cosine ignores them);
    # 1 points away from all three. 2 and 5 are the important patches, their features do not matter.
    features = torch.stack([2 * e[0], -e.sum(0), e[1] + e[2], 5 * e[2], e[2], e[0] - e[1], e[1], e[0]])[None]
    tokens = make_tokens(projected=torch.randn(1, 8, 4), cls_attention=attention, grid=(2, 4))
    return dataclasses.replace(tokens, features=features)


def test_important_then_duplicates_removed_from_the_rest(make_tokens):
    tokens = example(make_tokens)
    # Budget 6 at ratio 1/3: ⌊6 / 3⌋ = 2 important patches, 5 and 2. The other six in attention order,
    # 0 7 1 6 3 4, leave 4 to keep: one round drops min(8, 6 − 4) = 2 of the even positions 0, 1, 3, compared with
    # the odd ones 7, 6, 4 by their best cosine: 0 → 1 (to 7), 1 → −1/√3, 3 → 1 (to 4). 0 and 3 go.
    reduced = vispruner(tokens, 6, important_ratio=1 / 3)
    assert kept(reduced) == [1, 2, 4, 5, 6, 7]
    assert torch.equal(reduced.tokens[0], tokens.projected[0, [1, 2, 4, 5, 6, 7]])
    # By attention alone the six first would keep duplicates 0 and 7 and drop 4.
    assert kept(vispruner(tokens, 6, important_ratio=1.0)) == [0, 1, 2, 5, 6, 7]
    assert kept(vispruner(tokens, 6, important_ratio=1.0)) == kept(get_method("cls_attention")(tokens, 6))


def test_survivors_of_a_round_go_first_in_the_next():
    # 18 candidates, keep 9. Odd candidates 1 3 … 17 (o0 … o8) at 0° 30° 60° 95° 120° 148° 180° 213° 240°; even ones
    # 1° after the odd one that follows them, except 8 at 300° (60° from the nearest odd one).
    # Round 1 drops min(8, 18 − 9, 9) = 8 evens, all but 8, and orders 8, 1, 3, …, 17. Round 2 drops
    # min(8, 10 − 9, 5) = 1 of the evens 8, 3, 7, 11, 15 by best cosine to the odds 1, 5, 9, 13, 17: 7 (95°, 25° from
    # 120°) goes; 15 (27°), 11 (28°), 3 (30°), 8 (60°) stay in that order, before the odd ones.
    odd = [0.0, 30, 60, 95, 120, 148, 180, 213, 240]
    even = [angle + 1 for angle in odd]
    even[4] = 300.0
    degrees = torch.tensor([angle for pair in zip(even, odd) for angle in pair])
    angles = torch.deg2rad(degrees)
    unit = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    assert remove_duplicates(unit, torch.arange(18)[None], 9).tolist() == [[15, 11, 3, 8, 1, 5, 9, 13, 17]]


def reference_vispruner(features, attention, budget, ratio):
    """The reference's `encode_images` selection for one image, in its own form (argsort, even/odd halves)."""
    important = int(budget * ratio)
    diverse = budget - important
    order = attention.mean(dim=0).argsort(descending=True)
    residual = order[important:]
    unit = features / features.norm(dim=-1, keepdim=True)
    while diverse > 0:
        r = min(8, len(residual) - diverse)
        if r <= 0:
            break
        a, b = residual[::2], residual[1::2]
        best = (unit[a] @ unit[b].T).max(dim=-1).values
        residual = torch.cat([a[best.argsort(descending=True)[r:]], b])
    return sorted(order[:important].tolist() + residual.tolist())


@pytest.mark.parametrize(("budget", "ratio"), [(64, 0.5), (64, 0.75), (128, 0.5), (192, 0.25)])
def test_matches_the_reference_on_llava_sized_inputs(make_tokens, budget, ratio):
    tokens = make_tokens(3, (24, 24), 4, channels=16, generator_seed=budget)
    reduced = vispruner(tokens, budget, important_ratio=ratio)
    for b in range(3):
        assert kept(reduced, b) == reference_vispruner(tokens.features[b], tokens.cls_attention[b], budget, ratio)


@pytest.mark.parametrize("budget", [5, 17, 30])
def test_batch_equals_one_at_a_time_through_several_rounds(make_tokens, one_image, budget):
    tokens = make_tokens(3, (6, 6), 5, channels=4)
    batched = vispruner(tokens, budget, important_ratio=0.25)
    for b in range(3):
        assert torch.equal(batched.sources[b], vispruner(one_image(tokens, b), budget, important_ratio=0.25).sources[0])


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_important_ratio_out_of_range_is_rejected(make_tokens, ratio):
    with pytest.raises(ValueError, match="important_ratio"):
        vispruner(make_tokens(1, (2, 2)), 2, important_ratio=ratio)


def test_nothing_pruned_is_full(make_tokens):
    tokens = make_tokens(2, (4, 4), 3)
    reduced = vispruner(tokens, 16)
    assert torch.equal(reduced.tokens, tokens.projected)
    assert torch.equal(reduced.sources, torch.eye(16, dtype=torch.bool).expand(2, -1, -1))
