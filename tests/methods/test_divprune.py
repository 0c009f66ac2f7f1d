from __future__ import annotations

import math

import pytest
import torch

from vtc.methods import get_method
from vtc.methods.divprune import max_min_diverse

divprune = get_method("divprune")


def kept(reduced, b=0):
    return reduced.sources[b].int().argmax(dim=-1).tolist()


def at_angles(degrees, norms=None):
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    points = torch.stack([radians.cos(), radians.sin()], dim=-1)
    if norms is not None:
        points = points * torch.tensor(norms, dtype=torch.float64)[:, None]
    return points.float()[None]


# Patches 0..5 at 5°, 90°, 180°, 0°, 95°, 10°. Under 1 − cosine (monotone in the angle between them):
# - nearest-neighbour angles: 5° → 5, 90° → 5, 180° → 85, 0° → 5, 95° → 5, 10° → 5: the first pick is 180°;
# - farthest from {180°}: 0° (180° away);
# - farthest from {180°, 0°}: 90° (90 from both) beats 95° (85 from 180°) and the 5°, 10° near 0°;
# - then 10° (10 from 0°) beats 5° (5 from 0°) and 95° (5 from 90°).
ANGLES = [5.0, 90.0, 180.0, 0.0, 95.0, 10.0]


def test_picks_the_obviously_diverse_points_in_order(make_tokens):
    # Norms vary wildly: cosine ignores them.
    tokens = make_tokens(projected=at_angles(ANGLES, norms=[1, 50, 0.1, 7, 1, 3]), grid=(2, 3))
    assert kept(divprune(tokens, 3, order="selection")) == [2, 3, 1]
    assert kept(divprune(tokens, 4, order="selection")) == [2, 3, 1, 5]
    spatial = divprune(tokens, 3)
    assert kept(spatial) == [1, 2, 3]
    assert torch.equal(spatial.tokens[0], tokens.projected[0, [1, 2, 3]])


def test_first_pick_is_the_point_whose_nearest_neighbour_is_farthest(make_tokens):
    # 0° and 180° are each other's opposites, but each has a close twin (2°, 178°); 60°'s nearest is 58° away.
    tokens = make_tokens(projected=at_angles([0.0, 2.0, 60.0, 178.0, 180.0, 1.0]), grid=(2, 3))
    assert kept(divprune(tokens, 1)) == [2]


def test_duplicates_still_give_distinct_tokens(make_tokens):
    projected = torch.tensor([[[1.0, 0.0]] * 4])
    reduced = divprune(make_tokens(projected=projected, grid=(2, 2)), 3, order="selection")
    # Every distance is 0: picks go by lowest index, never twice.
    assert kept(reduced) == [0, 1, 2]


def test_each_image_uses_its_own_points(make_tokens):
    first = at_angles(ANGLES)
    second = at_angles([ANGLES[i] for i in [3, 4, 5, 0, 1, 2]])  # the same points, patches rotated by 3
    tokens = make_tokens(projected=torch.cat([first, second]), grid=(2, 3))
    reduced = divprune(tokens, 3, order="selection")
    assert kept(reduced, 0) == [2, 3, 1]
    assert kept(reduced, 1) == [5, 0, 4]


def test_max_min_on_a_line():
    # Points 0, 1, 3, 7, 8 on a line (distance |x − y|): nearest-neighbour distances 1 1 2 1 1 → first 3;
    # then 8 (5 away), then 0 (3 away), then 1 and 7 tie at 1 → 1 (lower index).
    x = torch.tensor([0.0, 1.0, 3.0, 7.0, 8.0])
    distances = (x[:, None] - x[None, :]).abs()[None]
    assert max_min_diverse(distances, 5).tolist() == [[2, 4, 0, 1, 3]]


def test_unknown_order_is_rejected(make_tokens):
    with pytest.raises(ValueError, match="order"):
        divprune(make_tokens(1, (2, 2)), 2, order="score")
