import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised demo-architecture LLaVA saved with `save_pretrained`, as a hub checkpoint is."""
    from vtc.models.tiny import build_model, build_processor

    path = tmp_path_factory.mktemp("tiny-llava")
    processor = build_processor()
    build_model(processor, seed=0).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small shapes test split in the common schema: 40 questions about 11 images."""
    from vtc.data.shapes import generate_split, write_parquet

    path = tmp_path_factory.mktemp("shapes")
    write_parquet(generate_split(40, seed=0, split="test"), path / "test.parquet")
    return path


@pytest.fixture
def run_in_llm_method(tiny_model_dir, shapes_dir, tmp_path):
    """Runs prepare → encode → reduce → generate → evaluate on 5 questions for one in-LLM method and budget with the
    tiny model; returns (metrics.json as a dict, reduce manifest, model config)."""
    import json

    from vtc.pipeline.encode import encode_dataset, expected_encode_key
    from vtc.pipeline.evaluate import evaluate, generate_predictions
    from vtc.pipeline.prepare import prepare_dataset
    from vtc.pipeline.reduce import reduce_dataset

    def run(method: str, budget: int, hparams: dict):
        model_cfg = {"path": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa"}
        dataset = tmp_path / "shapes.parquet"
        prepare_dataset("shapes", str(shapes_dir), "test", None, 5, 0, dataset)
        encode_dataset(dataset, model_cfg, tmp_path / "encode", batch_size=5, shard_size=8)
        key = expected_encode_key(model_cfg)
        manifest = reduce_dataset(tmp_path / "encode", key, method, budget, hparams, 0, tmp_path / "r")
        predictions, stats = tmp_path / "0.jsonl", tmp_path / "0.json"
        generate_predictions(dataset, "shapes", tmp_path / "r", model_cfg, 5, 0, 1, predictions, stats)
        run_info = {"model": "tiny", "dataset": "shapes", "method": method, "budget": budget}
        wandb = {"mode": "disabled", "group": "test", "dir": str(tmp_path)}
        evaluate(
            dataset, "shapes", tmp_path / "r", [predictions], [stats], tmp_path / "p.jsonl", tmp_path / "m.json",
            run_info, model_cfg, wandb, "H100",
        )  # fmt: skip
        assert sum(1 for _ in open(tmp_path / "p.jsonl")) == 5
        return json.loads((tmp_path / "m.json").read_text()), manifest, model_cfg

    return run


@pytest.fixture(scope="module")
def loaded(tiny_model_dir, request):
    """The tiny model, its processor, two prompts of different lengths (a left-padded batch) and, per prompt, `N` random visual tokens (N: the
    requesting test module's constant, small so that in-LLM loop tests stay fast on CPU)."""
    from vtc.models import llava

    model, processor = llava.load_model(str(tiny_model_dir), device="cpu")
    questions = ["how many circles are there ?", "where is the circle relative to the green object ?"]
    prompts = [llava.user_turn(processor, q) for q in questions]
    g = torch.Generator().manual_seed(0)
    visual = [torch.randn(request.module.N, model.config.text_config.hidden_size, generator=g) for _ in questions]
    return model, processor, prompts, visual


@pytest.fixture(scope="session")
def tiny_qwen_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2.5-VL (`vtc.models.tiny_qwen2_5_vl`) saved as a hub checkpoint is."""
    from vtc.models.tiny_qwen2_5_vl import build

    return build(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_next_model_dir(tmp_path_factory):
    """A randomly initialised tiny LLaVA-NeXT (`vtc.models.tiny_llava_next`) saved as a hub checkpoint is."""
    from vtc.models.tiny_llava_next import build

    return build(tmp_path_factory.mktemp("tiny-llava-next"))


@pytest.fixture(scope="session")
def ragged_shapes_dir(shapes_dir, tmp_path_factory):
    """The shapes test split with each image resized to one of several sizes and aspect ratios, so that a model of
    dynamic resolution (Qwen2.5-VL) or any-resolution crops (LLaVA-NeXT) gives the images different token counts."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    sizes = [(96, 96), (140, 70), (70, 112), (84, 84), (56, 126)]
    table = pq.read_table(shapes_dir / "test.parquet")
    images = table.column("image").to_pylist()
    image_ids = table.column("image_id").to_pylist()
    order = {image_id: i for i, image_id in enumerate(dict.fromkeys(image_ids))}
    resized = []
    for image, image_id in zip(images, image_ids):
        picture = Image.open(io.BytesIO(image["bytes"])).resize(sizes[order[image_id] % len(sizes)])
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        resized.append({**image, "bytes": buffer.getvalue()})
    column = table.schema.get_field_index("image")
    field = table.schema.field("image")
    table = table.set_column(column, field, pa.array(resized, type=field.type))
    path = tmp_path_factory.mktemp("ragged-shapes")
    pq.write_table(table, path / "test.parquet")
    return path
