"""Synthetic images of coloured shapes with captions and questions whose answer is only in the image.

Every sample is a pure function of (seed, index), so any shard can be regenerated anywhere. Tasks:
caption, color, shape, count, position, and conflict (the text asserts a wrong colour; the answer is
the colour in the image, ``meta["text_claim"]`` holds the text's claim).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from kscale.data.records import Record

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20),
          "purple": (140, 40, 170), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
NUMBERS = ("zero", "one", "two", "three")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], rgb) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def make_sample(i: int, seed: int, size: int, tasks: list[str]) -> Record:
    rng = np.random.default_rng([seed, i])
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    count = int(rng.integers(1, 4))
    position = POSITIONS[rng.integers(len(POSITIONS))]
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size / 4
    # the group of shapes sits in one half of the image: that half is the position
    cx, cy = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}[position]
    for k in range(count):
        off = (k - (count - 1) / 2) * s * 0.9
        x, y = (cx * size, cy * size + off) if position in ("left", "right") else (cx * size + off, cy * size)
        _draw(d, shape, (x - s / 2.5, y - s / 2.5, x + s / 2.5, y + s / 2.5), COLORS[color])
    task = tasks[i % len(tasks)]
    plural = shape if count == 1 else shape + "s"  # unknown plurals are fine for the word-level tokenizer
    meta = {"task": task, "color": color, "shape": shape, "count": count, "position": position}
    if task == "caption":
        text, answer = "describe the image .", f"{NUMBERS[count]} {color} {plural} on the {position}"
    elif task == "color":
        text, answer = f"what color is the {shape} ?", color
    elif task == "shape":
        text, answer = "what shape is shown ?", shape
    elif task == "count":
        text, answer = "how many shapes are there ?", NUMBERS[count]
    elif task == "position":
        text, answer = "where is the shape : left , right , top or bottom ?", position
    else:  # conflict: the text claims another colour
        claim = [c for c in COLORS if c != color][rng.integers(len(COLORS) - 1)]
        text, answer = f"the text says the {shape} is {claim} . what color is the {shape} ?", color
        meta["text_claim"] = claim
    return Record(i, f"gen-{seed}-{i}", img, text, answer, None, meta)


class GeneratedSource:
    def __init__(self, gspec):
        self.g = gspec

    def __len__(self) -> int:
        return self.g.n_samples

    def get(self, i: int) -> Record:
        return make_sample(i, self.g.seed, self.g.image_size, list(self.g.tasks))
