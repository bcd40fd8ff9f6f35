"""The proxy VLM: presets, checkpoint 0, and loading checkpoints for training and extraction.

A preset has a kind: ``from-config`` (random weights from configs, a tokenizer trained on the
data: the demo), ``compose`` (a pretrained LLM + a pretrained vision tower + a 2-layer GELU MLP
projector in transformers' Llava classes, as LLaVA and TinyLLaVA build theirs) or
``pretrained`` (a ready Llava-family model). :func:`materialise` builds any of them, so other
preset files (targets) reuse it.

A checkpoint is a standard Hugging Face folder (``save_pretrained`` of model and processor),
loadable with ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

import torch
import yaml

from xmas.annotations import SPAN_COLUMNS, SourceRecords, read_examples
from xmas.engine import compute_device  # noqa: F401  (re-exported: stages import it from here)
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


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Model and processor from a checkpoint folder (or, for ``proxy-init``, a Hugging Face id)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise XmasError(f"{path} is not a model checkpoint (no config.json)")
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with hub_errors("model", path):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        return model, AutoProcessor.from_pretrained(path)


@contextlib.contextmanager
def hub_errors(what: str, name: str | Path):
    """A missing model (offline, misspelt id, no such folder) as one line naming it."""
    try:
        yield
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise XmasError(f"{what} {str(name)!r} cannot be loaded: {first_line}") from None


# ------------------------------------------------------------------------------------ composed models


def add_image_token(tokenizer) -> None:
    """The image placeholder as one special token, and a pad token when the LLM's tokenizer has none."""
    from tokenizers import AddedToken

    if IMAGE_TAG not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TAG, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token  # as LLaVA does for Vicuna
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "right"


def projector_state(location: str, key: str = "projector_weights") -> dict[str, torch.Tensor]:
    """Pretrained projector weights (LLaVA's mm_projector.bin layout) renamed to Llava's projector.

    ``location`` is a local file or ``owner/repo/path/in/repo`` on the Hugging Face Hub.
    """
    path = Path(location)
    if not path.is_file():
        parts = location.split("/")
        if len(parts) < 3 or location.startswith((".", "/")):
            raise XmasError(f"{key} {location!r}: no such file, and not owner/repo/file on the Hugging Face Hub")
        from huggingface_hub import hf_hub_download

        with hub_errors(key, location):
            path = Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {}
    for name, tensor in raw.items():
        match = re.fullmatch(r"(?:model\.)?mm_projector\.([02])\.(weight|bias)", name)
        if match is None:
            raise XmasError(f"{key} {location}: unexpected tensor {name!r} (expected model.mm_projector.0/2.*)")
        renamed[f"linear_{1 if match[1] == '0' else 2}.{match[2]}"] = tensor.float()
    return renamed


def load_vision_tower(model, name: str) -> None:
    """Pretrained weights into the vision tower (the class Llava built from the vision config)."""
    tower = model.model.vision_tower
    with hub_errors("vision_model", name):
        pretrained = type(tower).from_pretrained(name, dtype=torch.float32)
    tower.load_state_dict(pretrained.state_dict())


def vision_config_of(name: str):
    from transformers import AutoConfig

    with hub_errors("vision_model", name):
        config = AutoConfig.from_pretrained(name)
    return getattr(config, "vision_config", config)  # a full CLIP/SigLIP checkpoint holds both towers


def compose(spec: dict, seed: int):
    """A LLaVA-architecture model from a pretrained LLM, a pretrained vision tower and a 2-layer GELU MLP."""
    from transformers import (AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    for key in ("language_model", "vision_model", "chat_template"):
        if not spec.get(key):
            raise XmasError(f"proxy preset {spec['name']!r} (kind compose) needs {key!r}")
    with hub_errors("language_model", spec["language_model"]):
        tokenizer = AutoTokenizer.from_pretrained(spec["language_model"])
        llm = AutoModelForCausalLM.from_pretrained(spec["language_model"], dtype=torch.float32)
    add_image_token(tokenizer)
    vision_config = vision_config_of(spec["vision_model"])
    with hub_errors("vision_model", spec["vision_model"]):
        image_processor = AutoImageProcessor.from_pretrained(spec["vision_model"])
    strategy = spec.get("vision_feature_select_strategy", "default")
    config = LlavaConfig(
        vision_config=vision_config, text_config=llm.config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TAG),
        projector_hidden_act="gelu", vision_feature_layer=spec.get("vision_feature_layer", -2),
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)  # the projector's initialisation when no pretrained weights are given
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    if getattr(llm.config, "tie_word_embeddings", False):
        model.tie_weights()
    load_vision_tower(model, spec["vision_model"])
    if spec.get("projector_weights"):
        model.model.multi_modal_projector.load_state_dict(projector_state(spec["projector_weights"]))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    extra_tokens = image_extra_tokens(model.model.vision_tower)
    model.config.image_seq_length = image_tokens(vision_config, extra_tokens, strategy)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=extra_tokens, chat_template=spec["chat_template"])
    return model, processor


def image_extra_tokens(vision_tower) -> int:
    """Tokens the vision tower adds beside the patches: 1 for a CLS token (CLIP), else 0 (SigLIP)."""
    embeddings = getattr(vision_tower, "embeddings", None) or getattr(vision_tower.vision_model, "embeddings", None)
    return 1 if hasattr(embeddings, "class_embedding") else 0


def image_tokens(vision_config, extra_tokens: int, strategy: str) -> int:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + extra_tokens - (1 if strategy == "default" and extra_tokens else 0)


def pretrained(spec: dict):
    """A ready Llava-family model (local folder or Hub id); the preset may give it a chat template."""
    model, processor = load_checkpoint(spec["path"])
    if spec.get("chat_template"):
        processor.chat_template = spec["chat_template"]
    return model, processor


KINDS = ("from-config", "compose", "pretrained")


def materialise(spec: dict, seed: int, records: list[dict] | None = None):
    """Model and processor for a resolved spec (see :func:`resolve`); ``records`` feed from-config tokenizers."""
    kind = spec.get("kind")
    if kind == "from-config":
        if records is None:
            raise XmasError(f"preset {spec['name']!r} (kind from-config) trains its tokenizer on the records; none given")
        return build_from_config(spec, records, seed)
    if kind == "compose":
        return compose(spec, seed)
    if kind == "pretrained":
        return pretrained(spec)
    raise XmasError(f"preset {spec['name']!r} has unknown kind {kind!r} ({', '.join(KINDS)})")


def training_records(examples: Path, annotations: Path) -> SourceRecords:
    """The usable records (status ok) in source order, read from the file as they are used."""
    table = read_examples(examples, ["uid", "index", "status", *SPAN_COLUMNS])
    return SourceRecords(annotations, table[table.status == "ok"])


def init_proxy(proxy: str, presets: dict, examples: Path, annotations: Path, out: Path, seed: int,
               stats: StageStats) -> None:
    spec = resolve(proxy, presets)
    records = training_records(examples, annotations) if spec.get("kind") == "from-config" else None
    model, processor = materialise(spec, seed, records)
    if records is not None:
        stats.add("in", len(records))
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
