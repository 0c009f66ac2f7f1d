"""The demo model's training losses on hand-made inputs, and one tiny run of the CLI's code path."""

import json
import math
import random

import pytest
import torch

from vtc.data import shapes
from vtc.models.tiny import build_processor
from vtc import train


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_patch_colors_mark_object_patches_with_their_colour():
    meta = {"objects": [{"color": "green", "shape": "square", "patches": [0, 25]}, {"color": "red", "shape": "circle", "patches": [575]}]}
    labels = train.patch_colors(meta)
    green, red = 1 + list(shapes.COLORS).index("green"), 1 + list(shapes.COLORS).index("red")
    assert labels[0] == labels[25] == green and labels[575] == red
    assert labels.sum() == 2 * green + red  # everything else is background (0)


def test_patch_positions_run_row_major_from_zero_to_one():
    positions = train.patch_positions()
    assert positions.shape == (576, 2)
    assert positions[0].tolist() == [0, 0] and positions[23].tolist() == [0, 1] and positions[24].tolist() == pytest.approx([1 / 23, 0])
    assert positions[575].tolist() == [1, 1]


def test_answer_mask_covers_answers_and_their_end_tokens_only():
    assistant, eos = [7, 8], 2
    ids = torch.tensor([[5, 7, 8, 30, 31, 2, 5, 7, 8, 40, 2, 0]])
    expected = [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    assert train.answer_mask(ids, assistant, eos)[0].int().tolist() == expected


def test_training_batch_expands_the_image_and_labels_each_answer(processor):
    turns = [[("is there a red circle ?", "yes", [[0]]), ("how many squares are there ?", "2", [[1]])], [("what color is the square ?", "blue", [[2]])]]
    batch = train.training_batch(processor, turns)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ((batch["input_ids"] == image_token_id).sum(dim=1) == 576).all()
    labelled = [processor.tokenizer.convert_ids_to_tokens(row[row != -100]) for row in batch["labels"]]
    assert labelled == [["yes", "</s>", "2", "</s>"], ["blue", "</s>"]]


def test_grounding_loss_is_the_divergence_from_even_attention_on_the_target_patches(processor):
    turns = [[("what color is the square ?", "blue", [[0, 1, 2, 3]])]]
    batch = train.training_batch(processor, turns)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    rows, queries, target = train.answer_queries(batch, turns, image_token_id, num_heads=2)
    assert rows.tolist() == [0] and processor.tokenizer.convert_ids_to_tokens([batch["input_ids"][0, queries[0]]]) == [":"]
    image_positions = (batch["input_ids"][0] == image_token_id).nonzero().flatten()
    for head in range(2):
        assert target[0, head].nonzero().flatten().tolist() == image_positions[:4].tolist()
        assert target[0, head, image_positions[:4]].tolist() == [0.25] * 4
    length = batch["input_ids"].shape[1]
    uniform = torch.full((1, 2, length), 1.0 / length)
    assert train.grounding_loss([uniform], target).item() == pytest.approx(-math.log(4 / length), rel=1e-4)
    assert train.grounding_loss([target, target], target).item() == pytest.approx(0, abs=1e-5)
    # Half the attention on the text: the loss counts it as not looking, whatever the share within the image.
    half = target / 2
    half[0, :, 1] = 0.5
    assert train.grounding_loss([half], target).item() == pytest.approx(math.log(2), rel=1e-4)
    # All of it on one of the four targets: the three ignored ones cost as much as looking away.
    one_patch = torch.zeros_like(target)
    one_patch[0, :, image_positions[0]] = 1.0
    assert train.grounding_loss([one_patch], target).item() > train.grounding_loss([uniform], target).item()
    # A question that names no patch (a negative existence question without hard negatives) is not grounded.
    nothing = torch.zeros_like(target)
    both = train.grounding_loss([torch.cat([target, uniform])], torch.cat([target, nothing]))
    assert both.item() == pytest.approx(0, abs=1e-5)
    assert train.evenly(torch.tensor([[True, False, True], [False] * 3])).tolist() == [[0.5, 0, 0.5], [0, 0, 0]]


def test_a_count_weighs_each_counted_object_the_same_and_leaves_the_first_token_a_share_that_tells_the_count(processor):
    objects = [
        {"shape": "square", "color": "red", "patches": [5, 6, 29, 30]},
        {"shape": "circle", "color": "red", "patches": [40]},
        {"shape": "square", "color": "blue", "patches": [80]},
    ]
    question = "how many squares are there ?"
    counted = train.counted_objects(question, {"objects": objects, "target_patches": [5, 6, 29, 30, 80]})
    assert counted == [[5, 6, 29, 30], [80]]
    with pytest.raises(ValueError, match="not the question's target patches"):
        train.counted_objects(question, {"objects": objects, "target_patches": [40]})
    turns = [[(question, "2", counted), ("what color is the circle ?", "red", [[40]])]]
    batch = train.training_batch(processor, turns)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    _, _, target = train.answer_queries(batch, turns, image_token_id, num_heads=2)
    image_positions = (batch["input_ids"][0] == image_token_id).nonzero().flatten()
    sink, big, small = 2 + train.SINK_MASS, image_positions[[5, 6, 29, 30]], image_positions[80]
    for head in range(2):  # every head: the big square and the one-patch square weigh the same
        assert target[0, head, big].sum().item() == pytest.approx(1 / sink) and target[0, head, big].unique().numel() == 1
        assert target[0, head, small].item() == pytest.approx(1 / sink)
        assert target[0, head, 0].item() == pytest.approx(train.SINK_MASS / sink)  # "USER", the first token
        assert target[0, head].sum().item() == pytest.approx(1)
    assert target[1, :, 0].tolist() == [0, 0]  # other questions have no sink
    firsts = [train.count_target([torch.tensor([p]) for p in range(10, 10 + n)], 0, 20)[0].item() for n in range(1, 5)]
    assert firsts == sorted(firsts, reverse=True) and min(a - b for a, b in zip(firsts, firsts[1:])) > 0.07
    images = train.training_images(shapes.generate_split(200, seed=0, split="train"))
    counts = [turn for image in images for turn in image.turns if train.is_count(turn.question)]
    assert len(counts) > 30 and all(len(turn.targets) == int(turn.answer) for turn in counts)


def test_a_relation_grounds_each_half_of_the_heads_on_one_of_its_two_names(processor):
    objects = [
        {"shape": "square", "color": "red", "patches": [5, 6]},
        {"shape": "circle", "color": "red", "patches": [40]},
        {"shape": "circle", "color": "blue", "patches": [80, 81, 82]},
    ]
    # "square" is the only square, "blue object" the only blue one, "red circle" the only red circle
    assert train.relation_targets("where is the square relative to the blue object ?", objects) == [[5, 6], [80, 81, 82]]
    assert train.relation_targets("where is the red circle relative to the square ?", objects) == [[40], [5, 6]]
    with pytest.raises(ValueError, match="'circle' names 2 objects"):
        train.relation_targets("where is the circle relative to the square ?", objects)

    meta = {"objects": objects, "target_patches": [40, 5, 6]}
    question = "where is the red circle relative to the square ?"
    turns = [[train.Turn(question, "below", [[40], [5, 6]], train.named_objects(question, "below", meta))]]
    batch = train.training_batch(processor, turns)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    names_at = train.name_positions(batch, turns, processor.tokenizer)
    circle, square = names_at[0]
    assert processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, [circle, square]].tolist()) == ["circle", "square"]
    _, _, target = train.answer_queries(batch, turns, image_token_id, num_heads=4, names_at=names_at)
    looked_at = [target[0, head].nonzero().flatten().tolist() for head in range(4)]
    assert looked_at == [[circle], [circle], [square], [square]]
    # heads 0-1 all on "circle", heads 2-3 half on "circle" and half on "square": only heads 2-3 fall short (by
    # log 2), whatever the union of the two names would say
    weights = torch.zeros(1, 4, batch["input_ids"].shape[1])
    weights[0, :2, circle] = 1.0
    weights[0, 2:, [circle, square]] = 0.5
    assert train.grounding_loss([weights], target).item() == pytest.approx(math.log(2) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="3 heads do not split into 2 equal groups"):
        train.answer_queries(batch, turns, image_token_id, num_heads=3, names_at=names_at)
    with pytest.raises(ValueError, match="pass names_at"):
        train.answer_queries(batch, turns, image_token_id, num_heads=4)


def test_every_relation_question_of_the_testbed_names_two_objects_found_in_its_scene():
    images = train.training_images(shapes.generate_split(400, seed=0, split="train"))
    relations = [turn for image in images for turn in image.turns if turn.question.startswith("where is")]
    assert len(relations) > 50
    for groups in (turn.targets for turn in relations):
        assert len(groups) == 2 and all(groups) and groups[0] != groups[1]  # objects may overlap, not coincide


def test_named_objects_point_at_the_last_word_of_each_name():
    objects = [
        {"shape": "square", "color": "red", "patches": [5, 6]},
        {"shape": "circle", "color": "red", "patches": [40]},
        {"shape": "circle", "color": "blue", "patches": [80, 81, 82]},
    ]
    meta = {"objects": objects, "target_patches": [40]}
    assert train.named_objects("where is the red circle relative to the square ?", "below", meta) == [(4, [40]), (8, [5, 6])]
    assert train.named_objects("where is the square relative to the blue object ?", "above", meta) == [(3, [5, 6]), (8, [80, 81, 82])]
    assert train.named_objects("what shape is the blue object ?", "circle", meta) == [(5, [40])]
    assert train.named_objects("how many circles are there ?", "2", meta) == [(2, [40])]
    assert train.named_objects("is there a red circle ?", "yes", meta) == [(4, [40])]
    assert train.named_objects("is there a blue square ?", "no", meta) == []  # names no object of the scene


def test_every_name_in_the_testbed_ends_on_a_shape_or_object_word():
    images = train.training_images(shapes.generate_split(200, seed=0, split="train"))
    endings = {*shapes.SHAPES, *shapes.PLURALS.values(), "object"}
    named = [(turn.question.split()[word], patches) for image in images for turn in image.turns for word, patches in turn.names]
    assert len(named) > 200
    assert all(word in endings and patches for word, patches in named)


def test_name_queries_find_each_name_in_its_own_turn(processor):
    objects = [{"shape": "square", "color": "red", "patches": [5, 6]}, {"shape": "circle", "color": "blue", "patches": [80]}]
    meta = {"objects": objects, "target_patches": [5, 6]}
    questions = [("is there a blue triangle ?", "no"), ("what color is the square ?", "red"), ("where is the circle relative to the square ?", "below")]
    turns = [[train.Turn(q, a, [], train.named_objects(q, a, meta)) for q, a in questions], [train.Turn("what color is the square ?", "red", [], [(4, [0])])]]
    batch = train.training_batch(processor, turns)
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    names_at = train.name_positions(batch, turns, processor.tokenizer)
    rows, queries, target_mask, centres = train.name_queries(batch, turns, names_at, image_token_id, num_heads=2)
    assert rows.tolist() == [0, 0, 0, 1]
    words = [processor.tokenizer.convert_ids_to_tokens([batch["input_ids"][r, q].item()])[0] for r, q in zip(rows, queries)]
    assert words == ["square", "circle", "square", "square"]
    assert queries[0] < queries[1] < queries[2]  # the second turn's "square" is not the first turn's
    image_positions = [(row == image_token_id).nonzero().flatten() for row in batch["input_ids"]]
    expected = [image_positions[0][[5, 6]], image_positions[0][[80]], image_positions[0][[5, 6]], image_positions[1][[0]]]
    for q, positions in enumerate(expected):
        for head in range(2):
            assert target_mask[q, head].nonzero().flatten().tolist() == positions.tolist()
    square, circle = train.patch_centre([5, 6]), train.patch_centre([80])
    torch.testing.assert_close(centres, torch.stack([square, circle, square, train.patch_centre([0])]))
    negative_only = [[train.Turn("is there a blue triangle ?", "no", [], [])]]
    batch = train.training_batch(processor, negative_only)
    names_at = train.name_positions(batch, negative_only, processor.tokenizer)
    rows, _, target_mask, centres = train.name_queries(batch, negative_only, names_at, image_token_id, 2)
    assert len(rows) == len(target_mask) == len(centres) == 0


def test_patch_centres_and_relation_offsets_in_minus_one_to_one():
    assert train.patch_centre([0]).tolist() == [-1, -1] and train.patch_centre([575]).tolist() == [1, 1]
    assert train.patch_centre([0, 23]).tolist() == [-1, 0]  # the two ends of the first row
    turns = [
        [train.Turn("what color is the square ?", "red", [[5]]), train.Turn("where is the circle relative to the square ?", "below", [[552], [0]])],
        [train.Turn("where is the square relative to the circle ?", "right", [[23], [0]])],
    ]
    relations, offsets = train.relation_offsets(turns)
    assert relations == [1, 2]  # answer rows in `answer_queries` order: image by image, turn by turn
    assert offsets.tolist() == [[2, 0], [0, 2]]  # one whole grid below, one whole grid to the right


def test_patch_probes_read_the_inputs_of_the_name_layer_and_the_grounded_answer_layers():
    assert train.NAME_LAYER == 1 and train.GROUNDED_LAYERS == (-2, -1)
    assert train.patch_probe_layers(4) == [1, 2, 3]  # hidden state i is the input to layer i
    assert train.patch_probe_layers(3) == [1, 2]  # the name layer is also the first grounded one


def test_geometry_probes_read_normalised_states_and_push_the_model_from_the_start():
    probes = train.GeometryProbes(width=8, patch_layers=[1])
    hidden = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(probes.read(probes.centre, 1000 * hidden), probes.read(probes.centre, hidden))
    probes.read(probes.centre, hidden).pow(2).sum().backward()
    assert hidden.grad.abs().sum() > 0  # a zero-initialised probe would leave probe and model at a saddle


def test_attention_rows_equal_the_eager_attention_weights(tiny_model_dir, processor):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    language_model = model.model.language_model
    turns = [[("is there a red circle ?", "yes", [[0]]), ("how many squares are there ?", "2", [[1]])], [("what shape is the red object ?", "square", [[2]])]]
    batch = train.training_batch(processor, turns)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    with torch.no_grad():
        eager = language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_attentions=True).attentions
        keep = train.KeepQueriesAndKeys()
        language_model.set_attn_implementation(keep.name)
        language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    rows, queries, _ = train.answer_queries(batch, turns, model.config.image_token_id, language_model.config.num_attention_heads)
    assert rows.tolist() == [0, 0, 1]
    for layer in language_model.layers:
        attention = layer.self_attn
        rows_only = train.attention_rows(*keep.kept[attention.layer_idx], rows, queries, attention.scaling)
        expected = eager[attention.layer_idx][rows, :, queries]
        torch.testing.assert_close(rows_only, expected, atol=1e-6, rtol=1e-4)


def test_auxiliary_losses_cover_answers_names_and_relation_geometry(tiny_model_dir, processor):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    keep = train.KeepQueriesAndKeys()
    model.model.language_model.set_attn_implementation(keep.name)
    meta = {"objects": [{"shape": "square", "color": "red", "patches": [5, 6]}, {"shape": "circle", "color": "blue", "patches": [80]}], "target_patches": [5, 6]}

    def turn(question, answer, targets):
        return train.Turn(question, answer, targets, train.named_objects(question, answer, meta))

    attribute = turn("what color is the square ?", "red", [[5, 6]])
    relation = turn("where is the circle relative to the square ?", "below", [[80], [5, 6]])
    num_layers = model.config.text_config.num_hidden_layers
    probes = train.GeometryProbes(model.config.text_config.hidden_size, train.patch_probe_layers(num_layers))

    def losses(turns):
        batch = train.training_batch(processor, turns)
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return train.auxiliary_losses(model, processor.tokenizer, keep, probes, batch, turns, output.hidden_states)

    count = turn("how many squares are there ?", "1", [[5, 6]])
    with_relation = losses([[attribute, relation, count]])
    assert set(with_relation) == {"ground", "names", "centre", "offset", "patches"}
    assert all(torch.isfinite(value) and value > 0 for value in with_relation.values())
    with torch.no_grad():  # a zero-weight probe predicts its bias: the loss is the mean squared distance to the target
        probes.offset.weight.zero_()
    expected = (probes.offset.bias - (train.patch_centre([80]) - train.patch_centre([5, 6]))).pow(2).mean()
    assert losses([[attribute, relation]])["offset"].item() == pytest.approx(train.PROBE_WEIGHT * expected.item(), rel=1e-5)
    with torch.no_grad():  # likewise every patch's position, read at each probed layer
        for probe in probes.patches:
            probe.weight.zero_()
    positions = 2 * train.patch_positions() - 1
    expected = torch.stack([(probe.bias - positions).pow(2).mean() for probe in probes.patches]).mean()
    assert losses([[attribute]])["patches"].item() == pytest.approx(train.PROBE_WEIGHT * expected.item(), rel=1e-5)
    assert set(losses([[attribute]])) == {"ground", "names", "centre", "patches"}  # no relation, no offset
    assert set(losses([[turn("is there a blue square ?", "no", [[5, 6, 80]])]])) == {"ground", "patches"}


def test_vision_heads_pool_each_object_and_score_its_shape():
    heads = train.VisionHeads(width=8)
    metas = [{"objects": [{"color": "red", "shape": "circle", "patches": [0, 1]}, {"color": "blue", "shape": "triangle", "patches": [9]}]}]
    tokens = torch.zeros(1, 576, 8)
    with torch.no_grad():
        heads.shape.weight.zero_()
        heads.shape.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # always "circle"
    losses = heads(tokens, metas)
    assert losses["shape_accuracy"].item() == pytest.approx(0.5)  # the circle right, the triangle wrong
    circle_nll = -torch.log_softmax(torch.tensor([5.0, 0, 0]), 0)[0]
    triangle_nll = -torch.log_softmax(torch.tensor([5.0, 0, 0]), 0)[2]
    assert losses["shape"].item() == pytest.approx(((circle_nll + triangle_nll) / 2).item(), rel=1e-5)


def test_majority_baseline_answers_each_familys_most_common_training_answer():
    train_rows = [{"family": "existence", "answers": ["yes"]}] * 3 + [{"family": "existence", "answers": ["no"]}]
    test_rows = [{"family": "existence", "answers": ["yes"]}, {"family": "existence", "answers": ["no"]}]
    assert train.majority_baseline(train_rows, test_rows) == {"existence": 0.5, "overall": 0.5}


@pytest.mark.slow
def test_two_stage_training_saves_a_loadable_model_and_a_report(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vtc.data.shapes import generate_split, write_parquet

    for split, size in (("train", 40), ("validation", 8), ("test", 8)):
        write_parquet(generate_split(size, seed=0, split=split), tmp_path / f"{split}.parquet")
    report = train.train(
        tmp_path, tmp_path / "model", steps=2, batch_size=2, lr=1e-3, seed=0, eval_every=2, eval_samples=4,
        vision_steps=2, vision_batch_size=2,
    )  # fmt: skip
    saved = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert saved["test_accuracy"] == report["test_accuracy"] and set(saved["test_accuracy"]) >= {"overall"}
    assert [h["step"] for h in saved["vision_history"]] == [2] and [h["step"] for h in saved["history"]] == [2]
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert model.config.text_config._attn_implementation == "sdpa"
    # each evaluation leaves a checkpoint, from which a run continues without stage 1
    continued = train.train(
        tmp_path, tmp_path / "continued", steps=2, batch_size=2, lr=1e-3, seed=0, eval_every=2, eval_samples=4,
        vision_steps=0, init_from=tmp_path / "model" / "checkpoint",
    )  # fmt: skip
    assert continued["init_from"] == str(tmp_path / "model" / "checkpoint") and continued["vision_history"] == []
