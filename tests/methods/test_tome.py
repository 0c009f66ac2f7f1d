from __future__ import annotations

import pytest
import torch

from vtc.methods import get_method, method_stage, register_method
from vtc.methods.tome import (
    bipartite_soft_matching,
    merge_schedule,
    merge_source,
    merge_wavg,
    proportional_attention,
    unmerge,
)

tome = get_method("tome")


def rows(source: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in source]


def example_metric() -> torch.Tensor:
    """[1, 5, 2]: CLS (token 0) identical to token 1; tokens 2 and 3 almost identical; token 4 closest to token 1.

    A = tokens 0, 2, 4; B = tokens 1, 3. Cosine similarities of each A token to its best B token:
    0 → 1: 1.0, 2 → 3: 1 / √1.01 ≈ 0.995, 4 → 1: 1 / √1.25 ≈ 0.894 (4 → 3: 0.6 / √(1.25 · 1.01) ≈ 0.53).
    """
    return torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [1.0, 0.5]]])


def test_matching_merges_the_most_similar_pair_first_and_protects_cls():
    metric = example_metric()
    # r = 1: CLS may not merge, so 2 joins 3. Out: unmerged A (0, 4), then B (1, 3): token 2 and 3 → slot 3.
    assert bipartite_soft_matching(metric, 1).tolist() == [[0, 2, 3, 3, 1]]
    # r = 2: then 4 joins 1. Out: unmerged A (0), then B (1, 3).
    assert bipartite_soft_matching(metric, 2).tolist() == [[0, 1, 2, 2, 1]]
    # Without the protection, the identical pair (CLS, 1) goes first. Out: unmerged A (2, 4), then B (1, 3).
    assert bipartite_soft_matching(metric, 1, class_token=False).tolist() == [[2, 2, 0, 3, 1]]
    # Scaling a metric vector changes nothing: the similarity is cosine.
    assert torch.equal(
        bipartite_soft_matching(metric * torch.tensor([[[3.0], [1], [2], [5], [0.5]]]), 2),
        bipartite_soft_matching(metric, 2),
    )
    assert bipartite_soft_matching(metric, 0).tolist() == [[0, 3, 1, 4, 2]]  # no merge: A in order, then B


def test_without_class_token_unmerged_tokens_keep_the_reference_order():
    # A: 0 (best .83, to 3), 2 (best .90, to 1), 4 (identical to 1). r = 1 merges 4; the reference leaves the
    # unmerged A tokens in decreasing similarity (2, then 0), sorting them only when there is a class token.
    metric = torch.tensor([[[1.0, 1.5], [1.0, 0.0], [1.0, 0.48], [0.0, 1.0], [1.0, 0.0]]])
    assert bipartite_soft_matching(metric, 1, class_token=False).tolist() == [[1, 2, 0, 3, 2]]


def test_matching_removes_at_most_half():
    with pytest.raises(ValueError, match=r"\(t - protected\) // 2 = 2, got 3"):
        bipartite_soft_matching(example_metric(), 3)


def test_equal_similarities_merge_in_a_order():
    # Four A tokens (0 is CLS) all identical to B token 1: r = 2 merges A tokens 2 and 4, not 6.
    metric = torch.ones(1, 7, 3)
    assert bipartite_soft_matching(metric, 2).tolist() == [[0, 2, 2, 3, 2, 4, 1]]


def test_size_weighted_average_and_sizes():
    x = torch.tensor([[[0.0], [10.0], [2.0], [6.0], [100.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0]])
    destination = torch.tensor([[0, 2, 3, 3, 1]])
    merged, sizes = merge_wavg(x, size, destination, 4)
    # slot 3 = (3 · 2 + 1 · 6) / 4 = 3; the others are single tokens
    assert merged.flatten().tolist() == [0.0, 100.0, 10.0, 3.0]
    assert sizes.flatten().tolist() == [1.0, 1.0, 1.0, 4.0]
    # no sizes yet: every token counts 1, a plain mean
    merged, sizes = merge_wavg(x, None, destination, 4)
    assert merged[0, 3].item() == 4.0 and sizes.flatten().tolist() == [1.0, 1.0, 1.0, 2.0]
    # a merged token unmerges to every token it holds
    assert unmerge(merged, destination).flatten().tolist() == [0.0, 10.0, 4.0, 4.0, 100.0]


def test_size_weighted_sums_do_not_overflow_in_half_precision():
    x = torch.full((1, 4, 2), 60000.0, dtype=torch.float16)
    merged, sizes = merge_wavg(x, torch.tensor([[1.0, 2.0, 1.0, 1.0]]), torch.tensor([[0, 1, 1, 2]]), 3)
    assert merged.dtype == torch.float16 and torch.isfinite(merged).all() and merged[0, 1, 0].item() == 60000.0


def test_sources_are_unions():
    first = merge_source(None, torch.tensor([[0, 2, 3, 3, 1]]), 4)
    assert rows(first[0]) == [[0], [4], [1], [2, 3]]
    # next layer: slots 1 and 2 ({4} and {1}) merge, then 3 ({2, 3}) joins 0
    second = merge_source(first, torch.tensor([[0, 1, 1, 0]]), 2)
    assert second.dtype == torch.bool and rows(second[0]) == [[0, 2, 3], [1, 4]]


def clip_attention(hidden_size: int = 8, heads: int = 2):
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPAttention

    torch.manual_seed(0)
    return CLIPAttention(CLIPVisionConfig(hidden_size=hidden_size, num_attention_heads=heads)).eval()


@torch.no_grad()
def test_a_merged_token_of_size_two_attends_like_two_copies():
    attention = clip_attention()
    u, v, w = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    merged, _ = proportional_attention(attention, torch.stack([u, v, w])[None], torch.tensor([[2.0, 1.0, 1.0]]))
    duplicated, _ = proportional_attention(attention, torch.stack([u, u, v, w])[None], None)
    torch.testing.assert_close(merged[0], duplicated[0, [0, 2, 3]])
    # and the plain attention (no sizes) is what transformers' CLIPAttention computes
    x = torch.stack([u, v, w])[None]
    plain, metric = proportional_attention(attention, x, None)
    torch.testing.assert_close(plain, attention(x)[0])
    torch.testing.assert_close(proportional_attention(attention, x, torch.ones(1, 3))[0], plain)
    # the metric: keys averaged over the two heads
    torch.testing.assert_close(metric, attention.k_proj(x).view(1, 3, 2, 4).mean(dim=2))


@pytest.mark.parametrize(
    "num_patches, budget, num_layers",
    [
        (576, 192, 23),
        (576, 128, 23),
        (576, 64, 23),
        (576, 1, 23),
        (576, 192, 3),
        (576, 128, 3),
        (576, 72, 3),
        (7, 2, 2),
    ],
)
def test_schedule_lands_exactly_on_the_budget_removing_at_most_half(num_patches, budget, num_layers):
    schedule = merge_schedule(num_patches, budget, num_layers)
    assert len(schedule) == num_layers and sum(schedule) == num_patches - budget
    n = num_patches
    for r in schedule:
        assert 0 <= r <= n // 2
        n -= r


def test_schedule_is_constant_where_the_cap_allows():
    # LLaVA-1.5: 384 tokens over layers 0 … 22 is 16.7 a layer: 17 on the first 16 layers, 16 on the other 7
    assert merge_schedule(576, 192, 23) == [17] * 16 + [16] * 7
    # Three layers to 128: halving bounds the last layer (256 → 128), so the first two take more, evenly
    assert merge_schedule(576, 128, 3) == [160, 160, 128]
    assert merge_schedule(576, 576, 3) == [0, 0, 0]


def test_schedule_rejects_an_unreachable_budget():
    with pytest.raises(ValueError, match="cannot reach budget = 64 from N = 576 patches in 3 layers.*fewest .* is 72"):
        merge_schedule(576, 64, 3)
    with pytest.raises(ValueError, match=r"N = 576\b.*budget = 0$"):
        merge_schedule(576, 0, 23)


def test_tome_is_an_encoder_level_method():
    assert method_stage("tome") == "encoder"
    assert method_stage("pool") == "tokens"
    with pytest.raises(ValueError, match="stage of method 'x' must be one of"):
        register_method("x", stage="vision")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, shapes_dir):
    """The tiny random LLaVA (4 vision layers: ToMe in layers 0, 1, 2) and pixel values of 4 shapes images."""
    from vtc.benchmarks import read_common_parquet
    from vtc.models import llava

    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    table = read_common_parquet(shapes_dir / "test.parquet")
    images, seen = [], set()
    for row in table:
        if row["image_id"] not in seen and len(images) < 4:
            seen.add(row["image_id"])
            images.append(row["image"])
    return model, processor.image_processor(images, return_tensors="pt")["pixel_values"]


def test_full_budget_is_the_plain_encoder_output(tiny):
    from vtc.models import llava

    model, pixel_values = tiny
    reduced = tome(model, pixel_values, 576)
    torch.testing.assert_close(reduced.tokens, llava.encode(model, pixel_values).projected)
    assert torch.equal(reduced.sources, torch.eye(576, dtype=torch.bool).expand(4, -1, -1))


@pytest.mark.parametrize("budget", [192, 128, 72])
def test_k_tokens_partition_the_patches_in_first_patch_order(tiny, budget):
    model, pixel_values = tiny
    reduced = tome(model, pixel_values, budget)
    assert reduced.tokens.shape == (4, budget, model.config.text_config.hidden_size)
    assert reduced.sources.shape == (4, budget, 576) and reduced.sources.dtype == torch.bool
    assert torch.equal(reduced.sources.sum(dim=1), torch.ones(4, 576, dtype=torch.long))
    first = reduced.sources.int().argmax(dim=-1)  # lowest covered patch of each token
    assert (first[:, 1:] > first[:, :-1]).all()


def test_batch_gives_each_image_its_own_result(tiny):
    model, pixel_values = tiny
    batched = tome(model, pixel_values, 128)
    for b in range(len(pixel_values)):
        alone = tome(model, pixel_values[b : b + 1], 128)
        assert torch.equal(batched.sources[b], alone.sources[0])
        torch.testing.assert_close(batched.tokens[b], alone.tokens[0], rtol=0, atol=1e-5)


def test_proportional_attention_changes_the_merged_tokens(tiny):
    model, pixel_values = tiny
    with_sizes = tome(model, pixel_values[:1], 192)
    without = tome(model, pixel_values[:1], 192, prop_attn=False)
    # the first layer merges before any size exists, so layer 0's matching agrees; later ones see other tokens
    assert not torch.allclose(with_sizes.tokens, without.tokens)


def test_budget_the_tower_cannot_reach_is_an_error(tiny):
    model, pixel_values = tiny
    with pytest.raises(ValueError, match="fewest it can leave is 72"):
        tome(model, pixel_values[:1], 64)
