"""Contract every base method keeps: registration, budget checks, shapes, sources, batch independence."""

from __future__ import annotations

import pytest
import torch

from vtc.methods import available_methods, get_method

BASE_METHODS = ["full", "random", "spatial", "pool", "cls_attention", "cluster"]
REDUCING = [name for name in BASE_METHODS if name != "full"]
# Methods that merge by weighted sums (PruMerge) or seed + mean (VisionZip): their tokens are not source means.
ZOO = ["prumerge", "prumerge_plus", "visionzip", "divprune", "cluster_agglomerative"]
# Pure selections of the 2025 baseline tier (issue 18): like divprune, they leave patches uncovered.
SELECTIONS_2025 = ["vispruner", "holov", "scope"]
ZOO += SELECTIONS_2025
GRID = (6, 6)
N = 36


def test_registry_lists_the_base_methods():
    assert set(BASE_METHODS) <= set(available_methods())
    for name in BASE_METHODS:
        assert callable(get_method(name))


def test_registry_lists_the_method_zoo():
    assert set(ZOO) <= set(available_methods())


@pytest.mark.parametrize("name", REDUCING + ZOO)
@pytest.mark.parametrize("budget", [0, -1, N + 1])
def test_budget_out_of_range_is_rejected(make_tokens, name, budget):
    with pytest.raises(ValueError, match=rf"N = {N}\b.*budget = {budget}$"):
        get_method(name)(make_tokens(2, GRID), budget)


@pytest.mark.parametrize("name", REDUCING)
@pytest.mark.parametrize("budget", [1, 4, 9, 18, N])
def test_shapes_and_sources_agree_with_tokens(make_tokens, name, budget):
    tokens = make_tokens(3, GRID, 5)
    reduced = get_method(name)(tokens, budget)
    assert reduced.tokens.shape == (3, budget, 5)
    assert reduced.sources.shape == (3, budget, N)
    assert reduced.sources.dtype == torch.bool
    counts = reduced.sources.sum(dim=-1)
    assert (counts >= 1).all()
    # Selections, pools and clusters alike feed the plain mean of the patches they cover.
    means = reduced.sources.float() @ tokens.projected / counts[..., None]
    torch.testing.assert_close(reduced.tokens, means)


def test_full_shapes(make_tokens):
    tokens = make_tokens(3, GRID, 5)
    reduced = get_method("full")(tokens, N)
    assert reduced.tokens.shape == (3, N, 5)
    assert reduced.sources.shape == (3, N, N)


@pytest.mark.parametrize("name", BASE_METHODS + ZOO)
@pytest.mark.parametrize("budget", [4, 18])
def test_batch_gives_each_image_its_own_result(make_tokens, one_image, name, budget):
    tokens = make_tokens(3, GRID, 5, seeds=[7, 8, 7])
    batched = get_method(name)(tokens, budget)
    for b in range(3):
        alone = get_method(name)(one_image(tokens, b), budget)
        assert torch.equal(batched.sources[b], alone.sources[0])
        torch.testing.assert_close(batched.tokens[b], alone.tokens[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BASE_METHODS + ZOO)
def test_unknown_hyperparameter_is_rejected(make_tokens, name):
    with pytest.raises(TypeError):
        get_method(name)(make_tokens(1, GRID), 4, no_such_hparam=1)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("budget", [1, 4, 9, 18, N])
def test_zoo_shapes_and_sources(make_tokens, name, budget):
    tokens = make_tokens(3, GRID, 5)
    reduced = get_method(name)(tokens, budget)
    assert reduced.tokens.shape == (3, budget, 5)
    assert reduced.tokens.dtype == tokens.projected.dtype
    assert reduced.sources.shape == (3, budget, N)
    assert reduced.sources.dtype == torch.bool
    assert (reduced.sources.sum(dim=-1) >= 1).all()
    # Merging methods account for each patch: kept, merged into a kept token, or summarised. (VisionZip's
    # default split has no contextual token below a budget of 4, see `default_contextual`.)
    if name not in ["divprune", *SELECTIONS_2025] and not (name == "visionzip" and budget < 4):
        assert reduced.sources.any(dim=1).all()


def test_resolved_hyperparameters_write_out_every_default_and_reject_unknown_names():
    from vtc.methods import HparamError, resolved_hparams

    assert resolved_hparams("cluster", {"init": "grid"}) == {
        "space": "projected", "iters": 3, "init": "grid", "distance": "l2", "aggregate": "mean", "positions": "renumbered"
    }
    # every method has the pipeline's `positions`: renumbered before the LLM, the reference's in it
    assert resolved_hparams("full", {}) == {"positions": "renumbered"}
    assert resolved_hparams("tome", {"positions": "original"})["positions"] == "original"
    # in-LLM: the selection's layer, and the pruning loop's positions and budget_mode
    assert resolved_hparams("fastv", {"budget_mode": "kept"}) == {"layer": 2, "positions": "original", "budget_mode": "kept"}
    with pytest.raises(HparamError, match="method 'cluster' has no hyperparameter 'iter'; it takes aggregate, distance, init, iters, positions, space") as error:
        resolved_hparams("cluster", {"iter": 3})
    assert error.value.key == "iter"
    for method in ("pool", "dart"):
        message = f"method '{method}': positions must be one of original, renumbered, got 'gapped'"
        with pytest.raises(HparamError, match=message) as error:
            resolved_hparams(method, {"positions": "gapped"})
        assert error.value.key == "positions"


@pytest.mark.parametrize("name", BASE_METHODS + ZOO)
def test_positions_go_to_the_pipeline_not_to_the_method(make_tokens, name):
    from vtc.methods import resolved_hparams, split_positions

    positions, own = split_positions(resolved_hparams(name, {"positions": "original"}))
    assert positions == "original" and "positions" not in own
    get_method(name)(make_tokens(1, GRID), 4, **own)  # every other written-out default is the method's own
    assert split_positions({}) == ("renumbered", {})
