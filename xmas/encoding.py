"""Turn records into model inputs with the processor's own chat template.

Training and extraction both call :class:`ConversationEncoder`, so the proxy sees the same
tokens in both. Labels cover the assistant turns only; they are found from the template
itself (the text a turn adds after the generation prompt), not from any model's markers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from xmas.errors import XmasError
from xmas.records import to_messages

IGNORE_INDEX = -100


def record_images(records: list[dict], image_root: Path) -> list[Image.Image]:
    """The RGB image of every record that has one, in record order (the processor's expected order)."""
    images = []
    for record in records:
        if record.get("image"):
            with Image.open(Path(image_root) / record["image"]) as image:
                images.append(image.convert("RGB"))
    return images


class ConversationEncoder:
    def __init__(self, processor, image_root: str | Path | None, max_length: int | None = None,
                 device: torch.device | str = "cpu"):
        self.processor = processor
        self.device = torch.device(device)
        self.tokenizer = processor.tokenizer
        self.image_root = Path(image_root) if image_root is not None else None
        self.max_length = max_length
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)

    def render(self, record: dict) -> tuple[str, list[tuple[int, int]]]:
        """The chat-template text of the whole conversation and the character spans of assistant turns."""
        messages = to_messages(record)
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
            start, end = len(prompt), len(answered)
            spans.append((start, end))
        return text, spans

    def assistant_token_mask(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
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

    def __call__(self, records: list[dict], with_labels: bool = True) -> dict[str, torch.Tensor]:
        rendered = [self.render(record) for record in records]
        images = record_images(records, self.image_root)
        batch = self.processor(
            text=[text for text, _ in rendered], images=images or None, return_tensors="pt",
            padding=True, truncation=self.max_length is not None, max_length=self.max_length,
        )
        if with_labels:
            labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
            for row, (text, spans) in enumerate(rendered):
                length = int(batch["attention_mask"][row].sum())
                expanded = batch["input_ids"][row, :length].tolist()
                mask = self.expand_mask(*self.assistant_token_mask(text, spans), expanded)
                keep = torch.tensor(mask[:length], dtype=torch.bool)
                labels[row, :length] = torch.where(keep, batch["input_ids"][row, :length], IGNORE_INDEX)
            batch["labels"] = labels
        return {name: tensor.to(self.device) for name, tensor in batch.items()}
