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
