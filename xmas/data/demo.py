"""The embedded demo dataset: rendered shape scenes with questions, LLaVA format, built-in redundancy.

Deterministic for a given settings file: the same seed writes the same bytes. Every record
carries ``question_type`` for analysis only; selection never reads it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xmas.errors import XmasError
from xmas.io import atomic_path, write_records
from xmas.progress import StageStats, progress
from xmas.resources import resource

# Generator settings the package ships (xmas/resources/demo/): config dataset.demo names one or a file.
SHIPPED = ("shapes", "rehearsal")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
)
IMAGE_TYPES = ("color", "shape", "position", "count")
TYPES = (*IMAGE_TYPES, "text")
TEMPLATES = {
    "color": ("What color is the {shape}?", "Which color does the {shape} have?", "Tell me the color of the {shape}."),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?", "Name the shape of the {color} object."),
    "position": ("Is the {color} {shape} on the left or the right?", "On which side is the {color} {shape}?"),
    "count": ("How many objects are there?", "How many shapes can you see?", "Count the objects in the image."),
    "text": ("What is {a} plus {b}?", "Add {a} and {b}. What do you get?"),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: int
    y: int
    radius: int
    side: str  # "left" or "right" of the image's middle


@dataclasses.dataclass(frozen=True)
class Grid:
    """Where objects go: one per cell of a ``cells`` × ``cells`` grid, each drawn whole inside its cell
    at one ``radius``. With cells as large as the demo target's image patches, every patch sees one
    object whole, and an object's area alone tells its shape."""

    size: int
    cells: int
    radius: int

    @classmethod
    def of(cls, settings: dict) -> Grid:
        grid = cls(settings["image_size"], settings["grid"], settings["object_radius"])
        if grid.size % grid.cells or grid.cell < 2 * grid.radius + 2:
            raise XmasError(
                f"demo settings: a {grid.size}-px image in a {grid.cells} × {grid.cells} grid has cells of "
                f"{grid.size / grid.cells:g} px; object_radius {grid.radius} needs whole cells of at least "
                f"{2 * grid.radius + 2} px"
            )
        return grid

    @property
    def cell(self) -> int:
        return self.size // self.cells

    def centres(self, index: int) -> tuple[int, int]:
        """The lowest and highest centre (on one axis) that keeps an object inside cell ``index``."""
        start = index * self.cell
        return start + self.radius + 1, start + self.cell - self.radius - 1

    def side(self, column: int) -> str:
        return "left" if 2 * column < self.cells else "right"

    def cell_of(self, obj: Shape) -> int:
        return (obj.y // self.cell) * self.cells + obj.x // self.cell


def random_scene(rng: np.random.Generator, grid: Grid, n_objects: int) -> list[Shape]:
    """Objects with distinct shapes, colours and cells, so every question has one answer."""
    kinds = rng.choice(SHAPES, n_objects, replace=False)
    colors = rng.choice(list(COLORS), n_objects, replace=False)
    scene = []
    for kind, color, cell in zip(kinds, colors, rng.choice(grid.cells**2, n_objects, replace=False)):
        row, column = divmod(int(cell), grid.cells)
        x, y = (int(rng.integers(low, high + 1)) for low, high in (grid.centres(column), grid.centres(row)))
        scene.append(Shape(str(kind), str(color), x, y, grid.radius, grid.side(column)))
    return scene


def jitter(scene: list[Shape], rng: np.random.Generator, grid: Grid) -> list[Shape]:
    """A near-duplicate: each object moved by up to 2 px, staying in its cell."""
    moved = []
    for obj in scene:
        row, column = divmod(grid.cell_of(obj), grid.cells)
        x = int(np.clip(obj.x + rng.integers(-2, 3), *grid.centres(column)))
        y = int(np.clip(obj.y + rng.integers(-2, 3), *grid.centres(row)))
        moved.append(dataclasses.replace(obj, x=x, y=y))
    return moved


def render(scene: list[Shape], size: int, rng: np.random.Generator) -> Image.Image:
    shade = int(rng.integers(225, 246))
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for obj in scene:
        fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[obj.color])
        box = (obj.x - obj.radius, obj.y - obj.radius, obj.x + obj.radius, obj.y + obj.radius)
        if obj.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(obj.x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def question(kind: str, scene: list[Shape], rng: np.random.Generator) -> tuple[str, str]:
    """A question of ``kind`` about ``scene`` and its one-word answer."""
    template = str(rng.choice(TEMPLATES[kind]))
    if kind == "text":
        a, b = (int(v) for v in rng.integers(0, 10, 2))
        return template.format(a=NUMBER_WORDS[a], b=NUMBER_WORDS[b]), NUMBER_WORDS[a + b]
    if kind == "count":
        return template, NUMBER_WORDS[len(scene)]
    obj = scene[int(rng.integers(len(scene)))]
    answer = {"color": obj.color, "shape": obj.kind, "position": obj.side}[kind]
    return template.format(shape=obj.kind, color=obj.color), answer


def scene_for(kind: str, rng: np.random.Generator, grid: Grid) -> list[Shape]:
    n_objects = int(rng.integers(1, 4)) if kind in ("count", "shape") else int(rng.integers(1, 3))
    return random_scene(rng, grid, n_objects)


@dataclasses.dataclass
class Example:
    question_type: str
    turns: list[tuple[str, str]]
    scene: list[Shape] | None

    def record(self, record_id: str, image: str | None, image_first: bool) -> dict:
        conversations = []
        for position, (prompt, answer) in enumerate(self.turns):
            if position == 0 and image is not None:
                prompt = f"<image>\n{prompt}" if image_first else f"{prompt}\n<image>"
            conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        record = {"id": record_id, "image": image, "conversations": conversations, "question_type": self.question_type}
        if image is None:
            del record["image"]
        return record


def make_example(kind: str, rng: np.random.Generator, grid: Grid, second_turn_fraction: float) -> Example:
    if kind == "text":
        return Example(kind, [question(kind, [], rng)], None)
    scene = scene_for(kind, rng, grid)
    turns = [question(kind, scene, rng)]
    if rng.random() < second_turn_fraction:
        other = str(rng.choice([t for t in IMAGE_TYPES if t != kind]))
        turns.append(question(other, scene, rng))
    return Example(kind, turns, scene)


def train_examples(settings: dict, rng: np.random.Generator) -> list[Example]:
    grid, spec = Grid.of(settings), settings["train"]
    weights = spec["type_weights"]
    counts = {kind: int(round(spec["records"] * weights[kind])) for kind in TYPES}
    dominant = max(counts, key=counts.get)
    examples: list[Example] = []
    duplicated = int(counts[dominant] * spec["duplicate_fraction"])
    low, high = spec["duplicate_group_size"]
    while duplicated > 0:
        base = make_example(dominant, rng, grid, 0.0)
        copies = min(int(rng.integers(low, high + 1)), duplicated)
        examples += [Example(dominant, base.turns, jitter(base.scene, rng, grid)) for _ in range(copies)]
        duplicated -= copies
    counts[dominant] -= int(counts[dominant] * spec["duplicate_fraction"])
    for kind in TYPES:
        examples += [make_example(kind, rng, grid, spec["second_turn_fraction"]) for _ in range(counts[kind])]
    return [examples[i] for i in rng.permutation(len(examples))]


def test_examples(settings: dict, rng: np.random.Generator) -> list[Example]:
    """A held-out split with the same number of single-turn records of every type."""
    grid, per_type = Grid.of(settings), settings["test"]["per_type"]
    return [make_example(kind, rng, grid, 0.0) for kind in TYPES for _ in range(per_type)]


CAPTION_PROMPTS = ("What can you see in the image?", "Tell me what is in the image.", "What is in the image?")


def caption(scene: list[Shape]) -> str:
    """How many objects a scene has, then each one's shape and side, in the fixed order of the colours."""
    objects = sorted(scene, key=lambda obj: list(COLORS).index(obj.color))
    noun = "object" if len(objects) == 1 else "objects"
    parts = [f"the {obj.color} {obj.kind} is on the {obj.side}" for obj in objects]
    return f"{NUMBER_WORDS[len(objects)]} {noun} . " + " . ".join(parts) + " ."


def caption_examples(settings: dict, rng: np.random.Generator) -> list[Example]:
    """Scenes of their own (not the instruction records, not the held-out split), each with its caption:
    what a target aligns its vision to before instruction tuning, as LLaVA's first stage does."""
    grid, spec = Grid.of(settings), settings["captions"]
    examples = []
    for _ in range(spec["records"]):
        scene = random_scene(rng, grid, int(rng.integers(1, 4)))
        examples.append(Example("caption", [(str(rng.choice(CAPTION_PROMPTS)), caption(scene))], scene))
    return examples


def write_split(
    name: str, examples: list[Example], images: Path, size: int, rng, stats: StageStats, image_first_share: float = 0.8
) -> list[dict]:
    """Render a split's images and write its records; ``image_first_share`` of them put the image
    before the question (LLaVA's instruction data puts some after it)."""
    (images / "shapes" / name).mkdir(parents=True, exist_ok=True)
    records = []
    for number, example in enumerate(progress(examples, total=len(examples), desc=f"render {name}", unit="img")):
        image = None
        if example.scene is not None:
            image = f"shapes/{name}/{number:06d}.png"
            render(example.scene, size, rng).save(images / image, format="PNG")
        records.append(example.record(f"demo-{name}-{number:06d}", image, image_first=rng.random() < image_first_share))
        stats.add(f"{name}_{example.question_type}")
    return records


def generate(
    settings: dict,
    train_json: Path,
    test_json: Path,
    image_root: Path,
    stats: StageStats,
    captions_json: Path | None = None,
) -> None:
    rng = np.random.default_rng(settings["seed"])
    caption_rng = np.random.default_rng([settings["seed"], 1])  # its own stream: train and test stay as they were
    train, test = train_examples(settings, rng), test_examples(settings, rng)
    with atomic_path(image_root, seal=False) as images:
        train_records = write_split("train", train, images, settings["image_size"], rng, stats)
        test_records = write_split("test", test, images, settings["image_size"], rng, stats)
        if captions_json is not None:
            captions = caption_examples(settings, caption_rng)
            caption_records = write_split(
                "captions", captions, images, settings["image_size"], caption_rng, stats, image_first_share=1.0
            )
    write_records(train_records, train_json)
    write_records(test_records, test_json)
    stats.add("out", len(train_records) + len(test_records))
    if captions_json is not None:
        write_records(caption_records, captions_json)
        stats.add("captions", len(caption_records))


def settings_file(name: str) -> Path:
    """A shipped generator's settings by name, else a settings file of the user's."""
    return resource("demo", f"{name}.yaml") if name in SHIPPED else Path(name)
