"""LLaVA-format records: validation and the mapping to chat messages.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.
The same mapping feeds proxy training and trajectory extraction, so both see one input. Records in
LLaMA-Factory's multimodal ShareGPT form are read as this one (:func:`as_llava`).
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}


class InvalidRecord(ValueError):
    """A record that cannot be used; ``reason`` is the short code written to the manifest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# A record's embedded images (parquet's ``{bytes, path}`` structs), by position among its images; None where
# an image is a file under the image root. Only records read from a table have it.
EMBEDDED = "_image_bytes"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a record keeps its parts, named as LLaMA-Factory's ``dataset_info.json`` names them: the
    ``columns`` (messages, images, plus id and source) and the ``tags`` of the messages. ``role_tag`` None
    reads each message as a pair of turns, ``{user_tag: ..., assistant_tag: ...}`` (The Cauldron's
    ``texts``), whose images go before the first question, as those sets have no ``<image>`` tags."""

    messages: str = "conversations"
    images: str = "image"
    id: str = "id"
    source: str = "source"
    role_tag: str | None = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"

    def changed(self, columns: dict | None = None, tags: dict | None = None) -> Layout:
        """This layout with some columns and tags renamed (settings ``dataset.columns``, ``dataset.tags``)."""
        known = {item.name for item in dataclasses.fields(self)}
        changes = {**(columns or {}), **(tags or {})}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a column or tag a record is read by ({', '.join(known)})")
        return dataclasses.replace(self, **changes)

    def as_llava(self, record: object) -> object:
        """The LLaVA record this one stands for; what does not map is carried as it is, for validation to
        name. Other fields are kept."""
        if not isinstance(record, dict):
            return record
        converted = {key: value for key, value in record.items() if key not in (self.messages, self.images)}
        for field, column in (("id", self.id), ("source", self.source)):
            if column != field and column in record:
                converted[field] = record[column]
        turns = record.get(self.messages)
        if turns is not None:
            converted["conversations"] = self.turns(turns) if isinstance(turns, list) else turns
        names, blobs = embedded_images(record.get(self.images))
        if names is None:
            converted["image"] = record.get(self.images)  # malformed: validation names it
        elif names:
            converted["image"] = names[0] if len(names) == 1 and not any(blobs) else names
            if any(blob is not None for blob in blobs):
                converted[EMBEDDED] = blobs
            if self.role_tag is None:
                tag_images_first(converted, len(names))
        if self.role_tag is None and "source" not in converted and isinstance(turns, list) and turns:
            first = turns[0]
            if isinstance(first, dict) and isinstance(first.get("source"), str):
                converted["source"] = first["source"]
        return converted

    def turns(self, messages: list) -> list:
        if self.role_tag is None:
            return [
                turn
                for message in messages
                for turn in (
                    (
                        {"from": "human", "value": message.get(self.user_tag)},
                        {"from": "gpt", "value": message.get(self.assistant_tag)},
                    )
                    if isinstance(message, dict)
                    else (message,)
                )
            ]
        speakers = {self.user_tag: "human", self.assistant_tag: "gpt"}
        return [
            {
                "from": speakers.get(message[self.role_tag], message[self.role_tag]),
                "value": message.get(self.content_tag),
            }
            if isinstance(message, dict) and self.role_tag in message
            else message
            for message in messages
        ]


def tag_images_first(record: dict, count: int) -> None:
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and isinstance(turns[0].get("value"), str):
        if IMAGE_TAG not in turns[0]["value"]:
            turns[0] = {**turns[0], "value": IMAGE_TAG * count + "\n" + turns[0]["value"]}


def embedded_images(value: object) -> tuple[list[str] | None, list[bytes | None]]:
    """(names, bytes) of a record's images: paths (a string or a list of them) or ``{bytes, path}`` structs
    (or a list of them); ``(None, [])`` when the value is neither. An embedded image without a path is named
    by its position (``image 0``)."""
    if value is None or value == "" or value == []:
        return [], []
    items = value if isinstance(value, list) else [value]
    names, blobs = [], []
    for position, item in enumerate(items):
        if isinstance(item, str):
            names.append(item)
            blobs.append(None)
        elif isinstance(item, dict) and isinstance(item.get("bytes"), bytes):
            names.append(item.get("path") or f"image {position}")
            blobs.append(item["bytes"])
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
            names.append(item["path"])  # datasets' Image with a path only: a file under the image root
            blobs.append(None)
        else:
            return None, []
    return names, blobs


# The layouts read without settings: LLaVA's (also LLaVA-OneVision-Data's and LLaVA-NeXT-Data's parquet, whose
# source column is data_source), LLaMA-Factory's ShareGPT with OpenAI-style messages, and The Cauldron's.
LLAVA = Layout()
SHAREGPT = Layout(
    messages="messages",
    images="images",
    role_tag="role",
    content_tag="content",
    user_tag="user",
    assistant_tag="assistant",
)
# LLaMA-Factory's defaults for a ShareGPT entry of dataset_info.json that names no columns or tags.
LLAMAFACTORY_DEFAULT = Layout(images="images")
CAULDRON = Layout(messages="texts", images="images", role_tag=None, user_tag="user", assistant_tag="assistant")


def layout_of_record(record: object) -> Layout:
    """The layout a JSON record of unknown layout is in: LLaVA's, or ShareGPT's (``messages`` or an
    ``images`` list)."""
    if not isinstance(record, dict) or "image" in record:
        return LLAVA
    if "conversations" not in record and isinstance(record.get("messages"), list):
        return SHAREGPT
    return LLAMAFACTORY_DEFAULT if isinstance(record.get("images"), list) else LLAVA


def as_llava(record: object) -> object:
    """A record in LLaVA's or LLaMA-Factory's ShareGPT layout (told apart by its keys) as a LLaVA record."""
    layout = layout_of_record(record)
    return record if layout is LLAVA else layout.as_llava(record)


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
            f"field {field} holds a lone surrogate (a \\ud800-\\udfff escape in JSON, bytes that are not UTF-8 in "
            "parquet), which is not text UTF-8 can store or a tokenizer can read",
        )
    turns = record.get("conversations")
    if turns is None:
        raise InvalidRecord("conversations_missing", "no 'conversations' field")
    if not isinstance(turns, list) or not turns:
        raise InvalidRecord("conversations_empty", "'conversations' is empty or not a list")
    for position, turn in enumerate(turns):
        if isinstance(turn, dict) and turn.get("from") in ("system", "tool", "function_call", "observation"):
            raise InvalidRecord(
                "turn_role_unsupported",
                f"turn {position} is a {turn['from']} turn; selection reads user and assistant turns only",
            )
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
    for path, blob in images_with_bytes(record):
        if blob is None:
            check_relative_path(path)
    return paths


def images_with_bytes(record: dict) -> list[tuple[str, bytes | None]]:
    """Each of the record's images (:func:`image_paths`) with its embedded bytes, None for a file under the
    image root."""
    paths = image_paths(record)
    return list(zip(paths, record.get(EMBEDDED) or [None] * len(paths)))


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
