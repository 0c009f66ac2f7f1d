import json
from collections import Counter

from vtc.data import shapes


def test_generation_is_deterministic_per_seed_and_split():
    first = shapes.generate_split(20, seed=3, split="test")
    assert first == shapes.generate_split(20, seed=3, split="test")
    assert [s["question"] for s in first] != [s["question"] for s in shapes.generate_split(20, seed=4, split="test")]
    assert {s["image_id"] for s in first}.isdisjoint({s["image_id"] for s in shapes.generate_split(20, 3, "train")})


def test_every_family_is_asked_and_answers_come_from_the_vocabulary():
    samples = shapes.generate_split(400, seed=0, split="test")
    families = Counter(s["family"] for s in samples)
    assert set(families) == set(shapes.FAMILIES)
    assert min(families.values()) > 60
    vocabulary = set(shapes.answer_vocabulary())
    assert all(s["answers"][0] in vocabulary for s in samples)
    assert len({s["id"] for s in samples}) == len(samples)


def test_existence_negatives_are_hard_when_possible():
    """A "no" names a colour and a shape that are both in the image, on other objects (POPE-style),
    whenever the scene allows such a combination."""
    negatives = [s for s in shapes.generate_split(400, 0, "test") if s["family"] == "existence" and s["answers"] == ["no"]]
    assert len(negatives) > 30
    for sample in negatives:
        _, _, _, color, shape, _ = sample["question"].split()
        objects = json.loads(sample["meta"])["objects"]
        present = {(o["color"], o["shape"]) for o in objects}
        assert (color, shape) not in present
        hard_possible = any((c, k) not in present for c in {o["color"] for o in objects} for k in {o["shape"] for o in objects})
        if hard_possible:
            assert color in {o["color"] for o in objects} and shape in {o["shape"] for o in objects}


def test_answers_match_the_scene():
    for sample in shapes.generate_split(200, 1, "validation"):
        objects = json.loads(sample["meta"])["objects"]
        if sample["family"] == "counting":
            plural = sample["question"].split()[2]
            kind = next(k for k, p in shapes.PLURALS.items() if p == plural)
            assert int(sample["answers"][0]) == sum(o["shape"] == kind for o in objects)
        if sample["family"] == "attribute" and sample["question"].startswith("what color"):
            kind = sample["question"].split()[4]
            assert [o["color"] for o in objects if o["shape"] == kind] == sample["answers"]


def test_object_patches_cover_the_drawn_object():
    square = shapes.ShapeObject("square", "red", cx=10.0, cy=10.0, size=8.0)  # pixels 6..14 -> patches 1..3
    patches = shapes.object_patches(square)
    rows, cols = {p // shapes.GRID for p in patches}, {p % shapes.GRID for p in patches}
    assert rows == {1, 2, 3} and cols == {1, 2, 3}
    sample = shapes.generate_split(1, 0, "test")[0]
    targets = json.loads(sample["meta"])["target_patches"]
    assert targets and all(0 <= p < shapes.GRID**2 for p in targets)
