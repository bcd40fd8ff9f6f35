"""The proxy VLM: presets, checkpoint 0, and loading checkpoints for training and extraction.

A checkpoint is a standard Hugging Face folder (``save_pretrained`` of model and processor),
loadable with ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import yaml

from xmas.annotations import SPAN_COLUMNS, SourceRecords, read_examples
from xmas.errors import XmasError
from xmas.io import atomic_path
from xmas.records import IMAGE_TAG
from xmas.stage import StageStats, add_input_arguments

DEFAULT_PRESETS = Path(__file__).resolve().parents[1] / "resources" / "proxy_presets.yaml"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TAG]


def load_presets(path: Path = DEFAULT_PRESETS) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def resolve(proxy: str, presets: dict) -> dict:
    """A preset by name, else a local model folder, else a Hugging Face model id."""
    if proxy in presets:
        return {"name": proxy, **presets[proxy]}
    if Path(proxy).is_dir():
        return {"name": proxy, "kind": "pretrained", "path": proxy}
    if Path(proxy).exists() or proxy.startswith((".", "/")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", proxy):
        raise XmasError(f"proxy {proxy!r} is neither a preset ({', '.join(sorted(presets))}), "
                        "a model folder, nor a Hugging Face model id (owner/name)")
    return {"name": proxy, "kind": "pretrained", "path": proxy}


def train_tokenizer(texts: list[str]):
    """A word-level tokenizer over the dataset's own words (demo proxies have no pretrained vocabulary)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TAG}, padding_side="right",
    )


def corpus(records: list[dict], chat_template: str) -> list[str]:
    words_of_template = " ".join(re.findall(r"[A-Za-z]+:", chat_template))
    texts = [turn["value"].replace(IMAGE_TAG, " ") for record in records for turn in record["conversations"]]
    return [words_of_template, *texts]


def build_from_config(preset: dict, records: list[dict], seed: int):
    """Random-init LLaVA-architecture model + locally trained tokenizer + processor with chat template."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = train_tokenizer(corpus(records, preset["chat_template"]))
    size, patch = preset["image_size"], preset["patch_size"]
    image_tokens = (size // patch) ** 2
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=preset["chat_template"],
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=size, patch_size=patch, **preset["vision"]),
        text_config=LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                **preset["text"]),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TAG),
        image_seq_length=image_tokens, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor


def compute_device() -> torch.device:
    """The first visible GPU when torch sees one, else the CPU (also under a GPU grant without a driver)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Model and processor from a checkpoint folder (or, for ``proxy-init``, a Hugging Face id)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise XmasError(f"{path} is not a model checkpoint (no config.json)")
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    return model, AutoProcessor.from_pretrained(path)


def training_records(examples: Path, annotations: Path) -> SourceRecords:
    """The usable records (status ok) in source order, read from the file as they are used."""
    table = read_examples(examples, ["uid", "index", "status", *SPAN_COLUMNS])
    return SourceRecords(annotations, table[table.status == "ok"])


def init_proxy(proxy: str, presets: dict, examples: Path, annotations: Path, out: Path, seed: int,
               stats: StageStats) -> None:
    spec = resolve(proxy, presets)
    if spec["kind"] == "from-config":
        records = training_records(examples, annotations)
        model, processor = build_from_config(spec, records, seed)
        stats.add("in", len(records))
    elif spec["kind"] == "pretrained":
        model, processor = load_checkpoint(spec["path"])
    else:
        raise XmasError(f"proxy preset {proxy!r} has unknown kind {spec['kind']!r} (from-config, pretrained)")
    if getattr(processor, "chat_template", None) is None:
        raise XmasError(f"proxy {proxy!r}: its processor has no chat template; set one in the preset")
    stats.set("parameters", sum(p.numel() for p in model.parameters()))
    stats.set("proxy", spec["name"])
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxy", required=True, help="preset name, local model folder, or Hugging Face model id")
    parser.add_argument("--presets", type=Path, default=DEFAULT_PRESETS, help="proxy presets YAML")
    add_input_arguments(parser, "examples", "annotations")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (checkpoint-0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("proxy-init")
    init_proxy(args.proxy, load_presets(args.presets), args.examples, args.annotations, args.out, args.seed, stats)
    stats.finish(args.stats)
