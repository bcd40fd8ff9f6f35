"""Model presets and checkpoint 0 of the proxy and the target.

A preset has a kind: ``from-config`` (random weights from configs, a tokenizer trained on the
data: the demo), ``compose`` (a pretrained LLM + a pretrained vision tower + a 2-layer GELU MLP
projector in transformers' Llava classes, as LLaVA and TinyLLaVA build theirs) or
``pretrained`` (a ready Llava-family model). :func:`materialise` builds any of them, so other
preset files (targets) reuse it. :func:`init_model` sets the model up with the conventions of
its recipe (conversation format, image preprocessing) and writes checkpoint 0
(:mod:`xmas.models.checkpoints`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from xmas.data.records import IMAGE_TAG, InvalidRecord, check_conversation
from xmas.data.sources import open_source
from xmas.errors import XmasError
from xmas.io import atomic_path
from xmas.models.checkpoints import hub_errors, load_checkpoint
from xmas.models.encoding import Encoding
from xmas.models.families import family_of
from xmas.models.image_tokens import ImageTokens, bound_pixels, pixel_bounds
from xmas.progress import StageStats, progress
from xmas.resources import resource

PROXY_PRESETS = resource("proxy_presets.yaml")
TARGET_PRESETS = resource("target_presets.yaml")
CONVERSATIONS = resource("conversations.yaml")
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TAG]
# The conversation "model" keeps the chat template a ready model's processor brings.
OWN_TEMPLATE = "model"
IMAGE_PREPROCESSING = ("pad", "square", "native")


def load_presets(path: Path = PROXY_PRESETS) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def load_conversations(path: Path = CONVERSATIONS) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


def chat_template(name: str, conversations: dict | None = None) -> str:
    """The Jinja chat template of a named conversation format (resources/conversations.yaml)."""
    conversations = load_conversations() if conversations is None else conversations
    if name not in conversations:
        raise XmasError(
            f"conversation {name!r} is not one of {', '.join(sorted(conversations))} "
            f"({CONVERSATIONS.name}), nor {OWN_TEMPLATE!r} (the model's own chat template)"
        )
    return conversations[name]["chat_template"]


def resolve(proxy: str, presets: dict) -> dict:
    """A preset by name, else a local model folder, else a Hugging Face model id."""
    if proxy in presets:
        return {"name": proxy, **presets[proxy]}
    if Path(proxy).is_dir():
        return {"name": proxy, "kind": "pretrained", "path": proxy}
    if Path(proxy).exists() or proxy.startswith((".", "/")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", proxy):
        raise XmasError(
            f"proxy {proxy!r} is neither a preset ({', '.join(sorted(presets))}), "
            "a model folder, nor a Hugging Face model id (owner/name)"
        )
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
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TAG},
        padding_side="right",
    )


def conversation_texts(annotations: Path) -> list[str]:
    """The turns of every record with a well-formed conversation: what a from-config tokenizer learns."""
    texts = []
    for found in progress(open_source(annotations).records(), desc="read the conversations", unit="rec"):
        try:
            if not isinstance(found.record, dict):
                continue
            check_conversation(found.record, max_images=1 << 30)
        except InvalidRecord:
            continue
        texts += [turn["value"].replace(IMAGE_TAG, " ") for turn in found.record["conversations"]]
    return texts


def words_of_template(template: str) -> str:
    """The words a chat template writes (role names, a system line), so the tokenizer knows them."""
    return " ".join(re.findall(r"[A-Za-z]+", template))


def build_from_config(preset: dict, texts: list[str], template: str, seed: int):
    """Random-init LLaVA-architecture model + locally trained tokenizer + processor with chat template."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = train_tokenizer([words_of_template(template), *texts])
    size, patch = preset["image_size"], preset["patch_size"]
    image_tokens = (size // patch) ** 2
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=size, patch_size=patch, **preset["vision"]),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **preset["text"],
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TAG),
        image_seq_length=image_tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if preset.get("position_embedding_std"):
        with torch.no_grad():
            model.model.vision_tower.embeddings.position_embedding.weight.normal_(0, preset["position_embedding_std"])
    return model, processor


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
    from transformers.utils import logging as transformers_logging

    tower = model.model.vision_tower
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # a full CLIP checkpoint's text tower is expectedly left out
    try:
        with hub_errors("vision_model", name):
            pretrained = type(tower).from_pretrained(name, dtype=torch.float32)
    finally:
        transformers_logging.set_verbosity(verbosity)
    tower.load_state_dict(pretrained.state_dict())


def vision_config_of(name: str):
    from transformers import AutoConfig

    with hub_errors("vision_model", name):
        config = AutoConfig.from_pretrained(name)
    return getattr(config, "vision_config", config)  # a full CLIP/SigLIP checkpoint holds both towers


def locate(name: str, paths: dict[str, str]) -> str:
    """Where to load a Hub repo (or ``owner/repo/file``) from: its local copy when ``paths`` has one."""
    if name in paths:
        return paths[name]
    parts = name.split("/")
    repo = "/".join(parts[:2])
    if len(parts) > 2 and repo in paths:
        return str(Path(paths[repo], *parts[2:]))
    return name


def compose(spec: dict, seed: int, paths: dict[str, str]):
    """A LLaVA-architecture model from a pretrained LLM, a pretrained vision tower and a 2-layer GELU MLP."""
    from transformers import (
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    for key in ("language_model", "vision_model"):
        if not spec.get(key):
            raise XmasError(f"preset {spec['name']!r} (kind compose) needs {key!r}")
    language_model, vision_model = locate(spec["language_model"], paths), locate(spec["vision_model"], paths)
    with hub_errors("language_model", language_model):
        tokenizer = AutoTokenizer.from_pretrained(language_model)
        llm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32)
    add_image_token(tokenizer)
    vision_config = vision_config_of(vision_model)
    with hub_errors("vision_model", vision_model):
        image_processor = AutoImageProcessor.from_pretrained(vision_model)
    strategy = spec.get("vision_feature_select_strategy", "default")
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=llm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TAG),
        projector_hidden_act="gelu",
        vision_feature_layer=spec.get("vision_feature_layer", -2),
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)  # the projector's initialisation when no pretrained weights are given
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    if getattr(llm.config, "tie_word_embeddings", False):
        model.tie_weights()
    load_vision_tower(model, vision_model)
    if spec.get("projector_weights"):
        model.model.multi_modal_projector.load_state_dict(projector_state(locate(spec["projector_weights"], paths)))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    extra_tokens = image_extra_tokens(model.model.vision_tower)
    model.config.image_seq_length = image_tokens(vision_config, extra_tokens, strategy)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
    )
    return model, processor


def image_extra_tokens(vision_tower) -> int:
    """Tokens the vision tower adds beside the patches: 1 for a CLS token (CLIP), else 0 (SigLIP)."""
    embeddings = getattr(vision_tower, "embeddings", None) or getattr(vision_tower.vision_model, "embeddings", None)
    return 1 if hasattr(embeddings, "class_embedding") else 0


def image_tokens(vision_config, extra_tokens: int, strategy: str) -> int:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + extra_tokens - (1 if strategy == "default" and extra_tokens else 0)


def pretrained(spec: dict, paths: dict[str, str]):
    """A ready Llava-family model (local folder or Hub id)."""
    return load_checkpoint(locate(spec["path"], paths))


KINDS = ("from-config", "compose", "pretrained")


def materialise(
    spec: dict,
    seed: int,
    template: str | None = None,
    texts: list[str] | None = None,
    paths: dict[str, str] | None = None,
):
    """Model and processor for a resolved spec (see :func:`resolve`).

    from-config presets train their tokenizer on ``texts`` and the words of ``template``; ``paths``
    maps Hub ids to local copies.
    """
    kind = spec.get("kind")
    if kind == "from-config":
        if texts is None or template is None:
            raise XmasError(
                f"preset {spec['name']!r} (kind from-config) trains its tokenizer on the records "
                "and its conversation's words; both are needed"
            )
        return build_from_config(spec, texts, template, seed)
    if kind == "compose":
        return compose(spec, seed, paths or {})
    if kind == "pretrained":
        return pretrained(spec, paths or {})
    raise XmasError(f"preset {spec['name']!r} has unknown kind {kind!r} ({', '.join(KINDS)})")


def image_processor_for(image_processor, preprocessing: str, family):
    """The model's image processor set to LLaVA's ``pad`` (a mean-colour square), TinyLLaVA's
    ``square`` (resized to a square, nothing cut) or ``native`` (the family's own: CLIP's resize and
    centre crop, Qwen's dynamic resolution, SmolVLM's tiles). ``pad`` and ``square`` make one square
    of every image, so they are for families that take images at one size."""
    from transformers import LlavaImageProcessorPil

    if preprocessing not in IMAGE_PREPROCESSING:
        raise XmasError(f"image_preprocessing must be one of {', '.join(IMAGE_PREPROCESSING)}, got {preprocessing!r}")
    if preprocessing == "native":
        return image_processor
    if family.layout != "fixed":
        raise XmasError(
            f"image_preprocessing {preprocessing!r}: a {family.name} model takes each image at its own "
            f"size ({family.layout} layout), so only native applies"
        )
    settings = image_processor.to_dict()
    side = settings.get("crop_size") if settings.get("do_center_crop") else settings.get("size")
    side = (side or {}).get("height") or (side or {}).get("shortest_edge")
    if not side or settings.get("image_mean") is None:
        raise XmasError(
            f"image_preprocessing {preprocessing!r} needs a CLIP-style image processor (size, mean "
            f"colour); {type(image_processor).__name__} is not one: use native"
        )
    kept = {
        key: settings[key]
        for key in (
            "image_mean",
            "image_std",
            "resample",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "do_convert_rgb",
        )
        if key in settings
    }
    # Resizing the padded (or squashed) square to side x side is what resize-and-crop does to a square.
    return LlavaImageProcessorPil(
        **kept, do_pad=preprocessing == "pad", size={"height": side, "width": side}, do_center_crop=False
    )


def conventions_of(spec: dict, settings) -> dict:
    """How a model is set up: its chat template (None: the model's own), image preprocessing and pixel
    bounds (None: the model's own); the config's where it names them, else the preset's."""
    conversation = settings.conversation or spec.get("conversation") or OWN_TEMPLATE
    return {
        "conversation": conversation,
        "template": None if conversation == OWN_TEMPLATE else chat_template(conversation),
        "image_preprocessing": settings.image_preprocessing or spec.get("image_preprocessing") or "native",
        "min_pixels": settings.min_pixels or spec.get("min_pixels"),
        "max_pixels": settings.max_pixels or spec.get("max_pixels"),
    }


def context_length(model) -> int:
    config = getattr(model.config, "text_config", model.config)
    return int(config.max_position_embeddings)


def init_model(settings, presets: dict, annotations: list[Path], out: Path, stats: StageStats) -> Encoding:
    """Checkpoint 0 of a proxy or target (``settings``: the proxy-init or target-init stage's): the model, its
    processor set to the conventions (conversation, image preprocessing, pixel bounds) and the :class:`Encoding`.
    A from-config model learns its tokenizer from the words of every file of ``annotations``."""
    model, seed, paths = settings.model, settings.seed, settings.model_paths
    spec = resolve(model, presets)
    conventions = conventions_of(spec, settings)
    template = conventions["template"]
    texts = None
    if spec.get("kind") == "from-config":
        texts = [text for path in annotations for text in conversation_texts(path)]
    built, processor = materialise(spec, seed, template, texts, paths)
    family = family_of(built)
    if template is not None:
        processor.chat_template = template
    if getattr(processor, "chat_template", None) is None:
        raise XmasError(
            f"model {model!r}: its processor has no chat template; name a conversation "
            f"({', '.join(sorted(load_conversations()))})"
        )
    image_processor = image_processor_for(processor.image_processor, conventions["image_preprocessing"], family)
    processor.image_processor = bound_pixels(
        image_processor, family, conventions["min_pixels"], conventions["max_pixels"]
    )
    encoding = Encoding(settings.image_position, settings.max_length or context_length(built))
    images = ImageTokens(processor)
    if encoding.max_length <= images.fewest():
        raise XmasError(
            f"max_length {encoding.max_length} leaves no room for text after an image of {images.fewest()} tokens"
        )
    if texts is not None:
        stats.add("in", len(texts))
    stats.set("parameters", sum(p.numel() for p in built.parameters()))
    stats.set("model", spec["name"])
    stats.set("family", family.name)
    stats.set(
        "encoding",
        {
            **vars(encoding),
            "conversation": conventions["conversation"],
            "image_preprocessing": conventions["image_preprocessing"],
            **pixel_bounds(processor.image_processor, family),
            "image_tokens": {"fewest": images.fewest(), "most": images.most()},
        },
    )
    with atomic_path(out) as tmp:
        built.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        encoding.save(tmp)
    return encoding


def add_init_arguments(parser, stage: str) -> None:
    """The options of ``xmas proxy-init`` and ``xmas target-init``: their files and the stage's settings."""
    from xmas.settings import add_settings

    parser.add_argument(
        "--annotations",
        required=True,
        type=Path,
        nargs="+",
        help="the source annotation JSON, and for a target the alignment captions (a from-config "
        "model learns its tokenizer from their words)",
    )
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    add_settings(parser, stage)


def run_init(args, stage: str, default_presets: Path) -> None:
    """``xmas proxy-init`` and ``xmas target-init``: checkpoint 0 from the stage's settings."""
    from xmas.settings import settings_of

    settings = settings_of(args, stage)
    stats = StageStats(stage)
    init_model(settings, load_presets(settings.presets or default_presets), args.annotations, args.out, stats)
    stats.finish(args.stats)
