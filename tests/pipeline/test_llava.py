import json

import torch

from vtc import cost
from vtc.benchmarks import read_common_parquet
from vtc.models import llava
from vtc.pipeline.encode import encode_dataset, expected_encode_key
from vtc.pipeline.efficiency import predicted_cost
from vtc.pipeline.evaluate import evaluate, generate_predictions
from vtc.pipeline.prepare import prepare_dataset
from vtc.pipeline.reduce import reduce_dataset

MODEL_CFG = {"dtype": "float32", "device": "cpu", "attn_implementation": "sdpa", "revision": None}


def test_cls_attention_equals_eager_attention_of_feature_layer(tiny_model_dir, shapes_dir):
    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    images = [row["image"] for row in read_common_parquet(shapes_dir / "test.parquet").select(range(3))]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    encoded = llava.encode(model, pixel_values)
    model.model.vision_tower.set_attn_implementation("eager")
    attentions = model.model.vision_tower(pixel_values, output_attentions=True).attentions
    reference = attentions[llava.feature_layer_index(model)][:, :, 0, 1:]
    torch.testing.assert_close(encoded.cls_attention, reference)
    assert encoded.projected.shape == (3, 576, model.config.text_config.hidden_size)
    # hidden_states[-2] of a 4-layer tower is the output of layer index 2
    assert llava.feature_layer_index(model) == model.config.vision_config.num_hidden_layers - 2


def test_spliced_sequence_has_exactly_k_image_tokens(tiny_model_dir):
    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    prompts = [llava.user_turn(processor, "how many circles are there ?")] * 2
    prompt_length = len(processor.tokenizer(prompts[0])["input_ids"])
    visual = [torch.randn(64, model.config.text_config.hidden_size), torch.randn(10, model.config.text_config.hidden_size)]
    embeds, mask = llava.splice_visual_tokens(model, processor.tokenizer, prompts, visual)
    assert embeds.shape[1] == prompt_length - 1 + 64
    assert mask.sum(dim=1).tolist() == [prompt_length - 1 + 64, prompt_length - 1 + 10]
    assert mask[1, : 64 - 10].sum() == 0  # left padding


def test_full_through_pipeline_generates_what_plain_generate_does(tiny_model_dir, shapes_dir, tmp_path):
    model_cfg = {**MODEL_CFG, "path": str(tiny_model_dir)}
    dataset = tmp_path / "shapes.parquet"
    prepare_dataset("shapes", str(shapes_dir), "test", None, None, 0, dataset)
    encode_dataset(dataset, model_cfg, tmp_path / "encode", batch_size=5, shard_size=7)
    reduce_dataset(tmp_path / "encode", expected_encode_key(model_cfg), "full", 576, {}, 0, tmp_path / "reduce")
    shards = [(tmp_path / f"{i}.jsonl", tmp_path / f"{i}.json") for i in range(2)]
    for shard, (predictions, stats) in enumerate(shards):
        generate_predictions(dataset, "shapes", tmp_path / "reduce", model_cfg, 4, shard, 2, predictions, stats)
    run_info = {"model": "tiny", "dataset": "shapes", "method": "full", "budget": 576}
    evaluate(
        dataset, "shapes", tmp_path / "reduce", [p for p, _ in shards], [s for _, s in shards], tmp_path / "p.jsonl",
        tmp_path / "m.json", run_info, model_cfg, {"mode": "disabled", "group": "test", "dir": str(tmp_path)}, "H100",
    )
    pipeline = {r["id"]: r["prediction"] for r in map(json.loads, open(tmp_path / "p.jsonl"))}
    assert list(pipeline) == read_common_parquet(dataset)["id"]  # merged back in dataset order

    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    text_tokens = new_tokens = 0
    for row in read_common_parquet(dataset):
        inputs = processor(images=[row["image"]], text=[llava.user_turn(processor, row["question"])], return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        plain = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert pipeline[row["id"]] == plain, row["id"]
        # the processor expands <image> to 576 ids; one row alone stops right after its EOS
        text_tokens += (inputs["input_ids"] != model.config.image_token_id).sum().item()
        new_tokens += generated.shape[1] - inputs["input_ids"].shape[1]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["vision_tower_calls"] == 0
    assert metrics["num_visual_tokens"] == [576]
    assert metrics["shards"] == 2 and metrics["n"] == len(pipeline)
    assert metrics["positions"] == "renumbered"  # the default of a method that reduces before the LLM

    stats = [json.loads(path.read_text()) for _, path in shards]
    assert sum(s["text_tokens"] for s in stats) == text_tokens and sum(s["new_tokens"] for s in stats) == new_tokens
    assert {s["attn_implementation"] for s in stats} == {"sdpa"} and metrics["attn_implementation"] == "sdpa"
    text_mean, new_mean = text_tokens / metrics["n"], new_tokens / metrics["n"]
    assert metrics["cost"] == predicted_cost(model.config.text_config, "float32", 576, text_mean, new_mean, "H100")
    shape = cost.ModelShape.from_text_config(model.config, bytes_per_param=4)
    layers = [576] * shape.num_layers
    assert metrics["cost"]["visual_tokens_per_layer"] == layers
    assert metrics["cost"]["prefill_flops"] == cost.prefill_flops(shape, round(text_mean), layers).total
    assert metrics["cost"]["kv_cache_bytes"] == cost.kv_cache_bytes(shape, [round(text_mean) + 576] * shape.num_layers)


def test_original_positions_run_through_the_pipeline_and_are_recorded(
    tiny_model_dir, shapes_dir, tmp_path, monkeypatch
):
    from vtc.methods import resolved_hparams

    model_cfg = {**MODEL_CFG, "path": str(tiny_model_dir)}
    dataset = tmp_path / "shapes.parquet"
    prepare_dataset("shapes", str(shapes_dir), "test", None, 5, 0, dataset)
    encode_dataset(dataset, model_cfg, tmp_path / "encode", batch_size=5, shard_size=8)
    hparams = resolved_hparams("cluster", {"iters": 2, "positions": "original"})  # what the workflow passes
    # the method function never gets `positions` (it would raise TypeError): reduce keeps it for generate, in the key
    key = expected_encode_key(model_cfg)
    manifest = reduce_dataset(tmp_path / "encode", key, "cluster", 16, hparams, 0, tmp_path / "r")
    assert manifest["key"]["hparams"]["positions"] == "original"
    calls = []
    original = llava.generate_ids_original_positions
    monkeypatch.setattr(llava, "generate_ids_original_positions", lambda *a, **k: calls.append(1) or original(*a, **k))
    predictions, stats = tmp_path / "0.jsonl", tmp_path / "0.json"
    shard = generate_predictions(dataset, "shapes", tmp_path / "r", model_cfg, 4, 0, 1, predictions, stats)
    assert shard["positions"] == "original"
    assert len(calls) == 2  # 5 questions in batches of 4
    run_info = {"model": "tiny", "dataset": "shapes", "method": "cluster", "budget": 16, "hparams": hparams}
    wandb = {"mode": "disabled", "group": "test", "dir": str(tmp_path)}
    evaluate(
        dataset, "shapes", tmp_path / "r", [predictions], [stats], tmp_path / "p.jsonl", tmp_path / "m.json", run_info,
        model_cfg, wandb, "H100",
    )  # fmt: skip
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["positions"] == "original" and metrics["hparams"]["positions"] == "original"
    assert metrics["num_visual_tokens"] == [16] and metrics["n"] == 5


def test_generated_lengths_end_at_the_first_eos():
    ids = torch.tensor([[5, 3, 0, 0], [5, 6, 7, 8], [3, 3, 3, 3], [0, 0, 3, 0]])
    assert llava.generated_lengths(ids, 3) == [2, 4, 1, 3]  # padding (0 here, or EOS itself) is never counted
    assert llava.generated_lengths(ids, [3, 8]) == [2, 4, 1, 3]
    assert llava.generated_lengths(ids, [6]) == [4, 2, 4, 4]
    assert llava.generated_lengths(ids, None) == [4, 4, 4, 4]


def test_batched_generation_counts_tokens_as_each_row_alone(tiny_model_dir):
    """Exact text and generated-token counts in a left-padded batch whose rows stop at different steps."""
    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    questions = ["how many circles are there ?", "where is the circle relative to the green object ?", "is it red ?"]
    prompts = [llava.user_turn(processor, q) for q in questions]
    g = torch.Generator().manual_seed(0)
    visual = [torch.randn(k, model.config.text_config.hidden_size, generator=g) for k in (8, 3, 5)]
    free = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=6)
    # Make row 0's third token a second EOS: that row stops after 3 tokens and is padded while the others go on.
    model.generation_config.eos_token_id = [model.generation_config.eos_token_id, free.ids[0, 2].item()]
    batch = llava.generate_ids(model, processor, prompts, visual, max_new_tokens=6)
    assert batch.new_tokens[0] == 3 < batch.ids.shape[1]
    for row, (prompt, tokens) in enumerate(zip(prompts, visual)):
        alone = llava.generate_ids(model, processor, [prompt], [tokens], max_new_tokens=6)
        assert batch.new_tokens[row] == alone.new_tokens[0] == alone.ids.shape[1]  # alone, generate stops at EOS
        assert torch.equal(batch.ids[row, : alone.ids.shape[1]], alone.ids[0])
        assert batch.text_tokens[row] == len(processor.tokenizer(prompt)["input_ids"]) - 1
    assert len(set(batch.text_tokens)) > 1
