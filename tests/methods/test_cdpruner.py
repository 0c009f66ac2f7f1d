import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from vtc.methods import HparamError, get_method, method_stage
from vtc.methods.cdpruner import (
    clip_embeddings,
    conditional_kernel,
    dpp_greedy,
    relevance_scores,
)

CHANNELS = 6  # the `make_tokens` features' width, the tiny CLIP's vision width (conftest `clip_dir`)


def test_relevance_is_the_negated_cosine_min_max_normalised_per_row():
    # patches (1,0), (0,1), (-1,0) against the question (2,0): cosines 1, 0, -1, negated -1, 0, 1, spread 2
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    r = relevance_scores(image, torch.tensor([[[2.0, 0.0]]]))
    torch.testing.assert_close(r, torch.tensor([[0.5e-6, 0.5 + 0.5e-6, 1 + 0.5e-6]]))
    # two segments (1,0) and (0,1): mean cosines 0.5, 0.5, -0.5 -> negated -0.5, -0.5, 0.5
    two = relevance_scores(image, torch.tensor([[[1.0, 0.0], [0.0, 3.0]]]))
    torch.testing.assert_close(two, torch.tensor([[0.5e-6, 0.5e-6, 1 + 0.5e-6]]))
    # a second row with a wider spread does not change the first (the reference's min-max spans the batch)
    pair = relevance_scores(torch.cat([image, 5 * image]), torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]]))
    torch.testing.assert_close(pair[0], r[0])
    # all equal: relevance 1
    assert relevance_scores(torch.ones(1, 3, 2), torch.ones(1, 1, 2)).tolist() == [[1.0, 1.0, 1.0]]


def test_greedy_map_trades_relevance_for_diversity():
    # unit tokens (1,0,0), (cos 30, sin 30, 0), (0,0,1) with relevance 1, 1, 0.6. L = diag(r) S diag(r):
    # step 1: diagonal 1, 1, 0.36 -> the tie goes to token 0.
    # step 2: conditional variances L_jj - L_j0^2 / L_00: token 1: 1 - cos^2(30) = 0.25; token 2: 0.36 - 0 = 0.36 -> 2,
    # although token 1 is the more relevant one.
    # step 3: token 1's part orthogonal to tokens 0 and 2: sin^2(30) = 0.25
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    projected = torch.tensor([[[1.0, 0.0, 0.0], [c, s, 0.0], [0.0, 0.0, 1.0]]])
    kernel = conditional_kernel(projected, torch.tensor([[1.0, 1.0, 0.6]]))
    assert dpp_greedy(kernel, 2).tolist() == [[0, 2]]
    assert dpp_greedy(kernel, 3).tolist() == [[0, 2, 1]]
    # each pick's gain is the log det ratio: the picked set's determinant is the product of the picked variances
    picked = [0, 2, 1]
    assert torch.det(kernel[0][picked][:, picked]).item() == pytest.approx(1 * 0.36 * 0.25, rel=1e-4)


def test_exhausted_rank_falls_back_to_relevance():
    # tokens (1,0), (1,0), (0,1), (-1,0) in 2 dimensions, relevance 1, 0.9, 0.5, 0.8: after 0 and 2 the kernel has no
    # rank left (1 and 3 are multiples of 0), so the rest go by relevance: 1 (0.9), then 3 (0.8).
    projected = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    kernel = conditional_kernel(projected, torch.tensor([[1.0, 0.9, 0.5, 0.8]]))
    order = dpp_greedy(kernel, 4)
    assert order.tolist() == [[0, 2, 1, 3]]
    assert not torch.isnan(kernel).any()


def test_cdpruner_keeps_the_dpp_picks_in_spatial_order(make_tokens, clip_dir):
    tokens = make_tokens(2, (3, 3), 5)
    tokens = dataclasses.replace(tokens, questions=("how many circles are there ?", "where is the red square ?"))
    reduced = get_method("cdpruner")(tokens, 4, clip_model=clip_dir)
    from vtc.methods.cdpruner import _clip

    model, tokenizer = _clip(clip_dir)
    image, text = clip_embeddings(model, tokenizer, tokens.features, tokens.questions)
    expected = dpp_greedy(conditional_kernel(tokens.projected, relevance_scores(image, text)), 4).sort(dim=-1).values
    kept = reduced.sources.float().argmax(dim=-1)
    assert torch.equal(kept, expected)
    assert torch.equal(reduced.tokens, tokens.projected[torch.arange(2)[:, None], expected])
    assert method_stage("cdpruner") == "question"


def test_long_questions_are_embedded_in_segments_of_the_text_towers_positions(clip_dir):
    # 13 words + no special tokens with width 8: two segments (8 + 5 padded with id 0, mask 0)
    from vtc.methods.cdpruner import _clip

    model, tokenizer = _clip(clip_dir)
    question = "how many circles are there ? where is the red square ? how"
    ids = torch.tensor(tokenizer(question)["input_ids"])
    assert len(ids) == 13
    segments = []
    for part in (ids[:8], ids[8:]):
        padded = torch.cat([part, torch.zeros(8 - len(part), dtype=torch.long)])
        mask = (torch.arange(8) < len(part)).long()
        with torch.no_grad():
            out = model.get_text_features(input_ids=padded[None], attention_mask=mask[None])
        segments.append(F.normalize(getattr(out, "pooler_output", out)[0], dim=-1))
    _, text = clip_embeddings(model, tokenizer, torch.zeros(1, 2, CHANNELS), [question])
    torch.testing.assert_close(text[0, 0], (segments[0] + segments[1]) / 2, rtol=1e-5, atol=1e-6)


def test_batch_gives_each_question_its_own_result(make_tokens, one_image, clip_dir):
    questions = ("how many circles are there ?", "where is the red square ?", "how many circles are there ?")
    tokens = dataclasses.replace(make_tokens(3, (4, 4), 5, seeds=[7, 8, 7]), questions=questions)
    batched = get_method("cdpruner")(tokens, 5, clip_model=clip_dir)
    for b in range(3):
        alone = dataclasses.replace(one_image(tokens, b), questions=questions[b : b + 1])
        single = get_method("cdpruner")(alone, 5, clip_model=clip_dir)
        assert torch.equal(batched.sources[b], single.sources[0])
        torch.testing.assert_close(batched.tokens[b], single.tokens[0], rtol=0, atol=0)


def test_bad_settings_are_refused(make_tokens, clip_dir):
    tokens = make_tokens(1, (3, 3), 5)
    with pytest.raises(ValueError, match="one question per row"):
        get_method("cdpruner")(tokens, 4, clip_model=clip_dir)
    asked = dataclasses.replace(tokens, questions=("how ?",))
    with pytest.raises(HparamError, match="relevance must be one of clip, llm"):
        get_method("cdpruner")(asked, 4, relevance="text")
    with pytest.raises(ValueError, match="needs the LLaVA model"):
        get_method("cdpruner")(asked, 4, relevance="llm")
    with pytest.raises(ValueError, match=r"N = 9\b.*budget = 10$"):
        get_method("cdpruner")(asked, 10, clip_model=clip_dir)


def test_cdpruner_runs_per_question_through_the_pipeline(tiny_model_dir, shapes_dir, tmp_path):
    """The demo model's setting (relevance from the LLM's embeddings): one reduced sequence per question, which
    generate finds by question id; two questions about one image may keep different tokens."""
    import json

    from vtc.cache import Store
    from vtc.pipeline.encode import encode_dataset, expected_encode_key
    from vtc.pipeline.evaluate import generate_predictions
    from vtc.pipeline.prepare import prepare_dataset
    from vtc.pipeline.reduce import read_reduced, reduce_dataset, reduce_questions

    model_cfg = {"path": str(tiny_model_dir), "dtype": "float32", "device": "cpu", "attn_implementation": "sdpa"}
    dataset = tmp_path / "shapes.parquet"
    prepare_dataset("shapes", str(shapes_dir), "test", None, 12, 0, dataset)
    encode_dataset(dataset, model_cfg, tmp_path / "encode", batch_size=12, shard_size=4)
    key = expected_encode_key(model_cfg)
    with pytest.raises(ValueError, match="reduce_questions"):
        reduce_dataset(tmp_path / "encode", key, "cdpruner", 16, {"relevance": "llm"}, 0, tmp_path / "x")
    manifest = reduce_questions(
        tmp_path / "encode", key, dataset, model_cfg, "cdpruner", 16, {"relevance": "llm"}, 0, tmp_path / "r",
        batch_size=5,
    )  # fmt: skip
    assert manifest["entries"] == "question" and manifest["num_questions"] == 12 and manifest["num_tokens"] == [16]
    from vtc.benchmarks import read_common_parquet

    rows = read_common_parquet(dataset).select_columns(["id", "image_id"]).to_list()
    store = Store.open(tmp_path / "r")
    assert sorted(store.image_ids) == sorted(r["id"] for r in rows)
    stats = generate_predictions(dataset, "shapes", tmp_path / "r", model_cfg, 5, 0, 1, tmp_path / "p.jsonl",
                                 tmp_path / "s.json")  # fmt: skip
    assert stats["n"] == 12 and stats["vision_tower_calls"] == 0
    assert all(json.loads(line)["prediction"] is not None for line in open(tmp_path / "p.jsonl"))
    # the same image asked two different questions: the relevance differs, so (here) do the kept tokens
    kept = {}
    for ids, images in read_reduced(store):
        for question_id, image in zip(ids, images):
            kept[question_id] = image.sources.any(dim=0)
    image_of = {r["id"]: r["image_id"] for r in rows}
    shared = [q for q in kept if sum(image_of[p] == image_of[q] for p in kept) > 1]
    assert shared and any(not torch.equal(kept[p], kept[q]) for p in shared for q in shared
                          if image_of[p] == image_of[q] and p != q)  # fmt: skip
