import json

import pytest
import torch

from vtc import bench, cost
from vtc.models import inllm, llava

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


def tiny_inputs(visual_tokens: int = 10):
    """A random demo-shape model and a batch of 2 prompts with `visual_tokens` random vectors spliced in at the
    placeholder: (model, inputs_embeds, attention_mask, image_mask)."""
    from vtc.models import tiny

    config = tiny.build_config(tiny.build_tokenizer())
    model = bench.random_model(config, torch.float32, torch.device("cpu"), "sdpa", seed=0)
    ids, position = bench.token_id_prompt(config, text_tokens=12, batch_size=2, seed=0)
    assert (ids == config.image_token_id).sum(dim=1).tolist() == [1, 1] and ids.shape == (2, 13)
    visual = torch.randn(2, visual_tokens, config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    text = model.get_input_embeddings()(ids)
    embeds = torch.cat([text[:, :position], visual, text[:, position + 1 :]], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    image_mask = torch.zeros(embeds.shape[:2], dtype=torch.bool)
    image_mask[:, position : position + visual_tokens] = True
    return model, embeds, mask, image_mask


def test_greedy_loop_generates_what_generate_does():
    """The timed prefill + decode loop does the work of `model.generate` (same tokens, same cache use)."""
    model, embeds, mask, _ = tiny_inputs()
    ours = bench.greedy(model, embeds, mask, new_tokens=5)
    reference = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert ours.shape == (2, 5)
    assert torch.equal(ours[:, : reference.shape[1]], reference)  # generate may stop early at EOS


def test_in_llm_loop_with_nothing_pruned_generates_what_greedy_does():
    """The timed in-LLM loop keeping all N image tokens does the pre-LLM loop's work, all steps (no EOS stop)."""
    model, embeds, mask, image_mask = tiny_inputs()
    nothing_pruned = inllm.plan("fastv", 10, {"budget_mode": "kept"}, num_layers=4, num_patches=10)
    ours = bench.greedy_in_llm(model, embeds, mask, image_mask, nothing_pruned, new_tokens=12)
    assert ours.shape == (2, 12)
    assert torch.equal(ours, bench.greedy(model, embeds, mask, new_tokens=12))


def test_original_positions_in_the_timed_loop_generate_what_the_pipeline_loop_does():
    """With `positions=original` the timed loop feeds the model's forward the position ids the pipeline's loop
    (`inllm.generate_at_positions`) uses, and gets its tokens."""
    model, embeds, mask, image_mask = tiny_inputs(visual_tokens=3)
    offsets = [torch.tensor([7, 3, 30]), torch.tensor([0, 12, 5])]  # a gapped, unordered placement of 3 of 40
    positions = llava.original_positions(mask, image_mask, offsets, num_patches=40)
    assert positions[0, :9].tolist() == [0, 1, 2, 3, 4 + 7, 4 + 3, 4 + 30, 4 + 40, 4 + 41]  # 4 text tokens first
    ours = bench.greedy(model, embeds, mask, new_tokens=6, position_ids=positions)
    assert torch.equal(ours, inllm.generate_at_positions(model, embeds, mask, positions, 6))


def test_a_pre_llm_method_is_timed_at_its_positions():
    argv = ["--random-tiny", "--device", "cpu", "--methods", "cluster:positions=original", "--budgets", "64"]
    result = bench.main(argv + ["--repeats", "1", "--warmup", "0", "--new-tokens", "2"])
    record = result["records"][1]
    assert record["hparams"] == {"positions": "original"} and record["visual_tokens"] == 64


def test_prefill_clock_splits_one_call_and_removes_its_hooks():
    model, embeds, mask, image_mask = tiny_inputs()
    plan = inllm.plan("dart", 5, {"budget_mode": "kept", "layer": 1}, num_layers=4, num_patches=10)
    assert plan.per_layer == [10, 5, 5, 5]
    lm_head_calls = []
    model.lm_head.register_forward_hook(lambda *_: lm_head_calls.append(bench.clock(model.device)))
    marks = bench.PrefillClock(model, plan.per_layer)
    start = bench.clock(model.device)
    bench.greedy_in_llm(model, embeds, mask, image_mask, plan, new_tokens=4)
    # one lm_head call per new token, the first at the end of prefill, which the selection (layers 0 → 1) precedes
    assert len(lm_head_calls) == 4 and start < marks.prefill_end <= lm_head_calls[1]
    assert marks.boundaries == [1] and 0 < marks.selection() < marks.prefill_end - start
    assert len(model.lm_head._forward_hooks) == 1  # only the test's own: PrefillClock's are gone after prefill
    layers = model.model.language_model.layers
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


@pytest.fixture(scope="module")
def in_llm(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench-inllm.json"
    argv = ["--random-tiny", "--device", "cpu", "--methods", "full,fastv:budget_mode=kept,dart:budget_mode=kept"]
    argv += ["--budgets", "30", "--repeats", "2", "--warmup", "1", "--new-tokens", "4", "--out", str(out)]
    bench.main(argv)
    return json.loads(out.read_text())


def test_in_llm_records_count_tokens_per_layer(in_llm):
    text = in_llm["settings"]["text_tokens"]
    shape = cost.ModelShape(**in_llm["settings"]["model_shape"])
    assert shape.num_layers == 4
    full, fastv, dart = in_llm["records"]
    assert full["stage"] == "tokens" and full["predicted"]["kind"] == "pre-LLM"
    # layers 0, 1 see all 576 image tokens, layers 2, 3 the 30 kept after layer K = 2: (2·576 + 2·30) / 4 = 303
    for record in (fastv, dart):
        assert record["stage"] == "llm" and record["budget"] == 30
        assert record["visual_tokens"] == 30 and record["sequence_length"] == text + 30
        assert record["visual_tokens_per_layer"] == [576, 576, 30, 30]
        assert record["visual_tokens_layer_avg"] == 303
        predicted = record["predicted"]
        assert predicted["kind"] == "in-LLM"
        assert predicted["prefill_flops"] == cost.prefill_flops(shape, text, [576, 576, 30, 30]).total
        assert predicted["kv_cache_bytes"] == cost.kv_cache_bytes(shape, [text + 576] * 2 + [text + 30] * 2)
        assert 1 < predicted["prefill_speedup"] < 2  # half the layers still see every image token


def test_in_llm_selection_is_timed_inside_prefill(in_llm):
    full_prefill = in_llm["records"][0]["prefill_ms"]["median"]
    for record in in_llm["records"][1:]:
        assert record["reduce_ms"]["n"] == 0 and record["reduce_ms"]["median"] is None
        assert record["reduce_fraction_of_full_prefill"] is None
        for prefill, decode, e2e, selection in zip(
            *(record[figure]["values"] for figure in ("prefill_ms", "decode_ms", "e2e_ms", "selection_ms"))
        ):
            assert 0 < selection < prefill and decode > 0
            assert prefill + decode == pytest.approx(e2e)  # one call, split at the end of prefill
        assert record["selection_fraction_of_full_prefill"] == pytest.approx(
            record["selection_ms"]["median"] / full_prefill
        )
    assert "in-LLM rows" in bench.describe(in_llm)
    assert "| fastv:budget_mode=kept | 30 | 30 (layer avg 303) | (" in bench.table(in_llm)


def test_in_llm_budget_is_a_layer_average_by_default():
    argv = ["--random-tiny", "--device", "cpu", "--methods", "fastv", "--budgets", "320"]
    result = bench.main(argv + ["--repeats", "1", "--warmup", "0", "--new-tokens", "2"])
    fastv = result["records"][1]
    # keep = (4·320 − 2·576) / (4 − 2) = 64
    assert fastv["visual_tokens"] == 64 and fastv["visual_tokens_per_layer"] == [576, 576, 64, 64]
    assert fastv["visual_tokens_layer_avg"] == 320
    with pytest.raises(ValueError, match="cannot reach a layer average of 64"):  # the first 2 of 4 layers see 576
        bench.main(["--random-tiny", "--device", "cpu", "--methods", "fastv", "--budgets", "64"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "full,tome"], "'tome'.*vision tower"),
        (["--methods", "cdpruner"], "'cdpruner'.*reduces per question"),
        (["--methods", "prumerge_adaptive"], "'prumerge_adaptive'.*keeps a token count of its own per image"),
        (["--methods", "fastv", "--attn", "flash_attention_2"], "'fastv'.*--attn sdpa or eager"),
        (["--methods", "cluster:positions=gapped"], "positions must be one of original, renumbered, got 'gapped'"),
    ],
)
def test_methods_bench_cannot_time_are_refused_before_loading(extra, message, monkeypatch):
    monkeypatch.setattr(bench, "setup", lambda args: pytest.fail("the model must not load"))
    with pytest.raises(ValueError, match=message):
        bench.main(["--random-tiny", "--device", "cpu", *extra])


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
