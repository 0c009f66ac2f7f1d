from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vtc.methods import get_method
from vtc.methods.prumerge import adaptive_selection, fixed_selection, iqr_outliers

prumerge = get_method("prumerge")
prumerge_plus = get_method("prumerge_plus")


def covered(reduced, b=0):
    return [row.nonzero().flatten().tolist() for row in reduced.sources[b]]


def test_iqr_outliers_on_a_known_spread():
    # Sorted: 1 2 3 4 5 6 7 20 30. With 9 values the quartiles fall on order statistics 2 and 6: Q1 = 3,
    # Q3 = 7, IQR = 4, fence 7 + 1.5 · 4 = 13. Above it: 30 (patch 1) and 20 (patch 6).
    scores = torch.tensor([[3.0, 30, 1, 5, 7, 2, 20, 4, 6]])
    assert iqr_outliers(scores)[0].nonzero().flatten().tolist() == [1, 6]
    # A value exactly on the fence is not an outlier.
    on_fence = torch.tensor([[3.0, 30, 1, 5, 7, 2, 13, 4, 6]])
    assert iqr_outliers(on_fence)[0].nonzero().flatten().tolist() == [1]
    # Sorted 1 2 3 4 5 6 7 8 100: Q1 = 3, Q3 = 7 again; 8 is below the fence of 13, 100 above it.
    assert iqr_outliers(torch.tensor([[100.0, 1, 2, 3, 4, 5, 6, 7, 8]]))[0].nonzero().flatten().tolist() == [0]


def test_quartiles_interpolate_like_numpy():
    # 4 values 0 1 2 10: Q1 at position 0.75 → 0.75, Q3 at 2.25 → 2 + 0.25 · 8 = 4; fence 4 + 1.5 · 3.25 = 8.875.
    assert iqr_outliers(torch.tensor([[10.0, 0, 1, 2]])).tolist() == [[True, False, False, False]]
    # 0 1 2 9: Q3 = 2 + 0.25 · 7 = 3.75, Q1 = 0.75, fence 8.25: 9 is out.
    assert iqr_outliers(torch.tensor([[0.0, 1, 2, 9]])).tolist() == [[False, False, False, True]]
    # 0 1 2 8: fence 3.5 + 1.5 · 2.75 = 7.625: 8 is out; 0 1 2 7: fence 3.25 + 1.5 · 2.5 = 7: 7 is not.
    assert iqr_outliers(torch.tensor([[0.0, 1, 2, 8], [0.0, 1, 2, 7]])).tolist() == [
        [False, False, False, True],
        [False, False, False, False],
    ]


def peaked(peaks: dict[int, float], num_patches: int = 25) -> torch.Tensor:
    # A flat background of 1 has Q1 = Q3 = 1 (while peaks are under a quarter), so the outliers are the peaks.
    scores = torch.ones(1, num_patches)
    for patch, value in peaks.items():
        scores[0, patch] = value
    return scores


def test_adaptive_selection_prumerge_and_plus():
    scores = peaked({8: 5.0, 13: 9.0})
    assert [s.tolist() for s in adaptive_selection(scores)] == [[13, 8]]
    # PruMerge+: 2 outliers of 25, step ⌊⌊25 / 2⌋ / 3⌋ = 4, range(0, 24, 4) = 0 4 8 12 16 20 less 8.
    assert [s.tolist() for s in adaptive_selection(scores, plus=True)] == [[13, 8, 0, 4, 12, 16, 20]]
    # Per image: the second image has no outliers at all.
    both = torch.cat([scores, torch.ones(1, 25)])
    assert [s.tolist() for s in adaptive_selection(both)] == [[13, 8], []]
    assert [s.tolist() for s in adaptive_selection(both, plus=True)] == [[13, 8, 0, 4, 12, 16, 20], []]


def test_adaptive_plus_on_a_tiny_image():
    # One outlier (9, see test_quartiles_interpolate_like_numpy) of 4: step ⌊⌊4 / 1⌋ / 3⌋ = 1, range(0, 3).
    scores = torch.tensor([[0.0, 1, 2, 9]])
    assert [s.tolist() for s in adaptive_selection(scores, plus=True)] == [[3, 0, 1, 2]]


def test_fixed_selection_fills_by_attention_or_uniformly():
    scores = peaked({8: 5.0, 13: 9.0})
    # Attention fill: top-k; the flat background goes to the lowest indices.
    assert fixed_selection(scores, 3, "attention").tolist() == [[13, 8, 0]]
    # Uniform fill of 4 among the 23 others (0..24 less 8, 13): positions ⌊i · 23 / 4⌋ = 0, 5, 11, 17 of that
    # list, i.e. patches 0, 5, 12, 19.
    assert fixed_selection(scores, 6, "uniform").tolist() == [[13, 8, 0, 5, 12, 19]]
    # More outliers than the budget: the most attended ones.
    assert fixed_selection(scores, 1, "uniform").tolist() == [[13]]
    # No outliers: all uniform, ⌊i · 25 / 5⌋ = 0 5 10 15 20.
    assert fixed_selection(torch.ones(1, 25), 5, "uniform").tolist() == [[0, 5, 10, 15, 20]]


def test_fixed_selection_uniform_is_per_image():
    scores = torch.cat([peaked({8: 5.0, 13: 9.0}), torch.ones(1, 25)])
    assert fixed_selection(scores, 6, "uniform").tolist() == [[13, 8, 0, 5, 12, 19], [0, 4, 8, 12, 16, 20]]


def merge_example(make_tokens):
    # One head; attention 0.1 0.2 0.3 0.4. Keys: patch 3 = (1, 0), its nearest is patch 1 = (1, 0.1), then
    # patch 0 = (0, 1) (cosine 0), then patch 2 = (-1, 0). Projected tokens are one-hot, so sums read off.
    attention = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    tokens = make_tokens(projected=torch.eye(4)[None], cls_attention=attention, grid=(2, 2))
    keys = torch.tensor([[[0.0, 1.0], [1.0, 0.1], [-1.0, 0.0], [1.0, 0.0]]])
    return dataclasses.replace(tokens, keys=keys)


def test_kept_token_absorbs_its_key_neighbours_weighted_by_attention(make_tokens):
    tokens = merge_example(make_tokens)
    one = prumerge(tokens, 2, neighbours=1)
    # Kept: patch 3 (most attended). It becomes P3 + 0.2 · P1; the summary is 0.1 P0 + 0.2 P1 + 0.3 P2 (unkept).
    torch.testing.assert_close(one.tokens[0], torch.tensor([[0.0, 0.2, 0.0, 1.0], [0.1, 0.2, 0.3, 0.0]]))
    assert covered(one) == [[1, 3], [0, 1, 2]]
    two = prumerge(tokens, 2, neighbours=2)
    torch.testing.assert_close(two.tokens[0, 0], torch.tensor([0.1, 0.2, 0.0, 1.0]))
    assert covered(two) == [[0, 1, 3], [0, 1, 2]]


def test_kept_tokens_may_absorb_each_other_and_order_follows_the_hparam(make_tokens):
    tokens = merge_example(make_tokens)
    # Keep 3, 2, 1 (by attention). Nearest: 3 → 1 (kept), 2 → 0 (cosine 0 beats -0.995 and -1), 1 → 3.
    by_score = prumerge(tokens, 3, neighbours=1, summary_token=False)
    expected = {3: [0.0, 0.2, 0.0, 1.0], 2: [0.1, 0.0, 1.0, 0.0], 1: [0.0, 1.0, 0.0, 0.4]}
    torch.testing.assert_close(by_score.tokens[0], torch.tensor([expected[3], expected[2], expected[1]]))
    assert covered(by_score) == [[1, 3], [0, 2], [1, 3]]
    by_space = prumerge(tokens, 3, neighbours=1, summary_token=False, order="spatial")
    torch.testing.assert_close(by_space.tokens[0], torch.tensor([expected[1], expected[2], expected[3]]))


def test_summary_token_is_last_in_spatial_order_too(make_tokens):
    tokens = merge_example(make_tokens)
    reduced = prumerge(tokens, 3, neighbours=0, order="spatial")
    # Kept 3 and 2, fed as 2, 3, then the summary of 0 and 1.
    torch.testing.assert_close(
        reduced.tokens[0], torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.0, 0.0]])
    )
    assert covered(reduced) == [[2], [3], [0, 1]]


def test_budget_one_is_the_summary_of_everything(make_tokens):
    tokens = merge_example(make_tokens)
    reduced = prumerge(tokens, 1)
    torch.testing.assert_close(reduced.tokens[0], torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert covered(reduced) == [[0, 1, 2, 3]]


def test_plus_keeps_outliers_and_uniform_patches(make_tokens):
    attention = peaked({8: 5.0, 13: 9.0})[:, None, :] / 40
    tokens = make_tokens(1, (5, 5), 3, cls_attention=attention)
    reduced = prumerge_plus(tokens, 7, neighbours=0)
    # 6 kept (see test_fixed_selection...) plus the summary; with no neighbours a kept token is its patch.
    kept = [13, 8, 0, 5, 12, 19]
    assert covered(reduced)[:6] == [[p] for p in kept]
    torch.testing.assert_close(reduced.tokens[0, :6], tokens.projected[0, kept])
    assert torch.equal(prumerge(tokens, 7, neighbours=0, fill="uniform").tokens, reduced.tokens)


@pytest.mark.parametrize("method", [prumerge, prumerge_plus])
@pytest.mark.parametrize("budget", [1, 5, 16])
@pytest.mark.parametrize("summary_token", [True, False])
def test_sources_are_self_plus_neighbours_and_summary_is_the_rest(make_tokens, method, budget, summary_token):
    tokens = make_tokens(3, (4, 4), 5)
    reduced = method(tokens, budget, neighbours=3, summary_token=summary_token)
    assert reduced.tokens.shape == (3, budget, 5)
    kept = budget - 1 if summary_token else budget
    counts = reduced.sources.sum(dim=-1)
    # A kept token covers its own patch and 3 neighbours.
    assert (counts[:, :kept] == 4).all()
    if summary_token:
        # The summary covers the 16 − kept unkept patches; with the kept ones, that is every patch.
        assert (counts[:, -1] == 16 - kept).all()
        assert reduced.sources.any(dim=1).all()


def test_neighbour_count_is_capped(make_tokens):
    reduced = prumerge(make_tokens(2, (2, 2), 3), 2, summary_token=False)
    assert (reduced.sources.sum(dim=-1) == 4).all()


@pytest.mark.parametrize(
    ("hparams", "message"),
    [({"fill": "random"}, "fill"), ({"order": "selection"}, "order"), ({"neighbours": -1}, "neighbours")],
)
def test_bad_hyperparameters_are_rejected(make_tokens, hparams, message):
    with pytest.raises(ValueError, match=message):
        prumerge(make_tokens(1, (2, 2)), 2, **hparams)


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus", "prumerge_adaptive", "prumerge_plus_adaptive"])
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


# The reference's own form: an outlier count of its own per image (`token_prune_merge_advanced(_plus)`,
# if_adaptive=True).
prumerge_adaptive = get_method("prumerge_adaptive")
prumerge_plus_adaptive = get_method("prumerge_plus_adaptive")


def three_peaked_images(make_tokens):
    # 5 × 5 images: peaks at 13 and 8 (2 outliers), at 3 (1 outlier), none (flat, no outlier). Both heads alike.
    scores = torch.cat([peaked({8: 5.0, 13: 9.0}), peaked({3: 7.0}), torch.ones(1, 25)])
    attention = (scores / scores.sum(dim=-1, keepdim=True))[:, None, :].expand(-1, 2, -1)
    return make_tokens(3, (5, 5), 4, cls_attention=attention.contiguous())


def expected_rows(tokens, kept: list[list[int]]):
    """Per image (tokens, sources) with no neighbours: its kept patches themselves, then the summary of the rest."""
    scores = tokens.cls_attention.mean(dim=1)
    rows = []
    for b, keep in enumerate(kept):
        unkept = [p for p in range(25) if p not in keep]
        summary = (scores[b, unkept, None] * tokens.projected[b, unkept]).sum(dim=0)
        rows.append((torch.cat([tokens.projected[b, keep], summary[None]]), [[p] for p in keep] + [unkept]))
    return rows


@pytest.mark.parametrize(
    ("method", "kept"),
    [
        (prumerge_adaptive, [[13, 8], [3], []]),
        # PruMerge+: 2 outliers of 25: step ⌊⌊25 / 2⌋ / 3⌋ = 4, range(0, 24, 4) less 8; 1 outlier: step
        # ⌊25 / 3⌋ = 8, range(0, 24, 8) = 0 8 16; none: the summary token alone (the reference divides by zero).
        (prumerge_plus_adaptive, [[13, 8, 0, 4, 12, 16, 20], [3, 0, 8, 16], []]),
    ],
)
def test_adaptive_methods_keep_each_images_own_outliers(make_tokens, method, kept):
    tokens = three_peaked_images(make_tokens)
    reduced = method(tokens, 5, neighbours=0)  # the budget is ignored
    lengths = [len(keep) + 1 for keep in kept]
    assert reduced.lengths.tolist() == lengths
    assert reduced.tokens.shape == (3, max(lengths), 4) and reduced.sources.shape == (3, max(lengths), 25)
    for b, (expected_tokens, expected_sources) in enumerate(expected_rows(tokens, kept)):
        torch.testing.assert_close(reduced.tokens[b, : lengths[b]], expected_tokens)
        assert covered(reduced, b)[: lengths[b]] == expected_sources
        # padding: zero tokens with no sources
        assert not reduced.tokens[b, lengths[b] :].any() and not reduced.sources[b, lengths[b] :].any()
    assert torch.equal(method(tokens, 1, neighbours=0).tokens, reduced.tokens)


def test_adaptive_spatial_order_sorts_the_kept_patches_and_keeps_the_summary_last(make_tokens):
    tokens = three_peaked_images(make_tokens)
    reduced = prumerge_plus_adaptive(tokens, 5, neighbours=0, order="spatial")
    assert [covered(reduced, 1)[i] for i in range(4)] == [[0], [3], [8], [16]]
    assert covered(reduced, 1)[4] == [p for p in range(25) if p not in (0, 3, 8, 16)]


@pytest.mark.parametrize("name", ["prumerge_adaptive", "prumerge_plus_adaptive"])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_adaptive_batch_gives_each_image_what_it_gets_alone(make_tokens, one_image, name, order):
    # Attention of different sharpness per image, so the outlier counts differ within the batch.
    sharpness = torch.tensor([0.3, 1.0, 3.0, 6.0, 1.0])[:, None, None]
    logits = torch.randn(5, 2, 48, generator=torch.Generator().manual_seed(3))
    tokens = make_tokens(5, (6, 8), 5, cls_attention=(sharpness * logits).softmax(dim=-1))
    reduced = get_method(name)(tokens, 12, neighbours=4, order=order)
    lengths = reduced.lengths.tolist()
    assert len(set(lengths)) >= 3, lengths
    assert reduced.tokens.shape[1] == max(lengths)
    for b in range(5):
        alone = get_method(name)(one_image(tokens, b), 12, neighbours=4, order=order)
        assert alone.lengths.tolist() == [lengths[b]] and alone.tokens.shape[1] == lengths[b]
        assert torch.equal(reduced.tokens[b, : lengths[b]], alone.tokens[0])
        assert torch.equal(reduced.sources[b, : lengths[b]], alone.sources[0])
        assert not reduced.tokens[b, lengths[b] :].any() and not reduced.sources[b, lengths[b] :].any()


def complement(idx: torch.Tensor, dim: int) -> torch.Tensor:
    """The reference's `complement_idx` for one row: scatter 0 at the kept indices, sort, drop as many zeros."""
    masked = torch.scatter(torch.arange(dim)[None], -1, idx, 0)
    return masked.sort(dim=-1).values[:, idx.shape[-1] :]


def reference_adaptive(attention, keys, features, plus: bool, neighbours: int = 32) -> torch.Tensor:
    """A transcription of the reference's `token_prune_merge_advanced` / `..._plus` with if_adaptive=True, batch 1:
    attention [N] (its `cls_attn`), keys [N, C] (`Key_wo_cls`), features [N, D] → [k + 1, D]. Its `575` is N − 1 of
    its 576 patches, its 32 neighbours `neighbours` (a grid below 33 patches has fewer)."""
    import numpy as np

    num_patches = attention.shape[0]
    cls_attn, keys, features = attention[None], keys[None], features[None]
    values = cls_attn.to(dtype=torch.float32).numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    ratio = len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)
    _, idx = torch.topk(cls_attn, int(num_patches * ratio), dim=1, largest=True)
    if plus:
        step_length = int(1 / ratio)
        sequence = torch.arange(0, num_patches - 1, int(step_length / 3))
        filtered = torch.tensor([x for x in sequence if x not in idx.flatten()], dtype=torch.long)
        idx = torch.cat((idx, filtered[None]), dim=1)
    x_others = features[:, idx[0]]
    x_others_attn = cls_attn[:, idx[0]]
    keys_others = F.normalize(keys[:, idx[0]], p=2, dim=-1)
    compl = complement(idx, num_patches)
    non_topk, non_topk_attn = features[:, compl[0]], cls_attn[:, compl[0]]
    non_topk_keys = F.normalize(keys[:, compl[0]], p=2, dim=-1)
    updated = torch.zeros_like(x_others)
    for i in range(x_others.shape[1]):
        rest = torch.cat([x_others[:, :i], x_others[:, i + 1 :], non_topk], dim=1)
        rest_attn = torch.cat([x_others_attn[:, :i], x_others_attn[:, i + 1 :], non_topk_attn], dim=1)
        rest_keys = torch.cat([keys_others[:, :i], keys_others[:, i + 1 :], non_topk_keys], dim=1)
        similarity = torch.bmm(keys_others[:, i : i + 1], rest_keys.transpose(1, 2))
        _, nearest = torch.topk(similarity, k=neighbours, dim=2, largest=True)
        weighted = torch.sum(rest[:, nearest.flatten()] * rest_attn[:, nearest.flatten()][..., None], dim=1)
        updated[0, i] = x_others[0, i] + weighted
    summary = torch.sum(non_topk * non_topk_attn[..., None], dim=1, keepdim=True)
    return torch.cat([updated, summary], dim=1)[0]


@pytest.mark.parametrize("plus", [False, True])
def test_adaptive_methods_match_the_reference_on_generated_inputs(make_tokens, plus):
    # One head, so the head mean is the reference's single attention row. Sharpness varies the outlier count; a few
    # spikes make sure there is at least one (the reference's PruMerge+ divides by zero otherwise).
    method = prumerge_plus_adaptive if plus else prumerge_adaptive
    counts = []
    for case, (grid, sharpness) in enumerate([((24, 24), 1.0), ((24, 24), 3.0), ((6, 8), 2.0), ((5, 7), 0.5),
                                              ((9, 11), 4.0), ((24, 24), 0.2)]):  # fmt: skip
        g = torch.Generator().manual_seed(case)
        n = grid[0] * grid[1]
        logits = sharpness * torch.randn(1, 1, n, generator=g)
        logits[0, 0, torch.randperm(n, generator=g)[:3]] += 4.0
        tokens = make_tokens(1, grid, 7, cls_attention=logits.softmax(dim=-1), generator_seed=100 + case)
        ours = method(tokens, 1)
        theirs = reference_adaptive(tokens.cls_attention[0, 0], tokens.keys[0], tokens.projected[0], plus,
                                    min(32, n - 1))  # fmt: skip
        assert ours.lengths.tolist() == [theirs.shape[0]]
        torch.testing.assert_close(ours.tokens[0], theirs, rtol=1e-5, atol=1e-6)
        counts.append(theirs.shape[0])
    assert len(set(counts)) >= 4, counts  # the inputs do reach different counts


def test_integer_counts_and_steps_are_the_references_floats_at_576_patches():
    # The reference: k = int(N · ratio), step int(int(1 / ratio) / 3) with ratio = c / N in floats. At N = 576 these
    # equal c and ⌊⌊N / c⌋ / 3⌋ for every c; at N = 1176, c = 3 floating point drops an outlier (documented).
    for c in range(1, 577):
        ratio = c / 576
        assert int(576 * ratio) == c and int(int(1 / ratio) / 3) == (576 // c) // 3
    assert int(1176 * (3 / 1176)) == 2


@pytest.mark.parametrize("name", ["prumerge_adaptive", "prumerge_plus_adaptive"])
def test_adaptive_methods_write_per_image_counts_through_the_pipeline(make_view, tmp_path, name):
    from vtc.cache import StoreWriter
    from vtc.pipeline.encode import pack_views
    from vtc.pipeline.reduce import pack_reduced, reduce_dataset, reduce_images, unpack_reduced, view_batch

    method = get_method(name)
    # Grids of different sizes, one image of two views (LLaVA-NeXT's base and high-resolution views).
    images = [
        [make_view((6, 8), seed=0, sharpness=3.0)],
        [make_view((5, 5), seed=1, sharpness=0.5)],
        [make_view((4, 4), seed=2, sharpness=2.0), make_view((6, 8), seed=3, sharpness=5.0)],
        [make_view((6, 8), seed=4, sharpness=1.0)],
    ]
    seeds = [[10 * i + v for v in range(len(views))] for i, views in enumerate(images)]
    reduced, _ = reduce_images(images, seeds, lambda batch, keep: method(batch, keep), 16, batch_size=2)
    counts = []
    for i, views in enumerate(images):
        alone = [method(view_batch([view], [seeds[i][v]]), 1) for v, view in enumerate(views)]
        assert reduced[i].views == [(*view.grid, int(a.lengths[0])) for view, a in zip(views, alone)]
        assert torch.equal(reduced[i].tokens, torch.cat([a.tokens[0] for a in alone]))
        counts.append(reduced[i].tokens.shape[0])
    assert len(set(counts)) > 1, counts
    back = unpack_reduced(pack_reduced(reduced, torch.float32), len(images))
    for before, after in zip(reduced, back):
        assert torch.equal(before.tokens, after.tokens) and torch.equal(before.sources, after.sources)
        assert before.views == after.views

    # reduce_dataset on an encode store of these views records the counts it reached
    writer = StoreWriter(tmp_path / "encode", {"model": "synthetic"})
    writer.add(["a", "b"], pack_views(images[:2]))
    writer.add(["c", "d"], pack_views(images[2:]))
    writer.close()
    manifest = reduce_dataset(tmp_path / "encode", None, name, 16, {}, 0, tmp_path / "reduced", batch_size=2)
    assert manifest["tokens_per_image"] == {"mean": sum(counts) / 4, "min": min(counts), "max": max(counts)}
    written = [image.tokens.shape[0] for _, shard in read_reduced_store(tmp_path / "reduced") for image in shard]
    assert written == counts


def read_reduced_store(path):
    from vtc.cache import Store
    from vtc.pipeline.reduce import read_reduced

    return read_reduced(Store.open(path))


@pytest.mark.parametrize("name", ["prumerge_adaptive", "prumerge_plus_adaptive"])
def test_adaptive_settings_are_checked(make_tokens, name):
    from vtc.methods import HparamError, keeps_own_count, resolved_hparams

    assert keeps_own_count(name) and not keeps_own_count(name.replace("_adaptive", ""))
    assert resolved_hparams(name, {}) == {"neighbours": 32, "order": "score", "positions": "renumbered"}
    with pytest.raises(HparamError, match=f"method '{name}': order must be one of score, spatial"):
        resolved_hparams(name, {"order": "selection"})
    with pytest.raises(HparamError, match=f"method '{name}' has no hyperparameter 'fill'"):
        resolved_hparams(name, {"fill": "uniform"})
    for hparams, message in (({"order": "selection"}, "order"), ({"neighbours": -1}, "neighbours")):
        with pytest.raises(ValueError, match=message):
            get_method(name)(make_tokens(1, (4, 4)), 4, **hparams)


@pytest.mark.slow
def test_adaptive_prumerge_runs_through_the_pipeline_at_the_counts_it_reaches(run_in_llm_method):
    """prepare → encode → reduce → generate → evaluate with the tiny model: the answers' visual tokens are each
    image's own count, whatever the budget, and the metrics report their mean."""
    metrics, manifest, _ = run_in_llm_method("prumerge_plus_adaptive", 64, {})
    counts = manifest["tokens_per_image"]
    assert len(manifest["num_tokens"]) > 1 and 64 not in manifest["num_tokens"]  # each image its own count
    assert metrics["visual_tokens_fed"]["min"] >= counts["min"] and metrics["visual_tokens_fed"]["max"] <= counts["max"]
    assert counts["min"] <= metrics["visual_tokens_fed"]["mean"] <= counts["max"]
