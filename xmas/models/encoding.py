"""Turn records into model inputs exactly as the model trains on them.

Training, extraction, the loss baseline and ``prepare``'s length check all go through
:class:`ConversationEncoder`, so the proxy sees the same tokens everywhere. The conventions that
are not part of the processor itself (where the image goes in its turn, how many tokens fit) are
an :class:`Encoding`, saved in every checkpoint folder next to the processor.

Each record is encoded on its own, with the tokenizer's special tokens (a BOS where the tokenizer
adds one), then cut to ``max_length`` at the end, as LLaVA truncates; a batch is padded on the
right, as LLaVA trains. Labels cover the assistant turns only; they are found from the chat
template itself (the text a turn adds after the generation prompt), not from any model's markers.
Each image's tokens are its family's run for its size (:mod:`xmas.models.image_tokens`), counted
without the pixels where only lengths are needed, and checked against the processor's output
wherever a record is encoded.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch
from PIL import Image

from xmas.data.records import IMAGE_POSITIONS, image_paths, images_with_bytes, to_messages
from xmas.errors import XmasError
from xmas.io import read_json
from xmas.models.image_tokens import ImageTokens, Run
from xmas.models.recipe import IGNORE_INDEX

ENCODING_FILE = "xmas_encoding.json"


@dataclasses.dataclass(frozen=True)
class Encoding:
    """How records become inputs beyond what the processor holds (its chat template and image settings)."""

    image_position: str  # front: the image moved to the front of its turn (LLaVA); keep: where the record has it
    max_length: int  # tokens after every image is expanded; longer conversations are cut at the end

    def __post_init__(self):
        if self.image_position not in IMAGE_POSITIONS:
            raise XmasError(f"image_position must be one of {', '.join(IMAGE_POSITIONS)}, got {self.image_position!r}")

    def save(self, folder: Path) -> None:
        (Path(folder) / ENCODING_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Encoding:
        path = Path(folder) / ENCODING_FILE
        if not path.is_file():
            raise XmasError(
                f"{folder} has no {ENCODING_FILE}: it was not written by `xmas proxy-init` (or an "
                "xmas stage that copies it); build the checkpoint with proxy-init"
            )
        try:
            saved = read_json(path)
            saved.pop("image_tokens", None)  # written by xmas before tokens were counted per image
            return cls(**saved)
        except (json.JSONDecodeError, TypeError, AttributeError) as error:
            raise XmasError(f"{path}: not a valid encoding file ({error}); run proxy-init again") from None


def image_files(record: dict, image_root: Path | None) -> list:
    """What to open for each of the record's images, in the order of its ``<image>`` tags (the processor's
    order): its embedded bytes, else its file under ``image_root``."""
    images = images_with_bytes(record)
    if image_root is None and any(blob is None for _, blob in images):
        raise XmasError(f"record {record.get('id')!r} names image files, but no image root was given (--image-root)")
    return [io.BytesIO(blob) if blob is not None else Path(image_root) / path for path, blob in images]


def open_images(record: dict, image_root: Path | None) -> list[Image.Image]:
    """The record's images in RGB, in the order of its ``<image>`` tags."""
    images = []
    for file in image_files(record, image_root):
        with Image.open(file) as image:
            images.append(image.convert("RGB"))
    return images


def image_sizes(record: dict, image_root: Path | None) -> list[tuple[int, int]]:
    """(width, height) of the record's images, read from their headers: no pixel is decoded."""
    sizes = []
    for file in image_files(record, image_root):
        with Image.open(file) as image:
            sizes.append(image.size)
    return sizes


@dataclasses.dataclass(frozen=True)
class Length:
    """A record's length in tokens once its images are expanded, before any cut."""

    tokens: int
    image_end: int  # position just after the last image token; 0 without an image

    def fits(self, max_length: int) -> bool:
        """Every image token and at least one text token after the last image are within ``max_length``."""
        return self.image_end < max_length if self.image_end else True


# Inputs that run along the tokens, and what pads them; the processor's other outputs are the images'.
PADDING = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX}


class ConversationEncoder:
    def __init__(
        self, processor, image_root: str | Path | None, encoding: Encoding, device: torch.device | str = "cpu"
    ):
        self.processor, self.encoding = processor, encoding
        self.device = torch.device(device)
        self.tokenizer = processor.tokenizer
        self.image_root = Path(image_root) if image_root is not None else None
        self.images = ImageTokens(processor)
        self.family = self.images.family
        self.image_token_id = self.images.image_token_id  # the attention block's columns
        self.placeholder_id = self.images.placeholder_id  # what the chat template writes for an image
        self.in_text = getattr(self.images.layout, "in_text", False)
        self.special_tokens = not self.template_writes_bos()
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise XmasError("the tokenizer has no pad token; proxy-init gives it one")
        self.padding = {**PADDING, "input_ids": self.pad_token_id, **dict.fromkeys(self.family.token_inputs, 0)}

    @classmethod
    def of_checkpoint(
        cls, folder: Path, processor=None, image_root: str | Path | None = None, device: torch.device | str = "cpu"
    ) -> ConversationEncoder:
        """The encoder a checkpoint folder was built and trained with: its processor and its Encoding."""
        if processor is None:
            from xmas.models.checkpoints import load_processor

            if not (Path(folder) / "config.json").is_file():
                raise XmasError(f"{folder} is not a model checkpoint (no config.json); build it with `xmas proxy-init`")
            processor = load_processor(folder)
        return cls(processor, image_root, Encoding.load(folder), device)

    def template_writes_bos(self) -> bool:
        """Whether the chat template writes the tokenizer's BOS itself (Gemma's): then the tokenizer adds none, as
        the family's own ``apply_chat_template(tokenize=True)`` does, so a record starts with one BOS."""
        bos = self.tokenizer.bos_token
        if bos is None:
            return False
        probe = [{"role": "user", "content": [{"type": "text", "text": "Hi."}]}]
        return self.processor.apply_chat_template(probe, tokenize=False).startswith(bos)

    def messages(self, record: dict) -> list[dict]:
        messages = to_messages(record, self.encoding.image_position)
        return after_image_lines(messages) if self.family.image_line else messages

    def text(self, record: dict) -> str:
        return self.processor.apply_chat_template(self.messages(record), tokenize=False)

    def render(self, record: dict) -> tuple[str, list[tuple[int, int]]]:
        """The chat-template text of the whole conversation and the character spans of assistant turns."""
        messages = self.messages(record)
        template = self.processor.apply_chat_template
        text = template(messages, tokenize=False)
        spans = []
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = template(messages[:turn], tokenize=False, add_generation_prompt=True)
            answered = template(messages[: turn + 1], tokenize=False)
            if not (text.startswith(answered) and answered.startswith(prompt)):
                raise XmasError(
                    f"record {record.get('id')!r}: the chat template is not prefix-stable; "
                    "assistant turns (the labels) cannot be located"
                )
            spans.append((len(prompt), len(answered)))
        return text, spans

    def sizes(self, record: dict) -> list[tuple[int, int]]:
        """The sizes of the record's images, where the family's tokens depend on them (else unread)."""
        if self.family.layout == "fixed":
            return [(1, 1)] * len(image_paths(record))
        return image_sizes(record, self.image_root)

    def runs(self, ids: list[int], sizes: list[tuple[int, int]], record: dict) -> list[Run]:
        """The token run of each image placeholder of ``ids``, in order."""
        placeholders = sum(1 for token in ids if token == self.placeholder_id)
        if placeholders != len(sizes):
            raise XmasError(
                f"record {record.get('id')!r}: its text holds {placeholders} image tokens "
                f"({self.processor.image_token}) for {len(sizes)} images"
            )
        return [self.images.run(width, height, len(sizes)) for width, height in sizes]

    def too_many_images(self, record: dict) -> str | None:
        """Why the record holds more images than models of this family take; None when it does not."""
        limit, count = self.family.images_per_record, len(image_paths(record))
        if limit is None or count <= limit:
            return None
        return f"{count} images, but {self.family.name} models take {limit} per record"

    def lengths(self, records: list[dict]) -> list[Length]:
        """Token lengths of records, tokenized in one batch (fast tokenizers use every core), with each image's
        tokens counted from its size (a layout ``in_text``: the runs written into the text first)."""
        texts = [self.text(record) for record in records]
        if self.in_text:
            texts = [self.expanded(text, self.sizes(record), record)[0] for text, record in zip(texts, records)]
            ids = self.tokenizer(texts, add_special_tokens=self.special_tokens)["input_ids"]
            return [self.written_length(row) for row in ids]
        ids = self.tokenizer(texts, add_special_tokens=self.special_tokens)["input_ids"]
        return [self.length(row, self.runs(row, self.sizes(record), record)) for record, row in zip(records, ids)]

    def lengths_or_errors(self, records: list[dict]) -> list[Length | str]:
        """:meth:`lengths`, but a record the tokenizer, the template or its images' sizes cannot take gets its
        error (as text) instead."""
        try:
            return self.lengths(records)
        except Exception:  # noqa: BLE001 - find the records at fault, one by one
            found = []
            for record in records:
                try:
                    found += self.lengths([record])
                except Exception as error:  # noqa: BLE001 - any failure means the record cannot be encoded
                    found.append(f"{type(error).__name__}: {error}")
            return found

    def length(self, ids: list[int], runs: list[Run]) -> Length:
        tokens = len(ids) + sum(len(run.ids) - 1 for run in runs)
        if not runs:
            return Length(tokens, 0)
        last = max(position for position, token in enumerate(ids) if token == self.placeholder_id)
        before = sum(len(run.ids) - 1 for run in runs[:-1])
        return Length(tokens, last + before + runs[-1].last_image + 1)

    def written_length(self, ids: list[int]) -> Length:
        """The length of ids whose images are expanded already."""
        images = [position for position, token in enumerate(ids) if token == self.image_token_id]
        return Length(len(ids), images[-1] + 1 if images else 0)

    def expanded(self, text: str, sizes: list[tuple[int, int]], record: dict) -> tuple[str, list[tuple[int, int]]]:
        """The text with each image placeholder replaced by the text the processor writes for the image, and
        (position in ``text``, growth) of each replacement."""
        placeholder = self.processor.image_token
        pieces = text.split(placeholder)
        if len(pieces) - 1 != len(sizes):
            raise XmasError(
                f"record {record.get('id')!r}: its text holds {len(pieces) - 1} image tokens ({placeholder}) "
                f"for {len(sizes)} images"
            )
        written, growth, at = [pieces[0]], [], len(pieces[0])
        for (width, height), piece in zip(sizes, pieces[1:]):
            run = self.images.text(width, height, len(sizes))
            growth.append((at, len(run) - len(placeholder)))
            written += [run, piece]
            at += len(placeholder) + len(piece)
        return "".join(written), growth

    def answer_mask(
        self, text: str, spans: list[tuple[int, int]], sizes: list[tuple[int, int]], record: dict
    ) -> tuple[list[int], list[bool]]:
        """The text's ids and which of them the answer ``spans`` cover; a layout ``in_text`` has its images'
        runs written into the text first (the spans moved with them)."""
        if self.in_text:
            text, growth = self.expanded(text, sizes, record)
            spans = [tuple(edge + sum(g for at, g in growth if at < edge) for edge in span) for span in spans]
        encoded = self.tokenizer(text, add_special_tokens=self.special_tokens, return_offsets_mapping=True)
        mask = [any(start <= begin < end for start, end in spans) for begin, _ in encoded["offset_mapping"]]
        return encoded["input_ids"], mask

    def expand(self, ids: list[int], mask: list[bool], runs: list[Run]) -> tuple[list[int], list[bool]]:
        """``ids`` with each image placeholder replaced by its run; the mask carried over (False on images)."""
        expanded, expanded_mask, images = [], [], iter(runs)
        for token, flag in zip(ids, mask):
            if token == self.placeholder_id:
                run = next(images)
                expanded += run.ids
                expanded_mask += [False] * len(run.ids)
            else:
                expanded.append(token)
                expanded_mask.append(flag)
        return expanded, expanded_mask

    def processed(self, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The processor's output for one text and its images (a list of a sample's images, where the layout's
        processor takes them so: tiles, anyres)."""
        if not images:
            return self.processor(text=[text], return_tensors="pt", add_special_tokens=self.special_tokens)
        batched = [images] if self.images.layout.nested else images
        return self.processor(text=[text], images=batched, return_tensors="pt", add_special_tokens=self.special_tokens)

    def item(
        self, record: dict, text: str, spans: list[tuple[int, int]] | None, images: list[Image.Image], cut: bool = True
    ) -> dict[str, torch.Tensor]:
        """One sample's inputs: the processor's, checked token by token against the runs its images should
        become; cut to ``max_length`` (``cut``); labels on the ``spans`` (None: no labels)."""
        sizes = [image.size for image in images]
        ids, mask = self.answer_mask(text, spans or [], sizes, record)
        expected, label_mask = (ids, mask) if self.in_text else self.expand(ids, mask, self.runs(ids, sizes, record))
        encoded = dict(self.processed(text, images))
        written = encoded.pop("input_ids")[0]
        encoded.pop("attention_mask", None)
        if written.tolist() != expected:
            raise XmasError(
                f"record {record.get('id')!r}: the {self.family.name} processor wrote other tokens for "
                "its images than xmas.models.image_tokens counts; the family's layout is misdeclared"
            )
        keep = min(len(written), self.encoding.max_length) if cut else len(written)
        if int((written[:keep] == self.image_token_id).sum()) != int((written == self.image_token_id).sum()):
            raise XmasError(
                f"record {record.get('id')!r}: its image does not fit in max_length "
                f"{self.encoding.max_length}; `xmas prepare` excludes such records"
            )
        item = {"input_ids": written[:keep]}
        for name in self.family.token_inputs:
            item[name] = encoded.pop(name)[0][:keep]
        if spans is not None:
            item["labels"] = torch.where(torch.tensor(label_mask), written, IGNORE_INDEX)[:keep]
        return {**item, **encoded}

    def encode(self, record: dict, with_labels: bool) -> dict[str, torch.Tensor]:
        """One record's inputs, cut to ``max_length``; labels mark its assistant turns."""
        text, spans = self.render(record) if with_labels else (self.text(record), None)
        images = open_images(record, self.image_root) if image_paths(record) else []
        return self.item(record, text, spans, images)

    def prompt(self, messages: list[dict], record: dict) -> dict[str, torch.Tensor]:
        """The inputs that ask the model to answer after ``messages`` (the generation prompt), uncut."""
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        images = open_images(record, self.image_root) if image_paths(record) else []
        return self.item(record, text, None, images, cut=False)

    def filler_with_an_image(self) -> dict[str, torch.Tensor]:
        """A blank image alone in a user turn, nothing labelled: a row that runs the vision tower and projector
        and adds nothing to the loss (DeepSpeed needs every process to run the same modules)."""
        messages = [{"role": "user", "content": [{"type": "image"}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False)
        side = self.images.smallest_side()
        item = self.item({"id": "filler"}, text, None, [Image.new("RGB", (side, side))], cut=False)
        return {**item, "labels": torch.full_like(item["input_ids"], IGNORE_INDEX)}

    def __call__(self, records: list[dict], with_labels: bool = True) -> dict[str, torch.Tensor]:
        return self.collate([self.encode(record, with_labels) for record in records])

    def collate(self, items: list[dict[str, torch.Tensor]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Token inputs padded (on the right, as LLaVA trains; on the left to generate); the images' inputs of
        every item joined: image after image, or for tiles, tile after tile of one sample (the model takes
        them in order, as the image tokens come)."""
        width = max(len(item["input_ids"]) for item in items)
        token_names = [name for name in self.padding if name in items[0] or name == "attention_mask"]
        batch = {name: torch.full((len(items), width), self.padding[name], dtype=torch.long) for name in token_names}
        for row, item in enumerate(items):
            length = len(item["input_ids"])
            place = slice(0, length) if padding_side == "right" else slice(width - length, width)
            batch["attention_mask"][row, place] = 1
            for name in token_names:
                if name != "attention_mask":
                    batch[name][row, place] = item[name]
        for name in sorted(set().union(*items) - set(self.padding)):  # pixel_values and the like
            batch[name] = join_images(
                [item[name] for item in items if name in item], dim=1 if self.family.layout == "tiles" else 0
            )
        return {name: tensor.to(self.device) for name, tensor in batch.items()}


def after_image_lines(messages: list[dict]) -> list[dict]:
    """The messages with the newline that starts a text right after an image dropped: the family's template
    writes its own after the image (InternVL's ``<IMG_CONTEXT>\n``), as its training wrote one."""
    for message in messages:
        content = message["content"]
        for position, item in enumerate(content[1:], start=1):
            if item["type"] == "text" and content[position - 1]["type"] == "image" and item["text"].startswith("\n"):
                content[position] = {**item, "text": item["text"][1:]}
    return messages


def join_images(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Image inputs concatenated along ``dim``; trailing sizes that differ (tiles of other sizes) padded with 0."""
    trailing = [max(tensor.shape[axis] for tensor in tensors) for axis in range(dim + 1, tensors[0].dim())]
    padded = []
    for tensor in tensors:
        missing = [size - tensor.shape[axis] for axis, size in enumerate(trailing, start=dim + 1)]
        pad = [amount for difference in reversed(missing) for amount in (0, difference)]
        padded.append(torch.nn.functional.pad(tensor, pad) if any(missing) else tensor)
    return torch.cat(padded, dim=dim)
