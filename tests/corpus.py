"""Bad records, one or more per exclusion reason of `prepare`, with the reason each must get."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

BROKEN_IMAGE = "bad/broken.png"


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def bad_records() -> list[tuple[object, str]]:
    """(record, reason) pairs for records prepare must exclude (with max_images=1)."""
    image = "bad/ok.png"  # exists and decodes, so only the named defect can exclude the record
    return [
        ("a string, not a record", "record_not_object"),
        ({"id": "bad-no-conversations", "image": image}, "conversations_missing"),
        ({"id": "bad-empty-conversations", "conversations": []}, "conversations_empty"),
        (
            {"id": "bad-turn", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
            "turn_malformed",
        ),
        ({"id": "bad-order", "conversations": turns("q", "a")[::-1]}, "turns_not_alternating"),
        ({"id": "bad-unanswered", "conversations": turns("q", "a", "q again")}, "turns_not_alternating"),
        (
            {"id": "bad-tag-in-answer", "image": image, "conversations": turns("<image> q", "a <image>")},
            "image_tag_misplaced",
        ),
        ({"id": "bad-image-without-tag", "image": image, "conversations": turns("q", "a")}, "image_without_tag"),
        ({"id": "bad-tag-without-image", "conversations": turns("<image> q", "a")}, "tag_without_image"),
        (
            {"id": "bad-two-images", "image": [image, image], "conversations": turns("<image><image> q", "a")},
            "too_many_images",
        ),
        (
            {"id": "bad-absolute", "image": "/etc/hostname", "conversations": turns("<image> q", "a")},
            "image_path_unsafe",
        ),
        (
            {"id": "bad-escape", "image": "../outside.png", "conversations": turns("<image> q", "a")},
            "image_path_unsafe",
        ),
        (
            {"id": "bad-image-field", "image": {"path": image}, "conversations": turns("<image> q", "a")},
            "image_field_malformed",
        ),
        (
            {"id": "bad-missing-file", "image": "bad/nowhere.png", "conversations": turns("<image> q", "a")},
            "image_missing",
        ),
        (
            {"id": "bad-undecodable", "image": BROKEN_IMAGE, "conversations": turns("<image> q", "a")},
            "image_unreadable",
        ),
    ]


def write_bad_images(image_root: Path) -> None:
    (image_root / "bad").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(image_root / "bad/ok.png")
    (image_root / BROKEN_IMAGE).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
