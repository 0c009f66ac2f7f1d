from __future__ import annotations

import math

import pytest
import torch

from vtc.methods import get_method

pool = get_method("pool")


def windows(budget_rows, budget_cols, height, width):
    """The patches of each pooling cell, by adaptive pooling's [floor(i·H/rows), ceil((i+1)·H/rows)) rule."""
    cells = []
    for i in range(budget_rows):
        for j in range(budget_cols):
            rows = range(math.floor(i * height / budget_rows), math.ceil((i + 1) * height / budget_rows))
            cols = range(math.floor(j * width / budget_cols), math.ceil((j + 1) * width / budget_cols))
            cells.append({r * width + c for r in rows for c in cols})
    return cells


def test_constant_per_window_input_gives_the_constants(make_tokens):
    # 64 of 24 × 24: 8 × 8 windows of 3 × 3 patches; patch (r, c) carries its window's number.
    window = torch.tensor([(r // 3) * 8 + c // 3 for r in range(24) for c in range(24)], dtype=torch.float32)
    projected = torch.stack([window, -2 * window], dim=-1)[None]
    reduced = pool(make_tokens(projected=projected, grid=(24, 24)), 64)
    expected = torch.arange(64, dtype=torch.float32)
    torch.testing.assert_close(reduced.tokens[0], torch.stack([expected, -2 * expected], dim=-1))


@pytest.mark.parametrize(("budget", "rows", "cols"), [(64, 8, 8), (128, 8, 16), (192, 12, 16)])
def test_sources_are_the_pooling_windows_in_spatial_order(make_tokens, budget, rows, cols):
    tokens = make_tokens(2, (24, 24), 3)
    reduced = pool(tokens, budget)
    assert reduced.tokens.shape == (2, budget, 3)
    cells = windows(rows, cols, 24, 24)
    for b in range(2):
        assert [set(row.nonzero().flatten().tolist()) for row in reduced.sources[b]] == cells
        means = torch.stack([tokens.projected[b, sorted(cell)].mean(dim=0) for cell in cells])
        torch.testing.assert_close(reduced.tokens[b], means)


def test_overlapping_windows(make_tokens):
    # 4 of 5 × 5: 2 × 2 cells over rows/columns [0, 3) and [2, 5), so the middle row and column are shared.
    projected = torch.arange(25, dtype=torch.float32)[None, :, None]
    reduced = pool(make_tokens(projected=projected, grid=(5, 5)), 4)
    # Cell means of r · 5 + c: rows 0..2 → mean row 1, rows 2..4 → 3; columns likewise.
    torch.testing.assert_close(reduced.tokens[0, :, 0], torch.tensor([6.0, 8.0, 16.0, 18.0]))
    assert reduced.sources[0].sum(dim=-1).tolist() == [9, 9, 9, 9]
    assert reduced.sources[0].sum(dim=0).view(5, 5)[2].tolist() == [2, 2, 4, 2, 2]


def test_budget_without_a_sensible_grid_is_rejected(make_tokens):
    with pytest.raises(ValueError, match="budget = 7 on the 24×24 grid"):
        pool(make_tokens(1, (24, 24), 2), 7)


def test_fit_pools_to_the_largest_target_below_the_budget(make_tokens):
    tokens = make_tokens(2, (6, 8), 3)
    # 14 on 6 × 8: 1 × 14 and 2 × 7 exceed the grid or the aspect bound; 13 is prime; 12 = 3 × 4 has square cells
    fitted = pool(tokens, 14, fit=True)
    assert torch.equal(fitted.tokens, pool(tokens, 12).tokens) and fitted.tokens.shape[1] == 12
    with pytest.raises(ValueError, match="set fit: true"):
        pool(tokens, 14)
