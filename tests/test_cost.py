"""Tests of vtc.cost against numbers worked out by hand (the arithmetic is written out next to each value)."""

import pytest

from vtc.cost import (
    A100_80GB_SXM,
    H100_SXM,
    LLAVA_15_13B,
    LLAVA_15_7B,
    Device,
    ModelShape,
    decode_estimate,
    decode_flops,
    estimate,
    kept_for_layer_average,
    kv_cache_bytes,
    layer_average,
    param_count,
    prefill_estimate,
    prefill_flops,
    relative_to_full,
    roofline_time,
    staged_tokens_per_layer,
    visual_tokens_per_layer_for,
    weight_bytes,
)

# A toy decoder small enough to do every sum by hand: 1 layer, d=4, m=8, 2 heads of dim 2, vocab 10.
# Linear params per layer P = q,k,v,o 4·(4·4) + gate,up,down 3·(4·8) = 64 + 96 = 160.
TOY = ModelShape(num_layers=1, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=2, vocab_size=10)
SLOW = Device("toy", peak_flops=100.0, memory_bandwidth=10.0)  # everything in the toy is memory-bound here


def test_shapes():
    assert LLAVA_15_7B.head_dim == 128 and LLAVA_15_13B.head_dim == 128  # 4096/32, 5120/40
    assert TOY.head_dim == 2 and TOY.layer_linear_params == 160
    # 7B: per layer 4·4096² + 3·4096·11008 = 67,108,864 + 135,266,304 = 202,375,168
    assert LLAVA_15_7B.layer_linear_params == 202_375_168
    # + 2 norms (8,192) = 202,383,360 per layer; ·32 = 6,476,267,520; + lm_head and embeddings 2·32064·4096 =
    # 262,668,288; + final norm 4096  ->  6,738,939,904 parameters (the known 6.74B of Vicuna-7B in LLaVA-1.5)
    assert param_count(LLAVA_15_7B) == 6_738_939_904
    assert weight_bytes(LLAVA_15_7B) == 2 * 6_738_939_904
    assert param_count(LLAVA_15_7B, include_embedding=False) == 6_738_939_904 - 32064 * 4096


def test_prefill_flops_llava_7b_full():
    f = prefill_flops(LLAVA_15_7B, text_tokens=64, visual_tokens_per_layer=[576] * 32)
    # n = 640. One layer's linear FLOPs:
    #   2·640·(4·4096²) = 2·640·67,108,864 = 85,899,345,920
    # + 2·640·3·4096·11008 = 2·640·135,266,304 = 173,140,869,120   -> 259,040,215,040 per layer
    assert f.linear == 32 * 259_040_215_040 == 8_289_286_881_280
    # attention per layer: 2·2·640²·128·32 = 4·409,600·4,096 = 6,710,886,400
    assert f.attention == 32 * 6_710_886_400 == 214_748_364_800
    # lm_head, last token only: 2·4096·32064
    assert f.lm_head == 262_668_288
    assert f.total == 8_289_286_881_280 + 214_748_364_800 + 262_668_288 == 8_504_297_914_368  # ≈ 8.50 TFLOPs


def test_prefill_flops_pre_llm_64_and_ratio():
    f = prefill_flops(LLAVA_15_7B, 64, [64] * 32)
    # n = 128: linear 32·2·128·202,375,168 = 1,657,857,376,256; attention 32·4·128²·4096 = 8,589,934,592
    assert f.total == 1_657_857_376_256 + 8_589_934_592 + 262_668_288 == 1_666_709_979_136
    ratios = relative_to_full(LLAVA_15_7B, 64, [64] * 32, new_tokens=16, device=H100_SXM)
    assert ratios["prefill_flops"] == pytest.approx(1_666_709_979_136 / 8_504_297_914_368)  # 0.196
    assert ratios["kv_cache_bytes"] == pytest.approx(128 / 640)
    full = relative_to_full(LLAVA_15_7B, 64, [576] * 32, new_tokens=16, device=H100_SXM)
    assert all(r == pytest.approx(1.0) for r in full.values())


def test_prefill_flops_in_llm_is_sum_over_layers():
    tokens = [576, 576] + [30] * 30  # FastV K=2 keeping 30
    f = prefill_flops(LLAVA_15_7B, 64, tokens)
    full, kept = prefill_flops(LLAVA_15_7B, 64, [576] * 32), prefill_flops(LLAVA_15_7B, 64, [30] * 32)
    assert f.total == (2 * (full.total - full.lm_head) + 30 * (kept.total - kept.lm_head)) // 32 + full.lm_head


def test_decode_flops():
    # toy, context 3 tokens, 2 decode steps: step 0 attends over 4 keys, step 1 over 5
    f = decode_flops(TOY, [3], new_tokens=2)
    assert f.linear == 2 * 2 * 160 == 640
    assert f.attention == 2 * 2 * (4 + 5) * 2 * 2 == 144  # 2·2·keys·head_dim·heads summed over steps
    assert f.lm_head == 2 * 2 * 4 * 10 == 160
    # 7B, 640 cached tokens per layer, 2 steps: keys 641 + 642 = 2·640 + 3 = 1283 per layer
    f = decode_flops(LLAVA_15_7B, [640] * 32, new_tokens=2)
    assert f.linear == 2 * 32 * 2 * 202_375_168 == 25_904_021_504
    assert f.attention == 32 * 4 * 128 * 32 * 1283 == 672_661_504
    assert f.lm_head == 2 * 262_668_288
    assert decode_flops(LLAVA_15_7B, [640] * 32, 0).total == 0


def test_kv_cache_bytes():
    # 576 tokens at every layer: 32 layers · 2 (K,V) · 576 · 4096 · 2 bytes = 301,989,888 B ≈ 302 MB
    assert kv_cache_bytes(LLAVA_15_7B, [576] * 32) == 32 * 2 * 576 * 4096 * 2 == 301_989_888
    assert kv_cache_bytes(LLAVA_15_7B, [576] * 32, bytes_per_elem=1) == 150_994_944  # int8 cache
    # FastV K=2 keep 30: 2·576 + 30·30 = 2052 token-layers
    assert kv_cache_bytes(LLAVA_15_7B, [576, 576] + [30] * 30) == 2052 * 2 * 4096 * 2
    # grouped-query attention: only the KV heads are cached
    gqa = ModelShape(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, vocab_size=100)
    assert kv_cache_bytes(gqa, [10, 5]) == 2 * (10 + 5) * (2 * 8) * 2


def test_roofline_time_is_max():
    dev = Device("d", peak_flops=1e12, memory_bandwidth=1e9)
    assert roofline_time(2e12, 1e9, dev) == pytest.approx(2.0)  # compute-bound: 2 s vs 1 s
    assert roofline_time(1e12, 3e9, dev) == pytest.approx(3.0)  # memory-bound: 1 s vs 3 s
    assert roofline_time(0, 0, dev) == 0


def test_prefill_estimate_toy():
    # n = 1 text + 2 visual = 3. Per operator (flops, bytes), 2 bytes per element, kv_dim = 4:
    #   linear   : 2·3·160 = 960 ;  160·2 weights + 2·3·4·2 K/V written = 320 + 48 = 368
    #   attention: 2·2·3·3·2·2 = 144 ;  K/V read 2·3·4·2 = 48
    #   lm_head  : 2·4·10 = 80 ;  4·10·2 = 80
    out = prefill_estimate(TOY, 1, [2], SLOW)
    assert out["flops"] == 960 + 144 + 80 and out["bytes"] == 368 + 48 + 80
    # 100 FLOP/s, 10 B/s: max(9.6, 36.8) + max(1.44, 4.8) + max(0.8, 8) = 49.6 s
    assert out["time_s"] == pytest.approx(36.8 + 4.8 + 8.0)
    # with activations: linear adds 3·(Σ(in+out) − 2·kv_dim) = 3·((8+8+8+8+12+12+12) − 8) = 180 elements,
    # attention adds Q read + O written 2·3·4 = 24, lm_head 1·(4+10) = 14; ·2 bytes
    act = prefill_estimate(TOY, 1, [2], SLOW, include_activations=True)
    assert act["bytes"] == 496 + 2 * (180 + 24 + 14)


def test_decode_estimate_toy():
    # context 3, 2 steps. Step i: linear 320 FLOPs / 160·2 + 2·1·4·2 = 336 B; attention over 4 then 5 keys:
    # 2·2·keys·2·2 = 16·keys FLOPs / 2·keys·4·2 = 16·keys B; lm_head 80 / 80.
    out = decode_estimate(TOY, [3], 2, SLOW)
    assert out["flops"] == 2 * 320 + 16 * (4 + 5) + 2 * 80 == 944
    assert out["bytes"] == 2 * 336 + 16 * (4 + 5) + 2 * 80 == 976
    assert out["time_s"] == pytest.approx(97.6)  # all memory-bound: 976 B / 10 B/s
    assert out["time_per_token_s"] == pytest.approx(48.8)


def test_llava_7b_h100_prefill_time_by_hand():
    # n = 640 -> linear intensity 640 FLOP/B > H100 ridge 989e12/3.35e12 ≈ 295: compute-bound, and attention too;
    # the 1-token lm_head is memory-bound: 32064·4096·2 B / 3.35e12 B/s
    out = prefill_estimate(LLAVA_15_7B, 64, [576] * 32, H100_SXM)
    expected = 32 * (259_040_215_040 + 6_710_886_400) / 989e12 + 262_668_288 / 3.35e12
    assert out["time_s"] == pytest.approx(expected)  # ≈ 8.68 ms
    assert out["time_s"] == pytest.approx(8.677e-3, rel=1e-3)


def test_estimate_fields():
    e = estimate(LLAVA_15_7B, 64, [576] * 32, new_tokens=16, device=A100_80GB_SXM)
    assert e["decode_steps"] == 15  # the first new token comes out of prefill
    assert e["kv_cache_bytes"] == 32 * 2 * 640 * 4096 * 2  # 335,544,320
    assert e["weight_bytes"] == 13_477_879_808
    assert e["total_time_s"] == pytest.approx(e["prefill_time_s"] + 15 * e["decode_time_per_token_s"])
    # decode is memory-bound: per step at least the streamed weights (no embedding table) over the bandwidth
    streamed = weight_bytes(LLAVA_15_7B, include_embedding=False)
    assert e["decode_time_per_token_s"] > streamed / A100_80GB_SXM.memory_bandwidth
    assert e["prefill_flops"] == 8_504_297_914_368
    assert estimate(LLAVA_15_7B, 64, [576] * 32, 1, H100_SXM)["decode_time_s"] == 0


def test_tokens_per_layer_helpers():
    assert visual_tokens_per_layer_for("pre-LLM", 64, 32) == [64] * 32
    fastv = visual_tokens_per_layer_for("in-LLM", 30, 32, prune_layer=2)
    assert fastv == [576, 576] + [30] * 30
    assert layer_average(fastv) == pytest.approx((2 * 576 + 30 * 30) / 32)  # 64.125
    assert visual_tokens_per_layer_for("in_llm", 98, 32, prune_layer=0) == [98] * 32
    # FastV K=2: (2·576 + 30·x)/32 = k  ->  x = (32k − 1152)/30: 192 -> 166.4, 128 -> 98.13, 64 -> 29.87
    assert kept_for_layer_average(192, 32, 2) == pytest.approx(4992 / 30)
    assert kept_for_layer_average(64, 32, 2) == pytest.approx(896 / 30)
    # SparseVLM "192": 3 layers at 576, 4 at 300, 9 at 200, 16 at 110
    s = staged_tokens_per_layer(32, 576, {3: 300, 7: 200, 16: 110})
    assert s == [576] * 3 + [300] * 4 + [200] * 9 + [110] * 16
    assert layer_average(s) == pytest.approx((3 * 576 + 4 * 300 + 9 * 200 + 16 * 110) / 32)  # 202.75
    with pytest.raises(ValueError):
        visual_tokens_per_layer_for("in-LLM", 30, 32)  # prune_layer missing
    with pytest.raises(ValueError):
        visual_tokens_per_layer_for("mid-LLM", 30, 32)
    with pytest.raises(ValueError):
        prefill_flops(LLAVA_15_7B, 64, [576] * 31)  # one entry per layer


def test_from_text_config_matches_a_real_tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    shape = ModelShape.from_text_config(cfg)
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (2, 64, 128)
    assert (shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size) == (4, 2, 16, 100)
    assert ModelShape.from_text_config(transformers.LlavaConfig(text_config=cfg)) == shape
    # the parameter count of the analytic shape equals the real module's
    model = transformers.LlamaForCausalLM(cfg)
    assert param_count(shape) == sum(p.numel() for p in model.parameters())
    assert ModelShape.from_text_config(transformers.LlamaConfig(**{**cfg.to_dict(), "head_dim": 32})).head_dim == 32
