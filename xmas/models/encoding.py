"""Turn records into model inputs exactly as the model trains on them.

Training, extraction, the loss baseline and ``prepare``'s length check all go through
:class:`ConversationEncoder`, so the proxy sees the same tokens everywhere. The conventions that
are not part of the processor itself (where the image goes in its turn, how many tokens fit) are
an :class:`Encoding`, saved in every checkpoint folder next to the processor.

Each record is encoded on its own, with the tokenizer's special tokens (a BOS where the tokenizer
adds one), then cut to ``max_length`` at the end, as LLaVA truncates; a batch is padded on the
right, as LLaVA trains. Labels cover the assistant turns only; they are found from the chat
template itself (the text a turn adds after the generation prompt), not from any model's markers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image

from xmas.data.records import IMAGE_POSITIONS, IMAGE_TAG, image_paths, to_messages
from xmas.errors import XmasError
from xmas.io import read_json
from xmas.models.recipe import IGNORE_INDEX

ENCODING_FILE = "xmas_encoding.json"


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How records become inputs beyond what the processor holds (its chat template and image settings)."""

    image_position: str  # front: the image moved to the front of its turn (LLaVA); keep: where the record has it
    max_length: int  # tokens after every image is expanded; longer conversations are cut at the end
    image_tokens: int  # tokens one image expands into

    def __post_init__(self):
        if self.image_position not in IMAGE_POSITIONS:
            raise XmasError(f"image_position must be one of {', '.join(IMAGE_POSITIONS)}, got {self.image_position!r}")
        if self.max_length <= self.image_tokens:
            raise XmasError(f"max_length {self.max_length} leaves no room for text after an image of "
                            f"{self.image_tokens} tokens")

    def save(self, folder: Path) -> None:
        (Path(folder) / ENCODING_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Encoding:
        path = Path(folder) / ENCODING_FILE
        if not path.is_file():
            raise XmasError(f"{folder} has no {ENCODING_FILE}: it was not written by `xmas proxy-init` (or an "
                            "xmas stage that copies it); build the checkpoint with proxy-init")
        try:
            return cls(**read_json(path))
        except (json.JSONDecodeError, TypeError) as error:
            raise XmasError(f"{path}: not a valid encoding file ({error}); run proxy-init again") from None


def image_tokens_of(processor) -> int:
    """How many tokens the processor expands one image into, counted on a blank image."""
    size = getattr(processor.image_processor, "crop_size", None) or getattr(processor.image_processor, "size", None)
    side = max((size or {}).values(), default=224) if isinstance(size, dict) else 224
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    batch = processor(text=[IMAGE_TAG], images=[Image.new("RGB", (side, side))], return_tensors="pt")
    return int((batch["input_ids"] == image_token_id).sum())


def record_images(records: list[dict], image_root: Path) -> list[Image.Image]:
    """The RGB images of the records, in record order (the processor's expected order)."""
    images = []
    for record in records:
        for path in image_paths(record):
            with Image.open(Path(image_root) / path) as image:
                images.append(image.convert("RGB"))
    return images


@dataclasses.dataclass(frozen=True)
class Length:
    """A record's length in tokens once its images are expanded, before any cut."""

    tokens: int
    image_end: int  # position just after the last image token; 0 without an image

    def fits(self, max_length: int) -> bool:
        """Every image token and at least one text token after the last image are within ``max_length``."""
        return self.image_end < max_length if self.image_end else True


class ConversationEncoder:
    def __init__(self, processor, image_root: str | Path | None, encoding: Encoding,
                 device: torch.device | str = "cpu"):
        self.processor, self.encoding = processor, encoding
        self.device = torch.device(device)
        self.tokenizer = processor.tokenizer
        self.image_root = Path(image_root) if image_root is not None else None
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise XmasError("the tokenizer has no pad token; proxy-init gives it one")

    @classmethod
    def of_checkpoint(cls, folder: Path, processor=None, image_root: str | Path | None = None,
                      device: torch.device | str = "cpu") -> ConversationEncoder:
        """The encoder a checkpoint folder was built and trained with: its processor and its Encoding."""
        if processor is None:
            from transformers import AutoProcessor

            if not (Path(folder) / "config.json").is_file():
                raise XmasError(f"{folder} is not a model checkpoint (no config.json); build it with `xmas proxy-init`")
            processor = AutoProcessor.from_pretrained(folder)
        return cls(processor, image_root, Encoding.load(folder), device)

    def text(self, record: dict) -> str:
        return self.processor.apply_chat_template(to_messages(record, self.encoding.image_position), tokenize=False)

    def render(self, record: dict) -> tuple[str, list[tuple[int, int]]]:
        """The chat-template text of the whole conversation and the character spans of assistant turns."""
        messages = to_messages(record, self.encoding.image_position)
        template = self.processor.apply_chat_template
        text = template(messages, tokenize=False)
        spans = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template(messages[:turn], tokenize=False, add_generation_prompt=True)
            answered = template(messages[: turn + 1], tokenize=False)
            if not (text.startswith(answered) and answered.startswith(prompt)):
                raise XmasError(f"record {record.get('id')!r}: the chat template is not prefix-stable; "
                                "assistant turns (the labels) cannot be located")
            spans.append((len(prompt), len(answered)))
        return text, spans

    def lengths(self, records: list[dict]) -> list[Length]:
        """Token lengths of records, tokenized in one batch (fast tokenizers use every core)."""
        ids = self.tokenizer([self.text(record) for record in records], add_special_tokens=True)["input_ids"]
        extra = self.encoding.image_tokens - 1
        lengths = []
        for row in ids:
            images = [position for position, token in enumerate(row) if token == self.image_token_id]
            image_end = images[-1] + 1 + len(images) * extra if images else 0
            lengths.append(Length(len(row) + len(images) * extra, image_end))
        return lengths

    def answer_mask(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoded["offset_mapping"]]
        return encoded["input_ids"], mask

    def expand_mask(self, ids: list[int], mask: list[bool], expanded: list[int]) -> list[bool]:
        """Carry a per-token mask over the processor's expansion of each image token into many."""
        out, position = [], 0
        for token in expanded:
            if token == self.image_token_id:
                out.append(False)
                if position < len(ids) and ids[position] == self.image_token_id:
                    position += 1
                continue
            if position >= len(ids) or ids[position] != token:
                raise XmasError("processor output does not align with the tokenizer's; cannot place labels")
            out.append(mask[position])
            position += 1
        return out

    def encode(self, record: dict, with_labels: bool) -> dict[str, torch.Tensor]:
        """One record's inputs, cut to ``max_length``; labels mark its assistant turns."""
        text, spans = self.render(record) if with_labels else (self.text(record), [])
        images = record_images([record], self.image_root) if image_paths(record) else []
        encoded = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = encoded.pop("input_ids")[0]
        encoded.pop("attention_mask", None)
        keep = min(len(ids), self.encoding.max_length)
        if int((ids[:keep] == self.image_token_id).sum()) != len(images) * self.encoding.image_tokens:
            raise XmasError(f"record {record.get('id')!r}: its image does not fit in max_length "
                            f"{self.encoding.max_length}; `xmas prepare` excludes such records")
        item = {"input_ids": ids[:keep], **encoded}
        if with_labels:
            mask = torch.tensor(self.expand_mask(*self.answer_mask(text, spans), ids.tolist()), dtype=torch.bool)
            item["labels"] = torch.where(mask, ids, IGNORE_INDEX)[:keep]
        return item

    def __call__(self, records: list[dict], with_labels: bool = True) -> dict[str, torch.Tensor]:
        return self.collate([self.encode(record, with_labels) for record in records])

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad on the right: ids with the pad token, labels with IGNORE_INDEX; image tensors are stacked."""
        width = max(len(item["input_ids"]) for item in items)
        batch = {"input_ids": torch.full((len(items), width), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(items), width), dtype=torch.long)}
        if "labels" in items[0]:
            batch["labels"] = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            batch["input_ids"][row, :length] = item["input_ids"]
            batch["attention_mask"][row, :length] = 1
            if "labels" in batch:
                batch["labels"][row, :length] = item["labels"]
        for name in sorted(set().union(*items) - {"input_ids", "labels"}):  # pixel_values and the like
            batch[name] = torch.cat([item[name] for item in items if name in item])
        return {name: tensor.to(self.device) for name, tensor in batch.items()}
