"""A small dataset shaped like LLaVA-665k, for rehearsing a real run on CPU (``config/rehearsal.yaml``).

It has what the real mix has and the demo lacks: photos that are not square under COCO/GQA/OCR-VQA
style paths, multi-turn conversations, the ``<image>`` tag before or after the question,
ShareGPT-style text-only conversations, conversations longer than ``max_length``, a record whose
image comes too late to fit, and a record with two images. Deterministic for a given settings file.
The held-out split carries ``question_type`` for the exact-match evaluation.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xmas.data.demo import COLORS, NUMBER_WORDS, SHAPES
from xmas.io import atomic_path, write_records
from xmas.progress import StageStats

GQA_SUFFIX = "\nAnswer the question using a single word or phrase."
TITLE_WORDS = (
    "river",
    "silent",
    "garden",
    "winter",
    "stone",
    "light",
    "empire",
    "secret",
    "ocean",
    "forest",
    "glass",
    "night",
    "golden",
    "city",
    "lost",
    "star",
)
AUTHORS = ("Ada Moreau", "Ben Okafor", "Clara Jensen", "Diego Alvarez", "Erin Walsh", "Farid Haddad")
GENRES = ("Cookbooks", "History", "Travel", "Science", "Romance", "Mystery")
TOPICS = ("a compiler", "photosynthesis", "a bicycle gear", "the stock market", "a neural network", "tides")
SENTENCES = (
    "It starts with a simple idea that grows over time.",
    "Each part depends on the one before it.",
    "Engineers often test small pieces first.",
    "The result is easy to measure and compare.",
    "Small changes can have large effects later.",
    "A careful plan saves time in the end.",
    "Most people learn this by trying it themselves.",
    "The details matter more than they seem.",
)
TYPES = ("color", "shape", "count", "ocr", "text")


class Scene:
    """A photo-like scene: one to three coloured shapes on a textured, non-square background."""

    def __init__(self, rng: np.random.Generator):
        self.width, self.height = (int(v) for v in rng.integers(40, 97, 2))
        count = int(rng.integers(1, 4))
        kinds, colors = rng.choice(SHAPES, count, replace=False), rng.choice(list(COLORS), count, replace=False)
        self.shapes = list(zip(kinds, colors))
        self.rng = np.random.default_rng(rng.integers(1 << 31))

    def render(self) -> Image.Image:
        noise = self.rng.integers(150, 230, (self.height, self.width, 3), dtype=np.uint8)
        image = Image.fromarray(noise, "RGB")
        draw = ImageDraw.Draw(image)
        radius = max(4, min(self.width, self.height) // 6)
        for number, (kind, color) in enumerate(self.shapes):
            x = int((number + 0.5) * self.width / len(self.shapes))
            y = int(self.rng.integers(radius, self.height - radius))
            box = (x - radius, y - radius, x + radius, y + radius)
            if kind == "circle":
                draw.ellipse(box, fill=COLORS[color])
            elif kind == "square":
                draw.rectangle(box, fill=COLORS[color])
            else:
                draw.polygon([(x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[color])
        return image

    def questions(self) -> list[tuple[str, str, str]]:
        """(question type, question, answer) about the scene."""
        kind, color = self.shapes[0]
        return [
            ("color", f"What color is the {kind}?", color),
            ("shape", f"Which shape is {color}?", kind),
            ("count", "How many shapes are in the image?", NUMBER_WORDS[len(self.shapes)]),
        ]


class Book:
    """An OCR-VQA-like book cover: a title and an author written on a coloured page."""

    def __init__(self, rng: np.random.Generator):
        self.title = " ".join(str(word).title() for word in rng.choice(TITLE_WORDS, 2, replace=False))
        self.author = str(rng.choice(AUTHORS))
        self.genre = str(rng.choice(GENRES))
        self.background = tuple(int(v) for v in rng.integers(60, 200, 3))

    def render(self) -> Image.Image:
        image = Image.new("RGB", (64, 96), self.background)
        draw = ImageDraw.Draw(image)
        draw.text((4, 20), self.title.replace(" ", "\n"), fill=(255, 255, 255))
        draw.text((4, 76), self.author.split()[-1], fill=(0, 0, 0))
        return image

    def questions(self) -> list[tuple[str, str, str]]:
        return [
            ("ocr", "Who wrote this book?", self.author),
            ("ocr", "What is the title of this book?", self.title),
            ("ocr", "What is the genre of this book?", self.genre),
            ("ocr", f"Is this a {self.genre.lower()} book?", "Yes"),
        ]


def with_image(question: str, rng: np.random.Generator, after_share: float) -> str:
    """The question with the image tag before it (as most records) or after it."""
    return f"{question}\n<image>" if rng.random() < after_share else f"<image>\n{question}"


def conversation(turns: list[tuple[str, str]]) -> list[dict]:
    return [
        turn
        for question, answer in turns
        for turn in ({"from": "human", "value": question}, {"from": "gpt", "value": answer})
    ]


def paragraph(rng: np.random.Generator, words: int) -> str:
    text = []
    while sum(len(sentence.split()) for sentence in text) < words:
        text.append(str(rng.choice(SENTENCES)))
    return " ".join(text)


def sharegpt_id(rng: np.random.Generator) -> str:
    letters = string.ascii_letters + string.digits
    return "".join(rng.choice(list(letters), 7)) + f"_{int(rng.integers(0, 4))}"


class Generator:
    def __init__(self, settings: dict, images: Path, stats: StageStats):
        self.rng = np.random.default_rng(settings["seed"])
        self.after_share = settings["train"]["tag_after_question"]
        self.images, self.stats = images, stats
        self.numbers = iter(range(1, 1 << 30))

    def save(self, picture, folder: str, name: str) -> str:
        path = f"{folder}/{name}.jpg"
        (self.images / path).parent.mkdir(parents=True, exist_ok=True)
        picture.render().save(self.images / path, format="JPEG", quality=90)
        return path

    def coco(self) -> dict:
        number = next(self.numbers)
        scene = Scene(self.rng)
        asked = scene.questions()[: int(self.rng.integers(1, 4))]
        turns = [(q, f"The answer is {a}.") for _, q, a in asked]
        turns[0] = (with_image(turns[0][0], self.rng, self.after_share), turns[0][1])
        image = self.save(scene, "coco/train2017", f"{number:012d}")
        return {"id": f"{number:012d}", "image": image, "conversations": conversation(turns)}

    def gqa(self) -> dict:
        number = next(self.numbers)
        scene = Scene(self.rng)
        _, question, answer = scene.questions()[int(self.rng.integers(0, 3))]
        image = self.save(scene, "gqa/images", f"n{number}")
        question = with_image(question, self.rng, self.after_share) + GQA_SUFFIX
        return {"id": f"{number}", "image": image, "conversations": conversation([(question, answer)])}

    def ocr_vqa(self) -> dict:
        number = next(self.numbers)
        book = Book(self.rng)
        asked = book.questions()[: int(self.rng.integers(2, 5))]
        turns = [(q + GQA_SUFFIX if position == 0 else q, a) for position, (_, q, a) in enumerate(asked)]
        turns[0] = (with_image(turns[0][0], self.rng, self.after_share), turns[0][1])
        image = self.save(book, "ocr_vqa/images", f"{number:010d}")
        return {"id": f"{number:010d}", "image": image, "conversations": conversation(turns)}

    def sharegpt(self, words: int = 60) -> dict:
        turns = [
            (f"Explain how {self.rng.choice(TOPICS)} works.", paragraph(self.rng, words))
            for _ in range(int(self.rng.integers(1, 4)))
        ]
        return {"id": sharegpt_id(self.rng), "model": "", "conversations": conversation(turns)}

    def long_text(self) -> dict:
        return self.sharegpt(words=3000)

    def long_after_image(self) -> dict:
        record = self.coco()
        record["conversations"][1]["value"] += " " + paragraph(self.rng, 3000)
        return record

    def image_late(self) -> dict:
        """The image in a later turn, after more text than max_length holds."""
        number = next(self.numbers)
        scene = Scene(self.rng)
        _, question, answer = scene.questions()[0]
        image = self.save(scene, "coco/train2017", f"{number:012d}")
        turns = [("Tell me a long story.", paragraph(self.rng, 3000)), (f"<image>\n{question}", answer)]
        return {"id": f"{number:012d}", "image": image, "conversations": conversation(turns)}

    def two_images(self) -> dict:
        number = next(self.numbers)
        first, second = (self.save(Scene(self.rng), "coco/train2017", f"{number:012d}_{side}") for side in "ab")
        turns = [("<image>\n<image>\nWhat differs between the two images?", "The shapes differ.")]
        return {"id": f"{number:012d}", "image": [first, second], "conversations": conversation(turns)}

    def train(self, counts: dict) -> list[dict]:
        records = [getattr(self, kind)() for kind, n in counts.items() for _ in range(n)]
        for kind, n in counts.items():
            self.stats.add(f"train_{kind}", n)
        return [records[i] for i in self.rng.permutation(len(records))]

    def test(self, per_type: int) -> list[dict]:
        """Single questions per type, on images never used for training."""
        records = []
        for kind in TYPES:
            for _ in range(per_type):
                number = next(self.numbers)
                self.stats.add(f"test_{kind}")
                if kind == "text":
                    a, b = (int(v) for v in self.rng.integers(0, 10, 2))
                    records.append(
                        {
                            "id": f"test-{number}",
                            "question_type": kind,
                            "conversations": conversation(
                                [(f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b])]
                            ),
                        }
                    )
                    continue
                picture = Book(self.rng) if kind == "ocr" else Scene(self.rng)
                _, question, answer = next(q for q in picture.questions() if q[0] == kind)
                image = self.save(picture, "coco/val2017", f"{number:012d}")
                records.append(
                    {
                        "id": f"test-{number}",
                        "image": image,
                        "question_type": kind,
                        "conversations": conversation([(f"<image>\n{question}{GQA_SUFFIX}", answer)]),
                    }
                )
        return records


def generate(settings: dict, train_json: Path, test_json: Path, image_root: Path, stats: StageStats) -> None:
    with atomic_path(image_root, seal=False) as images:
        images.mkdir()
        generator = Generator(settings, images, stats)
        train = generator.train({kind: n for kind, n in settings["train"].items() if kind != "tag_after_question"})
        test = generator.test(settings["test"]["per_type"])
    write_records(train, train_json)
    write_records(test, test_json)
    stats.add("out", len(train) + len(test))
