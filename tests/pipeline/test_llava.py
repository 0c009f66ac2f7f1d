import json

import torch

from vtc.benchmarks import read_common_parquet
from vtc.models import llava
from vtc.pipeline.encode import encode_dataset, expected_encode_key
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
        tmp_path / "m.json", run_info, model_cfg, {"mode": "disabled", "group": "test", "dir": str(tmp_path)},
    )
    pipeline = {r["id"]: r["prediction"] for r in map(json.loads, open(tmp_path / "p.jsonl"))}
    assert list(pipeline) == read_common_parquet(dataset)["id"]  # merged back in dataset order

    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    for row in read_common_parquet(dataset):
        inputs = processor(images=[row["image"]], text=[llava.user_turn(processor, row["question"])], return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        plain = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert pipeline[row["id"]] == plain, row["id"]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["vision_tower_calls"] == 0
    assert metrics["num_visual_tokens"] == [576]
    assert metrics["shards"] == 2 and metrics["n"] == len(pipeline)
