"""Every hub benchmark reads its fixture (in the real hub schema) into the common schema."""

import json

import datasets
import pytest
from PIL import Image

from vtc.benchmarks import COMMON_FEATURES, get_benchmark

from bench_cases import CASES


def load(name, fixtures_dir):
    directory, split, _ = CASES[name]
    return get_benchmark(name).load(str(fixtures_dir / directory), split, None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_loads_fixture_into_common_schema(name, fixtures_dir):
    ds = load(name, fixtures_dir)
    assert len(ds) == CASES[name][2]
    assert ds.features == COMMON_FEATURES
    rows = ds.to_list()
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows:
        assert row["image_id"]
        assert row["question"]
        assert row["answers"] and all(isinstance(a, str) for a in row["answers"])
        assert isinstance(json.loads(row["meta"]), dict)
    image = ds[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (16, 16)
    benchmark = get_benchmark(name)
    assert benchmark.prompt(ds[0])  # the prompt works on a loaded (decoded) row


@pytest.mark.parametrize("name", sorted(CASES))
def test_defaults(name):
    benchmark = get_benchmark(name)
    assert benchmark.default_source.startswith("lmms-lab/")
    assert benchmark.default_split == CASES[name][1]
    assert benchmark.notes


def test_generation_lengths_follow_lmms_eval():
    expected = {
        "gqa": 16,
        "pope": 128,
        "mme": 16,
        "scienceqa": 16,
        "textvqa": 128,  # unset in lmms-eval (llava default 1024); LLaVA's script uses 128
        "textvqa_ocr": 128,
        "vqav2": 16,
        "mmbench": 128,  # lmms-eval 1024; LLaVA's script uses 128
        "seedbench": 16,  # unset in lmms-eval (1024); only the first character is scored
        "mmmu": 128,  # lmms-eval 0.7.3 mmmu template (was 16 before the lmms-eval parity tests read the yaml)
    }
    assert {name: get_benchmark(name).max_new_tokens for name in expected} == expected


def test_gqa_joins_images_on_image_id(fixtures_dir):
    ds = load("gqa", fixtures_dir)
    images = datasets.load_dataset(
        "parquet",
        data_files=str(fixtures_dir / "gqa/testdev_balanced_images/testdev-00000-of-00001.parquet"),
        split="train",
    )
    by_id = {row["id"]: row["image"].tobytes() for row in images}
    for row in ds:
        assert row["image"].tobytes() == by_id[row["image_id"]]
    assert ds[0]["family"] == "verify"


def test_mme_numbers_questions_per_image(fixtures_dir):
    rows = load("mme", fixtures_dir).to_list()
    assert [r["id"] for r in rows] == [
        "code_reasoning/0020.png#0",
        "code_reasoning/0020.png#1",
        "existence/000000006040.jpg#0",
        "existence/000000006040.jpg#1",
    ]
    assert rows[0]["image_id"] == rows[1]["image_id"] != rows[2]["image_id"]


def test_pope_families_and_shared_images(fixtures_dir):
    rows = load("pope", fixtures_dir).to_list()
    assert sorted({r["family"] for r in rows}) == ["adversarial", "popular", "random"]
    assert rows[0]["image_id"] == rows[2]["image_id"]  # same COCO image in two categories


def test_scienceqa_letters_and_drops_imageless_rows(fixtures_dir):
    rows = load("scienceqa", fixtures_dir).to_list()
    assert [r["answers"] for r in rows] == [["A"], ["B"], ["C"]]
    assert [r["id"] for r in rows] == ["sqa-test-0", "sqa-test-1", "sqa-test-3"]


def test_vqav2_answers_are_the_ten_strings(fixtures_dir):
    rows = load("vqav2", fixtures_dir).to_list()
    assert rows[0]["answers"] == ["net"] * 8 + ["netting", "nets"]
    assert [r["family"] for r in rows] == ["other", "number", "yes/no"]
    assert rows[0]["image_id"] == rows[1]["image_id"] == "262148"


def test_mmbench_drops_missing_options_and_hints(fixtures_dir):
    rows = load("mmbench", fixtures_dir).to_list()
    metas = [json.loads(r["meta"]) for r in rows]
    assert metas[0]["options"] == {"A": "dog", "B": "cat", "C": "bird"}
    assert metas[0]["hint"] is None and metas[4]["hint"] is None
    assert metas[3]["hint"] == "The man is holding an umbrella."
    assert metas[4]["options"] == {"A": "3", "B": "4"}
    assert rows[0]["image_id"] == rows[1]["image_id"] == rows[2]["image_id"]  # circular copies share the image


def test_seedbench_keeps_image_rows_only(fixtures_dir):
    rows = load("seedbench", fixtures_dir).to_list()
    assert [r["id"] for r in rows] == ["101669", "101670"]
    assert [r["family"] for r in rows] == ["instances_counting", "scene_understanding"]


def test_mmmu_takes_first_referenced_image(fixtures_dir):
    ds = load("mmmu", fixtures_dir)
    source = datasets.load_dataset(
        "parquet", data_files=str(fixtures_dir / "mmmu/data/validation-00000-of-00001.parquet"), split="train"
    )
    meta = json.loads(ds[0]["meta"])
    assert meta["image_used"] == "image_2" and meta["n_images"] == 2
    assert ds[0]["image"].tobytes() == source[0]["image_2"].tobytes()
    assert json.loads(ds[1]["meta"])["image_used"] == "image_1"
    assert [r["family"] for r in ds.to_list()] == ["Art_Theory", "Math", "Accounting"]


def test_single_parquet_file_source(fixtures_dir):
    path = fixtures_dir / "pope/data/test-00000-of-00001.parquet"
    assert len(get_benchmark("pope").load(str(path), "test", None)) == 6


def test_fixture_generator_reproduces_fixtures(tmp_path, fixtures_dir):
    import make_fixtures

    make_fixtures.make_all(tmp_path)
    for name, (directory, split, count) in CASES.items():
        fresh = get_benchmark(name).load(str(tmp_path / directory), split, None)
        committed = load(name, fixtures_dir)
        assert (
            fresh.select_columns(["id", "question", "answers", "meta"]).to_list()
            == committed.select_columns(["id", "question", "answers", "meta"]).to_list()
        )
        assert len(fresh) == count


def test_fixtures_are_small(fixtures_dir):
    total = sum(p.stat().st_size for p in fixtures_dir.rglob("*.parquet"))
    assert total < 200_000


def test_original_image_bytes_survive_load_and_write(tmp_path):
    """JPEG bytes pass through `load` and `write_common_parquet` untouched (no decode / lossy re-encode)."""
    import io

    from make_fixtures import pope as build_pope

    from vtc.benchmarks import read_common_parquet, write_common_parquet

    build_pope(tmp_path)
    path = tmp_path / "pope/data/test-00000-of-00001.parquet"
    source = datasets.load_dataset("parquet", data_files=str(path), split="train")
    buffer = io.BytesIO()
    Image.effect_noise((16, 16), 60).convert("RGB").save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    source = source.cast_column("image", datasets.Image(decode=False)).map(
        lambda row: {"image": {"bytes": jpeg, "path": None}}
    )
    source.to_parquet(str(path))

    rows = get_benchmark("pope").load(str(tmp_path / "pope"), "test", None)
    write_common_parquet(rows, tmp_path / "out.parquet")
    written = read_common_parquet(tmp_path / "out.parquet").cast_column("image", datasets.Image(decode=False))
    assert all(row["image"]["bytes"] == jpeg for row in written)


def test_a_limit_keeps_whole_images_where_the_scorer_scores_per_image(tmp_path, fixtures_dir):
    import math
    import random

    from vtc.pipeline.prepare import prepare_dataset, subsample

    directory, split, _ = CASES["mme"]
    out = tmp_path / "mme.parquet"
    prepare_dataset("mme", str(fixtures_dir / directory), split, None, 3, 0, out)
    rows = datasets.load_dataset("parquet", data_files=str(out), split="train").to_list()
    per_image = {}
    for row in rows:
        per_image.setdefault(row["image_id"], []).append(row["id"])
    assert len(rows) == 4 and all(len(ids) == 2 for ids in per_image.values())  # 3 rounded up to two whole images
    records = [{**row, "prediction": "Yes"} for row in rows]
    assert not math.isnan(get_benchmark("mme").score(records)["total"])
    # whole images drawn until the limit is reached, every question of each; per row where the scorer allows it
    table = [{"image_id": f"i{i // 3}"} for i in range(30)]
    kept = subsample(table, 7, random.Random(1), whole_images=True)
    assert len(kept) == 9 and kept == sorted(kept) and len({table[i]["image_id"] for i in kept}) == 3
    assert len(subsample(table, 7, random.Random(1), whole_images=False)) == 7
