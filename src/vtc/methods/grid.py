"""Budget checks and patch-grid geometry shared by the methods; nothing here is a registered method.

The grid-based methods (`spatial`, `pool`, and `cluster` with `init="grid"`) turn a budget k into a rows × cols
target on the H × W patch grid with one rule, `factorise`, so that they cover the image the same way.
"""

from __future__ import annotations

from fractions import Fraction

import torch

# The most elongated target cell we accept, as cell height / width or width / height in patches. 2 admits
# 8 × 16 for 128 tokens of a 24 × 24 grid (cells of 3 × 1.5 patches) and rejects a 1 × 7 strip for 7 tokens,
# which would sample a single band of the image.
MAX_CELL_ASPECT = 2


def check_budget(budget: int, num_patches: int) -> None:
    if not 1 <= budget <= num_patches:
        raise ValueError(f"budget must be between 1 and N = {num_patches} patches, got budget = {budget}")


def check_grid(grid: tuple[int, int], num_patches: int) -> None:
    height, width = grid
    if height * width != num_patches:
        raise ValueError(f"grid {height}×{width} does not hold N = {num_patches} patches")


def factorise(budget: int, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The rows × cols == budget target (rows <= H, cols <= W) whose cells are closest to square.

    A cell covers (H / rows) × (W / cols) patches, so the squarest cell is the target whose aspect ratio is
    closest to the grid's. Cells are compared by elongation, max(h/w, w/h); a tie (8 × 16 against 16 × 8 for
    128 on a square grid) goes to fewer rows. Returns None when even the best cell is more than
    MAX_CELL_ASPECT times longer than it is wide.
    """
    height, width = grid
    best: tuple[Fraction, int, int] | None = None
    for rows in range(1, height + 1):
        cols, remainder = divmod(budget, rows)
        if remainder or cols > width:
            continue
        cell = Fraction(height * cols, width * rows)
        elongation = max(cell, 1 / cell)
        if best is None or elongation < best[0]:
            best = (elongation, rows, cols)
    if best is None or best[0] > MAX_CELL_ASPECT:
        return None
    return best[1], best[2]


def grid_indices(budget: int, grid: tuple[int, int]) -> torch.Tensor:
    """[budget] int64 row-major patch indices spread evenly over the grid, ascending.

    With a `factorise` target, the patch at the centre of each cell: row floor((i + 1/2) · H / rows), column
    likewise. Without one, the same rule along the flattened raster order.
    """
    height, width = grid
    factors = factorise(budget, grid)
    if factors is None:
        return _centres(budget, height * width)
    rows, cols = factors
    return (_centres(rows, height)[:, None] * width + _centres(cols, width)[None, :]).flatten()


def pool_windows(rows: int, cols: int, grid: tuple[int, int]) -> torch.Tensor:
    """[rows · cols, H · W] bool, the patches each output cell of `adaptive_avg_pool2d` averages, row-major.

    Windows are [floor(i · H / rows), ceil((i + 1) · H / rows)), as adaptive pooling computes them, so they
    overlap when H is not a multiple of rows.
    """
    height, width = grid
    in_rows, in_cols = _windows(rows, height), _windows(cols, width)
    return (in_rows[:, None, :, None] & in_cols[None, :, None, :]).reshape(rows * cols, height * width)


def _centres(count: int, size: int) -> torch.Tensor:
    # floor((i + 1/2) · size / count) in integers; distinct because count <= size.
    return (2 * torch.arange(count) + 1) * size // (2 * count)


def _windows(count: int, size: int) -> torch.Tensor:
    i = torch.arange(count)[:, None]
    start = i * size // count
    end = -(-(i + 1) * size // count)
    return (torch.arange(size) >= start) & (torch.arange(size) < end)
