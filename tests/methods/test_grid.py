from __future__ import annotations

import pytest
import torch

from vtc.methods.grid import factorise, grid_indices, pool_windows


@pytest.mark.parametrize(
    ("budget", "grid", "expected"),
    [
        (64, (24, 24), (8, 8)),
        (128, (24, 24), (8, 16)),  # 16 × 8 is as square; fewer rows wins
        (192, (24, 24), (12, 16)),
        (144, (24, 24), (12, 12)),
        (576, (24, 24), (24, 24)),
        (1, (24, 24), (1, 1)),
        (2, (24, 24), (1, 2)),  # cells 24 × 12, exactly the elongation limit
        (8, (4, 8), (2, 4)),  # cells 2 × 2 on a wide grid
        (7, (24, 24), None),  # only 1 × 7: cells 24 × 3.4
        (3, (24, 24), None),
        (575, (24, 24), None),  # 23 × 25 does not fit
    ],
)
def test_factorise(budget, grid, expected):
    assert factorise(budget, grid) == expected


def test_grid_indices_fall_back_to_raster_centres():
    # floor((i + 1/2) · 576 / 7) for i = 0..6
    assert grid_indices(7, (24, 24)).tolist() == [41, 123, 205, 288, 370, 452, 534]


def test_pool_windows_overlap_like_adaptive_pooling():
    # 5 → 2: windows [0, 3) and [2, 5) (floor(5/2) = 2, ceil(5/2) = 3).
    rows = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    expected = torch.stack([(r[:, None] & c[None, :]).flatten() for r in rows for c in rows])
    assert torch.equal(pool_windows(2, 2, (5, 5)), expected)
