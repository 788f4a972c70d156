"""Synthetic visual questions, drawn with PIL: the tasks the embedded model is trained and evaluated on.

Each task samples a scene description and a question about it; `render` draws the scene (an image,
or for motion a list of 4 frames). Everything is driven by a `random.Random`, so a seed fixes the
whole stream.

| task     | scene                                   | example question                          | answers |
|----------|-----------------------------------------|-------------------------------------------|---------|
| color    | 1-3 shapes, distinct shapes and colours | What color is the circle?                 | red ... |
| shape    | same                                    | What shape is the blue object?            | circle ... |
| position | 2 shapes, or 1 shape in a corner        | Is the red circle left or right of the blue square? | left, right, above, below, top left ... |
| count    | 1-5 shapes                              | How many shapes are there?                | 1 ... 5 |
| motion   | a ball moving over 4 frames             | Which way did the ball move?              | left, right, up, down |
"""

import random
import sys
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

IMAGE_SIZE = 168  # 12 x 12 patches of 14 px: 36 merged tokens
CELLS = 3  # shapes sit in a 3 x 3 grid of cells, so they never overlap
CELL = IMAGE_SIZE // CELLS
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
TASKS = ("color", "shape", "position", "count", "motion")
CORNERS = {(0, 0): "top left", (0, 2): "top right", (2, 0): "bottom left", (2, 2): "bottom right"}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
NUMBERS = ("1", "2", "3", "4", "5")

PHRASINGS = {
    "color": ("What color is the {shape}?", "Which color does the {shape} have?", "The {shape} is what color?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?", "What is the {color} shape?"),
    "left_right": ("Is the {a} left or right of the {b}?", "Is the {a} to the left or to the right of the {b}?"),
    "above_below": ("Is the {a} above or below the {b}?", "Is the {a} higher or lower than the {b}? Answer above or below."),
    "corner": ("In which corner is the {shape}?", "Which corner is the {shape} in?"),
    "count": ("How many shapes are there?", "How many objects are in the picture?", "Count the shapes."),
    "motion": ("Which way did the ball move?", "In which direction is the ball moving?", "Where did the ball go?"),
}


@dataclass
class Item:
    shape: str
    color: str
    cell: tuple  # (row, col) in the 3 x 3 grid
    offset: tuple = (0, 0)  # jitter inside the cell, pixels
    size: int = 40


@dataclass
class Example:
    task: str
    question: str
    answer: str
    items: list = field(default_factory=list)
    motion: tuple | None = None  # (direction, start (x, y)) for the motion task

    @property
    def is_video(self):
        return self.motion is not None


def sample(task, rng):
    """One question of `task` ("color", "shape", "position", "count" or "motion")."""
    return {"color": _color, "shape": _shape, "position": _position, "count": _count, "motion": _motion}[task](rng)


def _items(rng, count, distinct=True):
    cells = rng.sample([(r, c) for r in range(CELLS) for c in range(CELLS)], count)
    shapes = rng.sample(SHAPES, count) if distinct else [rng.choice(SHAPES) for _ in range(count)]
    colors = rng.sample(list(COLORS), count) if distinct else [rng.choice(list(COLORS)) for _ in range(count)]
    return [
        Item(s, c, cell, (rng.randint(-6, 6), rng.randint(-6, 6)), rng.randint(32, 44))
        for s, c, cell in zip(shapes, colors, cells)
    ]


def _color(rng):
    items = _items(rng, rng.randint(1, 3))
    target = rng.choice(items)
    question = rng.choice(PHRASINGS["color"]).format(shape=target.shape)
    return Example("color", question, target.color, items)


def _shape(rng):
    items = _items(rng, rng.randint(1, 3))
    target = rng.choice(items)
    question = rng.choice(PHRASINGS["shape"]).format(color=target.color)
    return Example("shape", question, target.shape, items)


def _position(rng):
    if rng.random() < 0.3:
        item = _items(rng, 1)[0]
        item.cell = rng.choice(list(CORNERS))
        question = rng.choice(PHRASINGS["corner"]).format(shape=item.shape)
        return Example("position", question, CORNERS[item.cell], [item])
    horizontal = rng.random() < 0.5
    a, b = two_apart(rng, axis=1 if horizontal else 0)
    name_a, name_b = f"{a.color} {a.shape}", f"{b.color} {b.shape}"
    if horizontal:
        question = rng.choice(PHRASINGS["left_right"]).format(a=name_a, b=name_b)
        answer = "left" if a.cell[1] < b.cell[1] else "right"
    else:
        question = rng.choice(PHRASINGS["above_below"]).format(a=name_a, b=name_b)
        answer = "above" if a.cell[0] < b.cell[0] else "below"
    return Example("position", question, answer, [a, b])


def two_apart(rng, axis):
    """Two distinct shapes in different rows (axis 0) or columns (axis 1) of the grid."""
    while True:
        a, b = _items(rng, 2)
        if a.cell[axis] != b.cell[axis]:
            return a, b


def _count(rng):
    count = rng.randint(1, 5)
    items = _items(rng, count, distinct=False)
    return Example("count", rng.choice(PHRASINGS["count"]), NUMBERS[count - 1], items)


def _motion(rng):
    direction = rng.choice(list(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    travel = 3 * 28  # 28 px per frame over 4 frames
    margin = 24
    # start so that the whole path stays inside the frame
    x = rng.randint(margin + max(0, -dx) * travel, IMAGE_SIZE - margin - max(0, dx) * travel)
    y = rng.randint(margin + max(0, -dy) * travel, IMAGE_SIZE - margin - max(0, dy) * travel)
    color = rng.choice(list(COLORS))
    ball = Item("circle", color, (0, 0), size=30)
    return Example("motion", rng.choice(PHRASINGS["motion"]), direction, [ball], motion=(direction, (x, y)))


def render(example):
    """The picture (PIL RGB) or, for motion, a list of 4 frames."""
    if example.is_video:
        direction, (x, y) = example.motion
        dx, dy = DIRECTIONS[direction]
        ball = example.items[0]
        return [_canvas([(ball, (x + 28 * i * dx, y + 28 * i * dy))]) for i in range(4)]
    placed = []
    for item in example.items:
        center = (item.cell[1] * CELL + CELL // 2 + item.offset[0], item.cell[0] * CELL + CELL // 2 + item.offset[1])
        placed.append((item, center))
    return _canvas(placed)


def _canvas(placed):
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for item, (x, y) in placed:
        r = item.size // 2
        fill = COLORS[item.color]
        if item.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif item.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def answer_matches(prediction, answer):
    """Exact match after trimming case, spaces and a final full stop."""
    return prediction.strip().lower().rstrip(".").strip() == answer


def all_answers():
    return sorted({*COLORS, *SHAPES, *CORNERS.values(), "left", "right", "above", "below", *NUMBERS, *DIRECTIONS})


def evaluate(answer, per_task, seed, batch_size=32, progress=False):
    """Accuracy per task on `per_task` fresh questions of each task from `seed`.

    `answer(examples)` returns one answer string per example (model.generate, a pipeline, ...). `progress` shows a
    progress bar of the batches on stderr."""
    rng = random.Random(seed)
    examples = [sample(task, rng) for task in TASKS for _ in range(per_task)]
    correct = dict.fromkeys(TASKS, 0)
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="questions", unit="batch", file=sys.stderr)
    for start in starts:
        chunk = examples[start:start + batch_size]
        for example, prediction in zip(chunk, answer(chunk)):
            correct[example.task] += answer_matches(prediction, example.answer)
    return {
        "accuracy": sum(correct.values()) / len(examples),
        "n": len(examples),
        "per_task": {task: correct[task] / per_task for task in TASKS},
    }


def media_item(kind, visual):
    """The chat item of a picture or clip ("image" or "video"): `visual` is an image, frames, or a path.

    The pixel bounds keep pictures and frames at the training size (larger inputs are scaled down to that many
    pixels): without them, frames would be scaled up to qwen-vl-utils' video minimum (128 * 28 * 28 pixels)."""
    return {"type": kind, kind: visual, "min_pixels": 28 * 28, "max_pixels": IMAGE_SIZE**2}


def messages(example, visual):
    """The chat for one example; `visual` is its rendered image, frames, or a path."""
    item = media_item("video" if example.is_video else "image", visual)
    return [{"role": "user", "content": [item, {"type": "text", "text": example.question}]}]
