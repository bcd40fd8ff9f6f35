"""LLaVA-format records: validation and the mapping to chat messages.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.
The same mapping feeds proxy training and trajectory extraction, so both see one input. Records in
LLaMA-Factory's multimodal ShareGPT form are read as this one (:func:`as_llava`).
"""

from __future__ import annotations

from pathlib import PurePosixPath

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}


class InvalidRecord(ValueError):
    """A record that cannot be used; ``reason`` is the short code written to the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# LLaMA-Factory's ShareGPT roles (its `messages` column with role/content tags) as LLaVA's.
SHAREGPT_ROLES = {role: speaker for speaker, role in ROLES.items()}


def as_llava(record: object) -> object:
    """A record in LLaMA-Factory's multimodal ShareGPT form as the LLaVA record it stands for; any other
    record as it is.

    ShareGPT: ``messages`` of ``{"role": "user"|"assistant", "content": str}`` or ``conversations`` of
    ``{"from": "human"|"gpt", "value": str}``, with an ``images`` list (paths relative to the image root,
    ``<image>`` tags where they go, as in LLaVA). Other fields are kept. What does not map (a ``system``
    or tool turn, content that is not a string) is carried as it is, for validation to name.
    """
    if not isinstance(record, dict) or "image" in record:
        return record
    messages = record.get("messages") if "conversations" not in record else None
    images = record.get("images")
    if not isinstance(messages, list) and not isinstance(images, list):
        return record
    converted = {key: value for key, value in record.items() if key not in ("messages", "images")}
    if isinstance(messages, list):
        converted["conversations"] = [as_turn(message) for message in messages]
    if isinstance(images, list) and images:
        converted["image"] = images[0] if len(images) == 1 else images
    elif images is not None and not isinstance(images, list):
        converted["image"] = images  # not a list: validation names it
    return converted


def as_turn(message: object) -> object:
    if not isinstance(message, dict) or "role" not in message:
        return message
    role = message["role"]
    return {"from": SHAREGPT_ROLES.get(role, role), "value": message.get("content")}


def record_id(record: object, index: int) -> str:
    """The record's own ``id`` (string or integer), else ``record-<index>``: the base of its uid.

    A lone surrogate (JSON allows ``\\udcff``, UTF-8 cannot store it) is written as its escape, so
    the uid can be stored; such a record is excluded as ``invalid_unicode``.
    """
    raw = record.get("id") if isinstance(record, dict) else None
    if isinstance(raw, (str, int)) and not isinstance(raw, bool) and str(raw):
        return str(raw) if utf8_encodable(str(raw)) else str(raw).encode("utf-8", "backslashreplace").decode()
    return f"record-{index}"


def utf8_encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def all_text_encodable(value: object) -> bool:
    """Whether every string and key in a JSON value can be encoded as UTF-8 (fast: most records are)."""
    if isinstance(value, str):
        return utf8_encodable(value)
    if isinstance(value, dict):
        for key, item in value.items():
            if not (utf8_encodable(key) and all_text_encodable(item)):
                return False
    elif isinstance(value, list):
        for item in value:
            if not all_text_encodable(item):
                return False
    return True


def invalid_unicode_field(value: object, where: str = "") -> str | None:
    """The field (as ``['conversations'][1]['value']``) of the first string or key that UTF-8 cannot encode."""
    if all_text_encodable(value):
        return None
    if isinstance(value, str):
        return where
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(key, str) and not utf8_encodable(key):
            return f"{where}[{ascii(key)}] (its key)"
        found = invalid_unicode_field(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


def matches_uid(record: object, index: int, uid: str) -> bool:
    """Whether ``uid`` was given to this record: its id, or its id with a ``#n`` duplicate suffix."""
    base = record_id(record, index)
    return uid == base or uid.startswith(base + "#")


def image_paths(record: dict) -> list[str]:
    image = record.get("image")
    if image is None or image == "":
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(item, str) for item in image):
        return list(image)
    raise InvalidRecord("image_field_malformed", f"'image' must be a string or a list of strings, got {image!r}")


def check_conversation(record: dict, max_images: int) -> list[str]:
    """Validate the structure of one record; return its image paths. Raises InvalidRecord."""
    field = invalid_unicode_field(record)
    if field is not None:
        raise InvalidRecord(
            "invalid_unicode",
            f"field {field} holds a lone surrogate (a \\ud800-\\udfff escape), "
            "which is not text UTF-8 can store or a tokenizer can read",
        )
    turns = record.get("conversations")
    if turns is None:
        raise InvalidRecord("conversations_missing", "no 'conversations' field")
    if not isinstance(turns, list) or not turns:
        raise InvalidRecord("conversations_empty", "'conversations' is empty or not a list")
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise InvalidRecord("turn_malformed", f"turn {position} needs 'from' in human/gpt and a string 'value'")
        expected = "human" if position % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise InvalidRecord(
                "turns_not_alternating", f"turn {position} is from {turn['from']!r}, expected {expected!r}"
            )
    if len(turns) % 2:
        raise InvalidRecord("turns_not_alternating", "the last human turn has no gpt answer")
    paths = image_paths(record)
    tags = sum(turn["value"].count(IMAGE_TAG) for turn in turns)
    if any(IMAGE_TAG in turn["value"] for turn in turns if turn["from"] == "gpt"):
        raise InvalidRecord("image_tag_misplaced", f"a gpt turn contains {IMAGE_TAG}")
    if paths and tags == 0:
        raise InvalidRecord("image_without_tag", f"'image' is set but no turn contains {IMAGE_TAG}")
    if tags and not paths:
        raise InvalidRecord("tag_without_image", f"{IMAGE_TAG} appears {tags}x but the record has no 'image'")
    if len(paths) > max_images or tags > max_images:
        raise InvalidRecord("too_many_images", f"{max(len(paths), tags)} images, the proxy supports {max_images}")
    if tags != len(paths):
        raise InvalidRecord("image_tag_count_mismatch", f"{tags} {IMAGE_TAG} tags for {len(paths)} images")
    for path in paths:
        check_relative_path(path)
    return paths


def check_relative_path(path: str) -> None:
    pure = PurePosixPath(path.replace("\\", "/"))
    if pure.is_absolute() or path.startswith("~") or ".." in pure.parts:
        raise InvalidRecord("image_path_unsafe", f"image path {path!r} is absolute or leaves the image root")


IMAGE_POSITIONS = ("front", "keep")


def to_messages(record: dict, image_position: str = "front") -> list[dict]:
    """Map LLaVA turns to chat messages, the text of every turn unchanged but for the image.

    ``front`` moves the image to the front of its turn as LLaVA and TinyLLaVA do before training
    (``<image>`` + newline + the rest of the turn, stripped); ``keep`` leaves it where the record
    puts it. Chat templates render the items in order, the image as ``<image>``.
    """
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"image_position must be one of {IMAGE_POSITIONS}, got {image_position!r}")
    messages = []
    for turn in record["conversations"]:
        value = turn["value"]
        if IMAGE_TAG not in value:
            content = [{"type": "text", "text": value}]
        elif image_position == "front":
            rest = value.replace(IMAGE_TAG, "").strip()
            images = [{"type": "image"}] * value.count(IMAGE_TAG)
            content = [*images, {"type": "text", "text": "\n" + rest}] if rest else images
        else:
            content = []
            for position, piece in enumerate(value.split(IMAGE_TAG)):
                if position > 0:
                    content.append({"type": "image"})
                if piece:
                    content.append({"type": "text", "text": piece})
        messages.append({"role": ROLES[turn["from"]], "content": content})
    return messages
