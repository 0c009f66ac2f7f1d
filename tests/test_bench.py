import json

import pytest
import torch

from vtc import bench, cost

TIMINGS = ("reduce_ms", "prefill_ms", "decode_ms", "decode_tokens_per_s", "e2e_ms", "e2e_ms_per_sample")
FIGURES = TIMINGS + ("peak_memory_mb", "peak_memory_growth_mb")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--random-tiny", "--device", "cpu", "--methods", "full,cluster", "--budgets", "64"]
    argv += ["--repeats", "1", "--warmup", "1", "--new-tokens", "4", "--out", str(out)]
    printed = bench.main(argv)
    return printed, json.loads(out.read_text())


def test_json_has_every_figure_for_every_record(result):
    printed, saved = result
    assert saved == json.loads(json.dumps(printed))  # what was written is what was returned
    machine, settings = saved["machine"], saved["settings"]
    for key in ("cpu_model", "logical_cpus", "torch", "transformers"):
        assert machine[key], key
    assert settings["dtype"] == "float32" and settings["attn_implementation"] == "sdpa"
    assert settings["batch_size"] == 1 and settings["decode_steps"] == 3
    assert settings["encode_ms"]["median"] > 0
    assert [(r["method"], r["budget"]) for r in saved["records"]] == [("full", 576), ("cluster", 64)]
    for record in saved["records"]:
        for figure in FIGURES:
            stats = record[figure]
            assert stats["n"] == 1 and len(stats["values"]) == 1, figure
            assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"], figure
        for figure in TIMINGS:
            assert record[figure]["median"] > 0, figure
        assert record["peak_memory_mb"]["median"] > 0
        assert record["predicted"]["prefill_flops"] > 0 and record["predicted"]["prefill_speedup"] >= 1


def test_token_counts_and_speedups(result):
    _, saved = result
    text = saved["settings"]["text_tokens"]
    layers = saved["settings"]["model_shape"]["num_layers"]
    full, reduced = saved["records"]
    for record, k in ((full, 576), (reduced, 64)):
        assert record["visual_tokens"] == k
        assert record["sequence_length"] == text + k
        assert record["visual_tokens_per_layer"] == [k] * layers
    assert full["prefill_speedup_vs_full"] == 1
    assert full["predicted"]["prefill_speedup"] == 1
    # 64 of 576 visual tokens: the FLOPs model predicts a large saving, and fewer tokens must not cost more
    assert reduced["predicted"]["prefill_speedup"] > 3
    assert reduced["reduce_fraction_of_full_prefill"] == pytest.approx(
        reduced["reduce_ms"]["median"] / full["prefill_ms"]["median"]
    )


def test_greedy_loop_generates_what_generate_does():
    """The timed prefill + decode loop does the work of `model.generate` (same tokens, same cache use)."""
    from vtc.models import tiny

    config = tiny.build_config(tiny.build_tokenizer())
    model = bench.random_model(config, torch.float32, torch.device("cpu"), "sdpa", seed=0)
    ids, position = bench.token_id_prompt(config, text_tokens=12, batch_size=2, seed=0)
    assert (ids == config.image_token_id).sum(dim=1).tolist() == [1, 1] and ids.shape == (2, 13)
    visual = torch.randn(2, 10, config.text_config.hidden_size)
    text = model.get_input_embeddings()(ids)
    embeds = torch.cat([text[:, :position], visual, text[:, position + 1 :]], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    ours = bench.greedy(model, embeds, mask, new_tokens=5)
    reference = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert ours.shape == (2, 5)
    assert torch.equal(ours[:, : reference.shape[1]], reference)  # generate may stop early at EOS


def test_random_7b_config_has_the_llava_15_7b_shape():
    config = bench.llava_15_7b_config()
    assert cost.ModelShape.from_text_config(config) == cost.LLAVA_15_7B
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.intermediate_size) == (
        1024, 24, 16, 4096,
    )  # fmt: skip
    assert (vision.image_size // vision.patch_size) ** 2 == 576
    assert config.image_token_id == 32000 and config.vision_feature_layer == -2


def test_method_specs_carry_hyperparameters():
    assert bench.parse_method("cluster:iters=3:init=grid") == (
        "cluster:iters=3:init=grid",
        "cluster",
        {"iters": 3, "init": "grid"},
    )
    assert bench.parse_method("random") == ("random", "random", {})
    with pytest.raises(ValueError):
        bench.parse_method("cluster:iters")
