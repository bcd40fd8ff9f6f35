"""The ``utils.py`` of the local lmms-eval tasks that ``xmas.evaluation.local_task`` writes.

lmms-eval imports this file from the task folder (``!function utils.<name>`` in the task YAML), in
its own process, so it needs nothing but the standard library and Pillow. ``xmas evaluate --suite
exact-match`` scores with the same :func:`normalize_answer`, so both suites count an answer alike.

Each doc is one question of the held-out split: ``content`` (the user's turn as chat items, the
images where the model's encoding puts them), ``question`` (the same as text, each image as
``<image>``), ``answer`` (the reference), ``images`` (absolute paths) and ``benchmark``.
lmms-eval's chat models read ``doc_to_messages``; its simple ones (``--force_simple``, which xmas
uses) read ``doc_to_visual`` and ``doc_to_text`` and leave a prompt that holds ``<image>`` as it is.
"""

from __future__ import annotations

import re

from PIL import Image

NUMBER_WORDS = {
    word: str(n)
    for n, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, numbers as digits: 'The Two.' and '2' match."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words if word not in ARTICLES)


def open_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def doc_to_visual(doc: dict) -> list:
    return [open_rgb(path) for path in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_messages(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> list[dict]:
    images = iter(doc_to_visual(doc))
    content = [
        {"type": "image", "url": next(images)} if item["type"] == "image" else {"type": "text", "text": item["text"]}
        for item in doc["content"]
    ]
    return [{"role": "user", "content": content}]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict:
    """1.0 when the generated answer matches the reference after :func:`normalize_answer`, else 0.0."""
    return {"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}
