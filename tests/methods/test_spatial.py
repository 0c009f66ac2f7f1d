from __future__ import annotations

import dataclasses

import pytest
import torch

from vtc.methods import get_method

spatial = get_method("spatial")

EIGHT = [1, 4, 7, 10, 13, 16, 19, 22]  # floor((i + 1/2) · 3)
TWELVE = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]  # floor((i + 1/2) · 2)
SIXTEEN = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23]  # floor((i + 1/2) · 1.5)


@pytest.mark.parametrize(
    ("budget", "rows", "cols"),
    [(64, EIGHT, EIGHT), (128, EIGHT, SIXTEEN), (192, TWELVE, SIXTEEN)],
)
def test_cell_centres_on_24x24(make_tokens, budget, rows, cols):
    tokens = make_tokens(2, (24, 24), 2)
    reduced = spatial(tokens, budget)
    expected = [r * 24 + c for r in rows for c in cols]
    assert reduced.tokens.shape == (2, budget, 2)
    for b in range(2):
        assert reduced.sources[b].int().argmax(dim=-1).tolist() == expected
        assert torch.equal(reduced.tokens[b], tokens.projected[b, expected])


def test_wide_grid_gets_square_cells(make_tokens):
    reduced = spatial(make_tokens(1, (4, 8), 2), 8)
    # 2 × 4 cells of 2 × 2 patches, centres at rows 1, 3 and columns 1, 3, 5, 7.
    assert reduced.sources[0].int().argmax(dim=-1).tolist() == [9, 11, 13, 15, 25, 27, 29, 31]


def test_unfactorisable_budget_samples_the_raster_evenly(make_tokens):
    reduced = spatial(make_tokens(1, (24, 24), 2), 7)
    assert reduced.sources[0].int().argmax(dim=-1).tolist() == [41, 123, 205, 288, 370, 452, 534]


def test_grid_must_match_the_tokens(make_tokens):
    tokens = make_tokens(1, (4, 4), 2)
    with pytest.raises(ValueError, match="grid"):
        spatial(dataclasses.replace(tokens, grid=(3, 4)), 4)
