"""The predicted cost every evaluate run writes, checked by hand on a toy shape, and the measure_cost settings."""

import json
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from vtc import bench, cost
from vtc.pipeline.efficiency import bench_argv, measure, predicted_cost

# 2 layers, d = 4, MLP width 8, 2 heads of 2, vocabulary 10, float32 (4 bytes). Weights of one layer's linear
# maps: q, k, v, o 4·4 each + gate, up, down 4·8 each = 64 + 96 = P = 160.
TOY = LlamaConfig(
    num_hidden_layers=2, hidden_size=4, intermediate_size=8, num_attention_heads=2, num_key_value_heads=2,
    vocab_size=10, head_dim=2,
)  # fmt: skip


def test_predicted_cost_by_hand():
    # means 3.4 text and 2.6 new tokens -> a request of 3 text tokens, k = 5 visual, 3 new tokens (2 decode steps)
    c = predicted_cost(TOY, "float32", 5, text_tokens_mean=3.4, new_tokens_mean=2.6, device_preset="H100")
    assert (c["request_text_tokens"], c["request_new_tokens"]) == (3, 3)
    assert c["visual_tokens_per_layer"] == [5, 5] and c["visual_tokens_layer_avg"] == 5.0
    # prefill, n = 8 per layer: linear 2·8·160 = 2560, attention 4·8²·2·2 = 1024; 2 layers; lm_head 2·4·10 = 80
    assert c["prefill_flops"] == 2 * (2560 + 1024) + 80 == 7248
    # 2 decode steps over a cache of 8: linear 2·2·2·160 = 1280; attention 4·2·2·((8+1) + (8+2))·2 layers = 608;
    # lm_head 2·2·4·10 = 160
    assert c["decode_flops"] == 1280 + 608 + 160 == 2048
    # K and V of 8 tokens, 4 wide, 4 bytes, 2 layers
    assert c["kv_cache_bytes"] == 2 * 2 * 8 * 4 * 4 == 512
    # Far below the H100 ridge point, so every operator is memory-bound: time = bytes / 3.35 TB/s.
    # prefill per layer: weights 640 + K/V written 256 + K/V read 256; lm_head weights 160
    assert c["prefill_time_s"] == pytest.approx((2 * (640 + 256 + 256) + 160) / 3.35e12)
    # decode step i per layer: weights 640 + one token's K/V 32 + K/V read 32·(9 + i); lm_head 160
    assert c["decode_time_s"] == pytest.approx((2 * (672 + 288) + 160 + 2 * (672 + 320) + 160) / 3.35e12)
    assert c["device"] == "H100 SXM" and c["bytes_per_param"] == 4


def test_predicted_cost_is_vtc_cost_for_the_model_shape():
    c = predicted_cost(TOY, "float16", 64, text_tokens_mean=30.0, new_tokens_mean=4.0, device_preset="A100")
    shape = cost.ModelShape.from_text_config(TOY, bytes_per_param=2)
    estimate = cost.estimate(shape, 30, [64, 64], 4, cost.A100_80GB_SXM)
    for key in ("prefill_flops", "decode_flops", "kv_cache_bytes", "prefill_time_s", "decode_time_s"):
        assert c[key] == estimate[key], key


def test_unknown_device_preset_names_the_config_key():
    with pytest.raises(ValueError, match="config key 'efficiency.device_preset': 'B200'"):
        predicted_cost(TOY, "float32", 5, 3.0, 3.0, "B200")


def test_bench_arguments_follow_the_config():
    model = {
        "path": "org/llava",
        "revision": "abc123",
        "dtype": "float16",
        "device": "cuda",
        "attn_implementation": "eager",
    }
    settings = {"batch_size": 2, "new_tokens": 8, "warmup": 1, "repeats": 3}
    argv = bench_argv(model, [192, 64], settings, threads=4, seed=7, plugins=["my_methods/x.py"])
    args = bench.parse_args(argv)
    assert (args.model, args.revision, args.dtype, args.device, args.attn) == (
        "org/llava",
        "abc123",
        "float16",
        "cuda",
        "eager",
    )
    assert (args.budgets, args.batch_size, args.new_tokens, args.warmup, args.repeats) == ("192,64", 2, 8, 1, 3)
    assert (args.threads, args.seed, args.plugins, args.device_preset) == (4, 7, ["my_methods/x.py"], "auto")


def test_measure_labels_records_by_config_method_name(tiny_model_dir, tmp_path):
    model = {
        "path": str(tiny_model_dir),
        "revision": None,
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": "sdpa",
    }
    settings = {"batch_size": 1, "new_tokens": 2, "warmup": 0, "repeats": 1}
    out = tmp_path / "efficiency" / "tiny" / "measured.json"
    fastv_kept = {"method": "fastv", "budget_mode": "kept"}
    cluster_original = {"method": "cluster", "iters": 2, "positions": "original"}
    methods = {"full": None, "cluster": {"iters": 2}, "tome": {}, "fastv_kept": fastv_kept, "c_orig": cluster_original,
               "cdpruner": {"relevance": "llm"}}  # fmt: skip
    measure("tiny", model, methods, [16], settings, 1, 0, [], out)
    saved = json.loads(out.read_text())
    assert saved["model"] == "tiny"
    # tome runs inside the vision tower, vtc.bench starts after it; cdpruner needs each question
    assert saved["not_measured"] == ["tome", "cdpruner"]
    assert [(r["label"], r["method"], r["hparams"], r["budget"]) for r in saved["records"]] == [
        ("full", "full", {}, 576),
        ("cluster", "cluster", {"iters": 2}, 16),
        ("fastv_kept", "fastv", {"budget_mode": "kept"}, 16),  # the hparams its evaluate runs use
        ("c_orig", "cluster", {"iters": 2, "positions": "original"}, 16),  # timed at its original positions
    ]
    assert saved["records"][2]["visual_tokens_per_layer"] == [576, 576, 16, 16]
    assert saved["settings"]["attn_implementation"] == "sdpa" and "--model" in saved["settings"]["bench_args"]


def test_config_schema_offers_exactly_the_cost_presets():
    schema = yaml.safe_load((Path(__file__).resolve().parents[2] / "workflow/schemas/config.schema.yaml").read_text())
    assert schema["properties"]["efficiency"]["properties"]["device_preset"]["enum"] == list(cost.PRESETS)
