"""`shapes`: a seeded visual-QA testbed whose answers hinge on small visual details.

Each image holds a few coloured shapes of varied size on a cluttered grey background. Four question
families probe what a visual-token reducer may destroy:

- ``attribute``: the colour of a uniquely shaped object, or the shape of a uniquely coloured one;
- ``existence``: "is there a <colour> <shape>?", half of them hard negatives (the colour and the shape
  are both in the image, on different objects), as in POPE's adversarial split;
- ``counting``: how many objects of a shape there are;
- ``relation``: where one object lies relative to another (left, right, above, below), asked only
  when one axis clearly dominates.

Every sample records, per object, which cells of the ``GRID × GRID`` patch grid it covers, and the
union over the objects the question refers to (``target_patches``), so that a reducer can be scored on
whether it kept the tokens that matter.

Generate with ``python -m vtc.data.shapes --out DIR --seed 0``; rows follow `vtc.benchmarks.COMMON_FEATURES`,
with the objects and ``target_patches`` in ``meta``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
GRID = 24  # patches per side: 576 visual tokens, as in LLaVA-1.5
PATCH = IMAGE_SIZE // GRID
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
RELATIONS = ("left", "right", "above", "below")
FAMILIES = ("attribute", "existence", "counting", "relation")
MAX_COUNT = 4
DEFAULT_SPLITS = {"train": 24000, "validation": 500, "test": 1000}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    cx: float
    cy: float
    size: float  # side of the bounding square, in pixels

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


def _draw_background(rng: random.Random, np_rng: np.random.Generator) -> Image.Image:
    """Grey gradient, grey clutter strokes and pixel noise: texture the encoder must learn to ignore."""
    base = rng.randint(90, 160)
    ramp = np.linspace(-25, 25, IMAGE_SIZE)
    angle = rng.uniform(0, 2 * math.pi)
    grad = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]
    canvas = np.clip(base + grad, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.stack([canvas] * 3, axis=-1))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(6, 14)):
        grey = rng.randint(60, 200)
        points = [(rng.uniform(0, IMAGE_SIZE), rng.uniform(0, IMAGE_SIZE)) for _ in range(2)]
        draw.line(points, fill=(grey, grey, grey), width=rng.randint(1, 2))
    noise = np_rng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    pixels = np.asarray(image, dtype=np.float32) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill) -> None:
    x0, y0, x1, y1 = obj.bbox
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(obj.cx, y0), (x1, y1), (x0, y1)], fill=fill)


def object_patches(obj: ShapeObject) -> list[int]:
    """Row-major indices of the patches that the object's pixels touch."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_object(ImageDraw.Draw(mask), obj, fill=255)
    covered = np.asarray(mask).reshape(GRID, PATCH, GRID, PATCH).max(axis=(1, 3)) > 0
    return np.flatnonzero(covered).tolist()


def _place_objects(rng: random.Random) -> list[ShapeObject]:
    objects: list[ShapeObject] = []
    target = rng.randint(3, 6)
    for _ in range(200):
        if len(objects) == target:
            break
        size = rng.uniform(8, 20)
        cx = rng.uniform(size / 2 + 1, IMAGE_SIZE - size / 2 - 1)
        cy = rng.uniform(size / 2 + 1, IMAGE_SIZE - size / 2 - 1)
        clear = all(
            abs(cx - o.cx) > (size + o.size) / 2 + 2 or abs(cy - o.cy) > (size + o.size) / 2 + 2
            for o in objects
        )
        if clear:
            objects.append(ShapeObject(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, size))
    return objects


def render(objects: list[ShapeObject], rng: random.Random, np_rng: np.random.Generator) -> Image.Image:
    image = _draw_background(rng, np_rng)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_object(draw, obj, fill=COLORS[obj.color])
    return image


def _unique(objects, key, value):
    matches = [o for o in objects if getattr(o, key) == value]
    return matches[0] if len(matches) == 1 else None


def _ask_attribute(objects, rng):
    options = []
    for shape in SHAPES:
        if obj := _unique(objects, "shape", shape):
            options.append((f"what color is the {shape} ?", obj.color, [obj]))
    for color in COLORS:
        if obj := _unique(objects, "color", color):
            options.append((f"what shape is the {color} object ?", obj.shape, [obj]))
    return rng.choice(options) if options else None


def _ask_existence(objects, rng):
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        refs = [o for o in objects if (o.color, o.shape) == (color, shape)]
        return f"is there a {color} {shape} ?", "yes", refs
    colors = {o.color for o in objects}
    shapes = {o.shape for o in objects}
    hard = [(c, s) for c in sorted(colors) for s in sorted(shapes) if (c, s) not in present]
    easy = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = rng.choice(hard if hard else easy)
    refs = [o for o in objects if o.color == color or o.shape == shape]
    return f"is there a {color} {shape} ?", "no", refs


def _ask_counting(objects, rng):
    """Reassigns shapes (in place) so the count is uniform over 1..MAX_COUNT rather than skewed to 1."""
    shape = rng.choice(SHAPES)
    count = rng.randint(1, min(MAX_COUNT, len(objects)))
    others = [s for s in SHAPES if s != shape]
    order = rng.sample(range(len(objects)), len(objects))
    for rank, i in enumerate(order):
        new_shape = shape if rank < count else rng.choice(others)
        objects[i] = replace(objects[i], shape=new_shape)
    refs = [o for o in objects if o.shape == shape]
    return f"how many {PLURALS[shape]} are there ?", str(count), refs


def _describe(obj, objects):
    """Shortest unambiguous name of an object: its shape, its colour, or both."""
    if _unique(objects, "shape", obj.shape):
        return obj.shape
    if _unique(objects, "color", obj.color):
        return f"{obj.color} object"
    same = [o for o in objects if (o.color, o.shape) == (obj.color, obj.shape)]
    return f"{obj.color} {obj.shape}" if len(same) == 1 else None


def _ask_relation(objects, rng):
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        name_a, name_b = _describe(a, objects), _describe(b, objects)
        dx, dy = a.cx - b.cx, a.cy - b.cy
        if not (name_a and name_b) or max(abs(dx), abs(dy)) < 2 * min(abs(dx), abs(dy)) + 8:
            continue
        if abs(dx) > abs(dy):
            relation = "left" if dx < 0 else "right"
        else:
            relation = "above" if dy < 0 else "below"
        return f"where is the {name_a} relative to the {name_b} ?", relation, [a, b]
    return None


_ASKERS = {
    "attribute": _ask_attribute,
    "existence": _ask_existence,
    "counting": _ask_counting,
    "relation": _ask_relation,
}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_split(num_samples: int, seed: int, split: str) -> list[dict]:
    """`num_samples` questions of one split, up to one per family about each image.

    Several questions share an image (as in GQA or VQAv2), so `image_id` differs from `id`. Images are
    never shared across splits because every split draws from its own seeded stream.
    """
    rng = random.Random(f"shapes/{split}/{seed}")
    np_rng = np.random.default_rng(rng.getrandbits(32))
    samples: list[dict] = []
    image_index = 0
    while len(samples) < num_samples:
        objects = _place_objects(rng)
        # Counting goes first: it may change shapes, and the other questions must see the final scene.
        asked = {family: _ASKERS[family](objects, rng) for family in ("counting", "attribute", "existence", "relation")}
        image = {"bytes": _png_bytes(render(objects, rng, np_rng)), "path": None}
        patches = [object_patches(o) for o in objects]
        scene = [
            {"shape": o.shape, "color": o.color, "bbox": [round(v, 2) for v in o.bbox], "patches": ps}
            for o, ps in zip(objects, patches)
        ]
        image_id = f"shapes-{split}-{image_index:06d}"
        for family in FAMILIES:
            if asked[family] is None or len(samples) == num_samples:
                continue
            question, answer, refs = asked[family]
            referenced = sorted({p for o, ps in zip(objects, patches) if any(o is r for r in refs) for p in ps})
            samples.append(
                {
                    "id": f"{image_id}-{family}",
                    "image_id": image_id,
                    "image": image,
                    "question": question,
                    "answers": [answer],
                    "family": family,
                    "meta": json.dumps({"objects": scene, "target_patches": referenced}),
                }
            )
        image_index += 1
    return samples


def write_parquet(samples: list[dict], path: Path) -> None:
    from vtc.benchmarks import write_common_parquet

    write_common_parquet(samples, path)


def answer_vocabulary() -> list[str]:
    return [*COLORS, *SHAPES, "yes", "no", *RELATIONS, *(str(n) for n in range(1, MAX_COUNT + 1))]


def question_vocabulary() -> list[str]:
    words = {"what", "color", "shape", "is", "the", "object", "there", "a", "how", "many", "are"}
    words |= {"where", "relative", "to", "?"} | set(PLURALS.values())
    return sorted(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, size in DEFAULT_SPLITS.items():
        write_parquet(generate_split(size, args.seed, split), args.out / f"{split}.parquet")


if __name__ == "__main__":
    main()
