"""Ragged batches: every method of the encode cache gives each image, whatever its grid and views, what it gets alone.

`vtc.pipeline.reduce.reduce_images` groups the views of one grid and one per-view budget into dense batches; here the
images differ in grid (6 × 8, 5 × 5, 4 × 7, 3 × 3) and two have two views (as LLaVA-NeXT's base and high-resolution
views), with a batch size small enough that batches mix images. Also worked examples of how a budget is counted per
image (`image_budget`) and split over its views (`split_budget`).
"""

from __future__ import annotations

import random

import pytest
import torch

from vtc.methods import available_methods, get_method, keeps_own_count, method_stage
from vtc.pipeline.reduce import image_budget, reduce_images, split_budget

DIM = 128  # the tiny LLaVA's LLM width, for CDPruner's "llm" relevance (its input embeddings against the tokens)
# Per image its views' grids: repeated grids, so that batches hold several images, and two images of two views.
IMAGES = [[(6, 8)], [(5, 5)], [(6, 8)], [(4, 7)], [(3, 3), (6, 8)], [(5, 5), (4, 7)], [(6, 8)], [(5, 5)]]
QUESTIONS = ["how many circles are there ?", "where is the red square ?"]
# A count and a ratio each large and small: 3 gives the two-view images one or two tokens a view.
BUDGETS = [12, 3, 0.3, 0.05]
# Settings that read the grid beyond the defaults.
GRID_SETTINGS = {"cluster": {"init": "grid"}, "cluster_agglomerative": {"connectivity": True}}
# (method, budget) that cannot run on some view of IMAGES, with the error they give instead.
# pool needs its per-view budget to be rows × cols on the view's grid with cells at most 2 times longer than wide:
# 0.3 asks 14 of the 6 × 8 views and 3 asks 3 of them (cells 6 × 8/3 or 2 × 8), neither of which has such a grid.
EXCLUDED = {
    ("pool", 0.3): r"pool needs budget = rows × cols .* budget = 14 on the 6×8 grid has none",
    ("pool", 3): r"pool needs budget = rows × cols .* budget = 3 on the 6×8 grid has none",
}


def ragged_images(make_view):
    return [
        [make_view(grid, DIM, seed=10 * i + v, sharpness=1.0 + i % 4) for v, grid in enumerate(grids)]
        for i, grids in enumerate(IMAGES)
    ]


def method_cases():
    """(method, label) for every method of the encode cache: "tokens" ones with their defaults (and the settings of
    GRID_SETTINGS), "question" ones (CDPruner) with each relevance."""
    cases = []
    for name in available_methods():
        stage = method_stage(name)
        if stage == "tokens":
            cases.append((name, "default"))
            if name in GRID_SETTINGS:
                cases.append((name, "grid"))
        elif stage == "question":
            cases += [(name, "clip"), (name, "llm")]
    return cases


def test_every_method_of_the_encode_cache_is_covered():
    names = {name for name, _ in method_cases()}
    assert names == {name for name in available_methods() if method_stage(name) in ("tokens", "question")}
    assert {"full", "pool", "prumerge_adaptive", "cdpruner"} <= names
    assert {name for name, _ in EXCLUDED} <= names


def settings(request, name: str, label: str, num_images: int) -> tuple[dict, dict]:
    """(hyperparameters, reduce_images' question keywords) of a case."""
    if method_stage(name) != "question":
        return (GRID_SETTINGS[name] if label == "grid" else {}), {}
    extra = {"questions": [QUESTIONS[i % 2] for i in range(num_images)]}
    if label == "clip":
        return {"clip_model": request.getfixturevalue("clip_dir")}, extra
    extra["model"] = {"path": str(request.getfixturevalue("tiny_model_dir")), "revision": None}
    return {"relevance": "llm"}, extra


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize(("name", "label"), method_cases())
def test_ragged_batch_gives_each_image_what_it_gets_alone(request, make_view, name, label, budget):
    images = ragged_images(make_view)
    seeds = [[1000 * i + v for v in range(len(views))] for i, views in enumerate(images)]
    hparams, extra = settings(request, name, label, len(images))
    method = get_method(name)
    batch_sizes = []

    def reducer(batch, keep):
        batch_sizes.append(batch.projected.shape[0])
        return method(batch, keep, **hparams)

    if (name, budget) in EXCLUDED:
        with pytest.raises(ValueError, match=EXCLUDED[name, budget]):
            reduce_images(images, seeds, reducer, budget, 2, **extra)
        return
    together, _ = reduce_images(images, seeds, reducer, budget, 2, **extra)
    assert max(batch_sizes) == 2  # batches do mix images
    for i, views in enumerate(images):
        sizes = [v.projected.shape[0] for v in views]
        alone_extra = dict(extra, questions=extra["questions"][i : i + 1]) if extra else {}
        (alone,), _ = reduce_images([views], [seeds[i]], reducer, budget, 2, **alone_extra)
        got = together[i]
        assert got.views == alone.views, f"image {i}"
        assert torch.equal(got.sources, alone.sources), f"image {i}"
        assert torch.equal(got.tokens, alone.tokens), f"image {i}"
        counts = [k for _, _, k in got.views]
        assert [(h, w) for h, w, _ in got.views] == [v.grid for v in views]
        if name == "full":
            assert counts == sizes
        elif not keeps_own_count(name):
            assert counts == split_budget(image_budget(budget, sum(sizes)), sizes), f"image {i}"
        # each view's tokens come from that view's own tokens only
        assert got.tokens.shape == (sum(counts), DIM) and got.sources.shape == (sum(counts), sum(sizes))
        token_start = patch_start = 0
        for count, size in zip(counts, sizes):
            block = got.sources[token_start : token_start + count]
            assert not block[:, :patch_start].any() and not block[:, patch_start + size :].any(), f"image {i}"
            token_start, patch_start = token_start + count, patch_start + size


@pytest.mark.parametrize(
    ("budget", "num_tokens", "expected"),
    [
        (64, 576, 64),
        (64, 30, 30),  # a count keeps all of a smaller image
        (576, 576, 576),
        (0.111, 576, 64),  # 63.936 rounds to 64
        (0.5, 25, 13),  # 12.5 rounds half up
        (0.3, 57, 17),  # 17.1
        (0.01, 25, 1),  # 0.25 would round to 0: at least 1
        (1.0, 48, 48),
    ],
)
def test_image_budget_worked_examples(budget, num_tokens, expected):
    assert image_budget(budget, num_tokens) == expected


@pytest.mark.parametrize(
    ("budget", "sizes", "expected"),
    [
        (12, [48], [12]),
        # shares 1.89 and 10.11: floors 1 and 10, the last token to the larger remainder (0.89)
        (12, [9, 48], [2, 10]),
        # shares 5.66 and 6.34: floors 5 and 6, the last token to 0.66
        (12, [25, 28], [6, 6]),
        # shares 1.5 and 1.5: the tie goes to the earlier view
        (3, [10, 10], [2, 1]),
        # shares 0.06 and 2.94 give 0 and 3; the empty view takes one from the largest
        (3, [2, 100], [1, 2]),
        # a budget below the number of views leaves a view empty
        (1, [2, 100], [0, 1]),
        # the whole image: every view whole
        (57, [9, 48], [9, 48]),
        # shares 0.03, 0.03, 2.94 give 0, 0, 3; each empty view takes one from the largest in turn
        (3, [1, 1, 100], [1, 1, 1]),
    ],
)
def test_split_budget_worked_examples(budget, sizes, expected):
    assert split_budget(budget, sizes) == expected


def test_split_budget_sums_to_the_budget_within_the_sizes():
    rng = random.Random(0)
    for _ in range(3000):
        sizes = [rng.randint(1, 60) for _ in range(rng.randint(1, 6))]
        budget = rng.randint(0, sum(sizes))
        counts = split_budget(budget, sizes)
        assert sum(counts) == budget, (budget, sizes, counts)
        assert all(0 <= k <= size for k, size in zip(counts, sizes)), (budget, sizes, counts)
        if budget >= len(sizes):
            assert min(counts) >= 1, (budget, sizes, counts)
        # proportional: within one token of the view's share, but for the tokens moved to empty views
        moved = sum(1 for share in sizes if budget * share / sum(sizes) < 1) if budget >= len(sizes) else 0
        for k, size in zip(counts, sizes):
            assert abs(k - budget * size / sum(sizes)) < 1 + moved, (budget, sizes, counts)


def test_image_budget_is_within_the_image():
    rng = random.Random(1)
    for _ in range(3000):
        num_tokens = rng.randint(1, 3000)
        for budget in (rng.randint(1, 4000), rng.uniform(1e-4, 1.0)):
            kept = image_budget(budget, num_tokens)
            assert 1 <= kept <= num_tokens
            if isinstance(budget, float):
                assert abs(kept - budget * num_tokens) <= 0.5 or kept == 1
            else:
                assert kept == min(budget, num_tokens)
