"""Offline stand-ins of real models, for rehearsing a real run and testing the real path.

Each stand-in is written by the libraries the real model was made with, so it has the real
family's tokenizer class and files, special tokens, chat template, processor settings (scaled
down) and checkpoint layout, with tiny random weights: what matters for the code is how the parts
behave (a sentencepiece tokenizer that adds BOS and has no pad token, a CLIP processor that resizes
and centre-crops, LLaVA's projector file, Qwen's dynamic resolution and M-RoPE, SmolVLM's tiles),
not what the weights know. Never downloaded; `config/rehearsal.yaml` and `config/modern.yaml` map
each Hub id to one. The modern families' chat templates are the Hub repositories' own, verbatim
(``xmas/resources/chat_templates/``).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch

from xmas.errors import XmasError
from xmas.io import atomic_path
from xmas.resources import resource

# Sizes of the stand-ins; the projector's input and output follow the vision and language ones.
LANGUAGE_HIDDEN = 64
VISION_HIDDEN = 32
IMAGE_SIZE, PATCH_SIZE = 56, 14  # ViT-L/14 at 336 px, scaled down: 4 x 4 patches
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Text the stand-in tokenizers are trained on: the conversation formats' words and everyday English.
CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: What is the man holding? "
    "A red umbrella. Is it raining? Yes, it is. What color is the circle? Which shape is blue? How many "
    "shapes are in the image? Answer the question using a single word or phrase. Who wrote this book? "
    "What is the title of this book? What is the genre of this book? Explain how a compiler works. "
    "It starts with a simple idea that grows over time. Each part depends on the one before it. "
    "The answer is red green blue yellow circle square triangle one two three four five six seven eight nine ten."
)
# StableLM-2-Zephyr's chat template (its tokenizer_config.json), for the stand-in's tokenizer.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] "
    "+ eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
    "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def sentencepiece_model(vocab_size: int = 600) -> bytes:
    """A Llama-style sentencepiece BPE model: byte fallback, <unk>=0, <s>=1, </s>=2, no pad piece."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.split(". ") * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def vicuna(out: Path, padding_side: str = "right") -> None:
    """Vicuna-7B-v1.5: a Llama model; its tokenizer is a sentencepiece ``tokenizer.model`` only (no
    tokenizer.json), that adds BOS and has no pad token, as the real repository's."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    (out / "tokenizer.model").write_bytes(sentencepiece_model())
    tokenizer = LlamaTokenizer.from_pretrained(
        out, legacy=False, add_bos_token=True, add_eos_token=False, padding_side=padding_side, model_max_length=4096
    )
    tokenizer.save_pretrained(out)
    (out / "tokenizer.json").unlink()  # the real repository ships the sentencepiece model alone
    # transformers 5 writes its own keys; the real file (written by transformers 4) also names how
    # the sentencepiece model is used. Loading it again reads them, so they must say what Vicuna's say.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(add_bos_token=True, add_eos_token=False, legacy=False, pad_token=None, sp_model_kwargs={})
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=LANGUAGE_HIDDEN,
            intermediate_size=2 * LANGUAGE_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
            tie_word_embeddings=False,
        )
    )
    model.to(torch.float16).save_pretrained(out, max_shard_size="100KB")  # sharded, float16: as the real one


def stablelm_zephyr(out: Path) -> None:
    """StableLM-2-Zephyr-1.6B: a StableLM model; a byte-level BPE GPT2 tokenizer whose one special
    token <|endoftext|> is BOS, EOS, UNK and PAD (so padding looks like an answer's end), no BOS
    added, and the Zephyr chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast, StableLmConfig, StableLmForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS.split(". ") * 20,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        chat_template=ZEPHYR_TEMPLATE,
    )
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    model = StableLmForCausalLM(
        StableLmConfig(
            vocab_size=len(tokenizer),
            hidden_size=LANGUAGE_HIDDEN,
            intermediate_size=2 * LANGUAGE_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            partial_rotary_factor=0.25,
            use_qkv_bias=True,
            layer_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model.to(torch.bfloat16).save_pretrained(out)


def clip_336(out: Path) -> None:
    """CLIP ViT-L/14-336: the full CLIP model (text and vision towers) and its image processor's
    settings (bicubic resize of the short side, centre crop, OpenAI's mean and std), scaled down."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        projection_dim=VISION_HIDDEN,
    )
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        resample=3,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    ).save_pretrained(out)


def llava_projector(out: Path) -> None:
    """LLaVA-1.5's stage-1 projector: ``mm_projector.bin``, a torch state dict of the 2-layer MLP under
    ``model.mm_projector.{0,2}``, in bfloat16, as LLaVA's pretraining saves it."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(VISION_HIDDEN, LANGUAGE_HIDDEN),
        torch.nn.GELU(),
        torch.nn.Linear(LANGUAGE_HIDDEN, LANGUAGE_HIDDEN),
    )
    state = {f"model.mm_projector.{name}": tensor.to(torch.bfloat16) for name, tensor in mlp.state_dict().items()}
    torch.save(state, out / "mm_projector.bin")


# ------------------------------------------------------------------------------ today's VLM families


def byte_level_bpe(vocab_size: int = 600) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE trained on CORPUS (what GPT-2-style tokenizers are built from)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        CORPUS.split(". ") * 20,
        trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return bpe.get_vocab(), [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in merges]


def save_vocab_files(tokenizer, out: Path) -> None:
    """The tokenizer as its Hub repo holds it: tokenizer.json and tokenizer_config.json (the chat template
    inside, as the real ones carry it), plus vocab.json and merges.txt."""
    tokenizer.save_pretrained(out, save_jinja_files=False)
    tokenizer.backend_tokenizer.model.save(str(out))  # the tokenizers library writes vocab.json, merges.txt


def save_chat_template_json(template: str, out: Path) -> None:
    """``chat_template.json``, the processor's chat template as these Hub repos hold it (transformers reads
    it, and writes chat_template.jinja instead since version 5)."""
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))


def chat_template_of(family: str) -> str:
    return resource("chat_templates", f"{family}.jinja").read_text()


# Qwen2's added tokens after the byte-level vocabulary, in the real tokenizer's order: the special ones
# (<|endoftext|> 151643 ... <|video_pad|> 151656), then the plain ones; Qwen3 adds four more.
QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_PLAIN = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN3_PLAIN = [*QWEN_PLAIN, "<tool_response>", "</tool_response>", "<think>", "</think>"]


@dataclasses.dataclass(frozen=True)
class Qwen:
    """One Qwen-VL checkpoint: its family, size-dependent choices and processor settings (scaled down)."""

    family: str  # qwen2_5_vl | qwen3_vl
    tie_word_embeddings: bool  # the small ones tie (3B, 2B), the large ones do not (7B, 8B)
    model_max_length: int
    shard: str | None  # max_shard_size when the real checkpoint is sharded


def qwen_tokenizer(plain: list[str], model_max_length: int, template: str | None, special: list[str] = QWEN_SPECIAL):
    """Qwen2Tokenizer as Qwen-VL's Instruct repos have it: byte-level BPE with Qwen's pre-tokenizer, no BOS,
    EOS <|im_end|>, padding with <|endoftext|>, the vision tokens special (Qwen2's own: the first three alone)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = byte_level_bpe()
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        split_special_tokens=False,
        model_max_length=model_max_length,
        chat_template=template,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in special], special_tokens=True)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in plain])
    return tokenizer


def qwen_vl(out: Path, checkpoint: Qwen) -> None:
    """Qwen2.5-VL / Qwen3-VL Instruct: Qwen2Tokenizer with the vision tokens, the repo's chat template (also in
    chat_template.json), the image processor's pixel bounds scaled down (at most 64 tokens an image), M-RoPE
    over a 2-layer language model, and a ViT with Qwen2.5-VL's window attention or Qwen3-VL's DeepStack."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    template = chat_template_of(checkpoint.family)
    qwen3 = checkpoint.family == "qwen3_vl"
    tokenizer = qwen_tokenizer(QWEN3_PLAIN if qwen3 else QWEN_PLAIN, checkpoint.model_max_length, template)
    save_vocab_files(tokenizer, out)
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": LANGUAGE_HIDDEN,
        "intermediate_size": 2 * LANGUAGE_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": checkpoint.model_max_length,
        "tie_word_embeddings": checkpoint.tie_word_embeddings,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "depth": 2,
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_heads": 2,
        "out_hidden_size": LANGUAGE_HIDDEN,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    # mrope_section splits the 8 rotary frequencies of a 16-wide head between time, height and width, as the
    # real [16, 24, 24] (Qwen2.5-VL) and [24, 20, 20] (Qwen3-VL, interleaved) split 64.
    if qwen3:
        text.update(
            head_dim=16,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            rope_theta=5_000_000,
        )
        vision.update(
            patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh"
        )
        config = Qwen3VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=checkpoint.tie_word_embeddings, **ids
        )
        # Qwen3-VL's: 64 to 16384 tokens of 32x32 pixels; here 4 to 64
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 64 * 64, "longest_edge": 256 * 256},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )
        model_class = Qwen3VLForConditionalGeneration
    else:
        text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1_000_000)
        vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        config = Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=checkpoint.tie_word_embeddings, **ids
        )
        # Qwen2.5-VL's: 4 to 16384 tokens of 28x28 pixels; here 4 to 64
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=56 * 56,
            max_pixels=224 * 224,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
        model_class = Qwen2_5_VLForConditionalGeneration
    image_processor.save_pretrained(out)
    save_chat_template_json(template, out)
    if qwen3:
        write_qwen3_video_preprocessor_config(out)
    torch.manual_seed(0)
    model = model_class(config)
    model.generation_config.update(
        bos_token_id=text["bos_token_id"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
    )
    model.to(torch.bfloat16).save_pretrained(out, **({"max_shard_size": checkpoint.shard} if checkpoint.shard else {}))


def write_qwen3_video_preprocessor_config(out: Path) -> None:
    """Qwen3-VL repos hold a video processor's settings beside the image processor's. transformers builds
    that processor with torchvision alone, so here the file is written with the real one's keys (its
    values scaled down like the image processor's): xmas must load a folder that has it without torchvision."""
    settings = {
        "size": {"longest_edge": 256 * 256, "shortest_edge": 64 * 64},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor",
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")


# SmolVLM's tokenizer (SmolLM2's): <|endoftext|>, <|im_start|>, <|im_end|> first, the byte-level vocabulary,
# then <global-img>, the 36 <row_r_col_c> markers, <fake_token_around_image>, <image>, <end_of_utterance>.
SMOLVLM_FIRST = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SMOLVLM_MARKERS = ["<global-img>", *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))]
SMOLVLM_SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]


def smolvlm_tokenizer(template: str):
    """GPT2Tokenizer as SmolVLM's repos have it: BOS <|im_start|> (the template writes it, the tokenizer adds
    none), EOS and pad <|im_end|>, unk <|endoftext|>; generation stops at <end_of_utterance>."""
    from tokenizers import AddedToken
    from transformers import GPT2Tokenizer

    vocab, merges = byte_level_bpe()
    vocab = {
        **{token: position for position, token in enumerate(SMOLVLM_FIRST)},
        **{token: len(SMOLVLM_FIRST) + position for position, token in enumerate(vocab)},
    }
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        add_prefix_space=False,
        model_max_length=8192,
        chat_template=template,
    )
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in SMOLVLM_MARKERS])
    tokenizer.add_special_tokens({"additional_special_tokens": SMOLVLM_SPECIAL})
    return tokenizer


def smolvlm(out: Path, family: str) -> None:
    """SmolVLM-Instruct (model type idefics3) or SmolVLM2 (smolvlm): a SigLIP-style vision tower whose 8x8
    patches of a 64 px tile become 4 tokens by pixel shuffle (the real: 16 px patches of 512 px tiles, 64
    tokens), images resized to a 256 px longest edge (the real: 2048) and split into tiles plus a global
    image, a Llama language model, the repo's chat template and processor_config.json's image_seq_len."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )

    template = chat_template_of("smolvlm")
    tokenizer = smolvlm_tokenizer(template)
    save_vocab_files(tokenizer, out)
    idefics3 = family == "idefics3"
    image_processor = (Idefics3ImageProcessorPil if idefics3 else SmolVLMImageProcessorPil)(
        do_image_splitting=True,
        size={"longest_edge": 4 * 64},
        max_image_size={"longest_edge": 64},
        resample=1,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    image_processor.save_pretrained(out)
    processor_name = "Idefics3Processor" if idefics3 else "SmolVLMProcessor"
    (out / "processor_config.json").write_text(
        json.dumps({"image_seq_len": 4, "processor_class": processor_name}, indent=2) + "\n"
    )
    save_chat_template_json(template, out)
    config_class, model_class = (
        (Idefics3Config, Idefics3ForConditionalGeneration)
        if idefics3
        else (SmolVLMConfig, SmolVLMForConditionalGeneration)
    )
    config = config_class(
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": 2 * VISION_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": LANGUAGE_HIDDEN,
            "intermediate_size": 2 * LANGUAGE_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 8192,
            "rope_theta": 100000,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 2,
            "tie_word_embeddings": False,
        },
        scale_factor=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = model_class(config)
    model.generation_config.update(
        bos_token_id=0, pad_token_id=2, eos_token_id=tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    )
    model.to(torch.bfloat16).save_pretrained(out)


def qwen2_text(tokenizer, tie_word_embeddings: bool, **changes) -> dict:
    """A 2-layer Qwen2 language model's config over ``tokenizer`` (InternVL3's and LLaVA-OneVision's are Qwen2s)."""
    return {
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": LANGUAGE_HIDDEN,
        "intermediate_size": 2 * LANGUAGE_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.eos_token_id,
        "tie_word_embeddings": tie_word_embeddings,
        **changes,
    }


def siglip_vision(image_size: int, patch_size: int) -> dict:
    """A 2-layer SigLIP vision tower's config without its pooling head (LLaVA-OneVision's and Gemma 3's)."""
    return {
        "model_type": "siglip_vision_model",
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_use_head": False,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }


# InternVL's tokens after Qwen's, in the -hf repos' order (<img> 151665, <IMG_CONTEXT> 151667 in InternVL3's),
# named by the converter as the processor reads them.
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNVL_NAMED = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def internvl(out: Path, tie_word_embeddings: bool) -> None:
    """InternVL3 (-hf, transformers' own classes): Qwen2Tokenizer with Qwen's tokens then InternVL's (named in
    tokenizer_config.json), the repo's chat template, GotOcr2's image processor cutting 56 px crops (the real:
    448 px, at most 12, ImageNet mean and std), 14 px patches pixel-shuffled to 4 tokens a crop (the real:
    256), and a Qwen2 language model."""
    from tokenizers import AddedToken
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration

    template = chat_template_of("internvl")
    tokenizer = qwen_tokenizer(QWEN_PLAIN, 8192, template)
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in [*INTERNVL_TOKENS, "<video>"]],
        special_tokens=True,
    )
    save_vocab_files(tokenizer, out)
    tokenizer = type(tokenizer).from_pretrained(out, extra_special_tokens=INTERNVL_NAMED)
    save_vocab_files(tokenizer, out)
    crop = 56
    GotOcr2ImageProcessorPil(
        size={"height": crop, "width": crop},
        crop_to_patches=False,  # as the converter leaves it: InternVLProcessor crops at call time
        min_patches=1,
        max_patches=12,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    ).save_pretrained(out)
    # the -hf repos' processor_config.json, which transformers 4 wrote (5 would nest the image processor in it)
    (out / "processor_config.json").write_text(
        json.dumps({"image_seq_length": 4, "processor_class": "InternVLProcessor"}, indent=2) + "\n"
    )
    (out / "chat_template.jinja").write_text(template)
    text = qwen2_text(tokenizer, tie_word_embeddings)
    vision = {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": 2 * VISION_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": crop,
        "patch_size": PATCH_SIZE,
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "hidden_act": "gelu",
    }
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.update(
        bos_token_id=text["bos_token_id"], eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.to(torch.bfloat16).save_pretrained(out)


def llava_onevision(out: Path, tie_word_embeddings: bool) -> None:
    """LLaVA-OneVision (-hf): Qwen2Tokenizer with <image> and <video> added (as llava-hf's conversion adds
    them), the repo's chat template, the SigLIP image processor's anyres grid of 32 px tiles (the real: 384 px,
    grids up to 6x6, at most 9 tiles' worth), 8 px patches (16 tokens a tile; the real 729), every feature
    kept (``full``), and a Qwen2 language model."""
    from tokenizers import AddedToken
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    template = chat_template_of("llava_onevision")
    tokenizer = qwen_tokenizer([], 32768, None, special=QWEN_SPECIAL[:3])  # Qwen2-Instruct's: 151643-151645
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in ("<image>", "<video>")], special_tokens=True
    )
    save_vocab_files(tokenizer, out)
    tile, patch = 32, 8
    pinpoints = [[tile * rows, tile * cols] for rows in range(1, 7) for cols in range(1, 7)]
    LlavaOnevisionImageProcessorPil(
        size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        resample=3,
        do_pad=True,
    ).save_pretrained(out)
    tokens = (tile // patch) ** 2
    # the repo's processor_config.json and chat_template.json, as transformers 4 wrote them
    settings = {"image_token": "<image>", "num_image_tokens": tokens, "processor_class": "LlavaOnevisionProcessor"}
    settings.update(video_token="<video>", vision_feature_select_strategy="full")
    (out / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    save_chat_template_json(template, out)
    ids = {name: tokenizer.convert_tokens_to_ids(f"<{name}>") for name in ("image", "video")}
    config = LlavaOnevisionConfig(
        vision_config=siglip_vision(tile, patch),
        text_config=qwen2_text(tokenizer, tie_word_embeddings, rms_norm_eps=1e-6, use_sliding_window=False),
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        vision_feature_layer=-1,  # LLaVA-NeXT's mm_vision_select_layer -2 of SigLIP, whose last layer is dropped
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.to(torch.float16).save_pretrained(out)  # llava-hf's are float16


def gemma_tokenizer(template: str):
    """GemmaTokenizer as Gemma 3's repos have it: <pad> 0, <eos> 1, <bos> 2 (added), byte fallback, the turn
    markers, runs of newlines as tokens of their own (Gemma keeps whitespace), and <start_of_image>,
    <end_of_image>, <image_soft_token> named for the processor."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    vocab = {token: position for position, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    vocab.update({f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)})
    for token in ["<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "\n\n\n", "\n\n\n\n"]:
        vocab[token] = len(vocab)
    merges = [("\n", "\n"), ("\n\n", "\n"), ("\n\n", "\n\n")]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    bpe.train_from_iterator(CORPUS.split(". ") * 20, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    for piece in trained["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges += [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in trained["merges"]]
    image_tokens = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    vocab.update({token: len(vocab) + position for position, token in enumerate(image_tokens)})
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        chat_template=template,
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in ["<start_of_turn>", "<end_of_turn>", *image_tokens]
        ],
        special_tokens=True,
    )
    return tokenizer


def gemma3(out: Path) -> None:
    """Gemma 3 (4B and up, -it): GemmaTokenizer, the repo's chat template (it writes <bos> itself), SigLIP at 56 px
    with 7 px patches pooled to 16 soft tokens an image (the real: 896 px, 14 px patches, 256 tokens), and a
    language model of 6 layers, 5 with a sliding window (of 8 tokens; the real: 1024) and 1 global, as the real
    one alternates them, with its query scaling and no soft-capping."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    template = chat_template_of("gemma3")
    tokenizer = gemma_tokenizer(template)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    side, patch, image_tokens = 56, 7, 16
    Gemma3ImageProcessorPil(
        size={"height": side, "width": side}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out)
    (out / "processor_config.json").write_text(
        json.dumps({"image_seq_length": image_tokens, "processor_class": "Gemma3Processor"}, indent=2) + "\n"
    )
    save_chat_template_json(template, out)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<start_of_image>", "<end_of_image>")}
    config = Gemma3Config(
        vision_config=siglip_vision(side, patch),
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": LANGUAGE_HIDDEN,
            "intermediate_size": 2 * LANGUAGE_HIDDEN,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 8,
            "sliding_window_pattern": 6,
            "max_position_embeddings": 8192,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 2,
        },
        mm_tokens_per_image=image_tokens,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
        eos_token_id=[1, tokenizer.convert_tokens_to_ids("<end_of_turn>")],
    )
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the projection at zeros: images would all look alike
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.generation_config.update(bos_token_id=2, pad_token_id=0, eos_token_id=config.eos_token_id)
    model.to(torch.bfloat16).save_pretrained(out)


# stand-in name (the folder) -> (the Hub id it stands for, what writes it)
STANDINS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "vicuna-7b-v1.5": ("lmsys/vicuna-7b-v1.5", vicuna),
    "stablelm-2-zephyr-1_6b": ("stabilityai/stablelm-2-zephyr-1_6b", stablelm_zephyr),
    "clip-vit-large-patch14-336": ("openai/clip-vit-large-patch14-336", clip_336),
    "llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5": (
        "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5",
        llava_projector,
    ),
    "Qwen2.5-VL-3B-Instruct": (
        "Qwen/Qwen2.5-VL-3B-Instruct",
        lambda out: qwen_vl(out, Qwen("qwen2_5_vl", tie_word_embeddings=True, model_max_length=131072, shard="100KB")),
    ),
    "Qwen2.5-VL-7B-Instruct": (
        "Qwen/Qwen2.5-VL-7B-Instruct",
        lambda out: qwen_vl(out, Qwen("qwen2_5_vl", tie_word_embeddings=False, model_max_length=131072, shard="100KB")),
    ),
    "Qwen3-VL-2B-Instruct": (
        "Qwen/Qwen3-VL-2B-Instruct",
        lambda out: qwen_vl(out, Qwen("qwen3_vl", tie_word_embeddings=True, model_max_length=262144, shard=None)),
    ),
    "Qwen3-VL-8B-Instruct": (
        "Qwen/Qwen3-VL-8B-Instruct",
        lambda out: qwen_vl(out, Qwen("qwen3_vl", tie_word_embeddings=False, model_max_length=262144, shard="100KB")),
    ),
    "SmolVLM-256M-Instruct": ("HuggingFaceTB/SmolVLM-256M-Instruct", lambda out: smolvlm(out, "idefics3")),
    "SmolVLM-500M-Instruct": ("HuggingFaceTB/SmolVLM-500M-Instruct", lambda out: smolvlm(out, "idefics3")),
    "SmolVLM2-256M-Video-Instruct": ("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", lambda out: smolvlm(out, "smolvlm")),
    # InternVL3-1B's language model is Qwen2.5-0.5B's (tied embeddings), 8B's Qwen2.5-7B's (untied)
    "InternVL3-1B-hf": ("OpenGVLab/InternVL3-1B-hf", lambda out: internvl(out, tie_word_embeddings=True)),
    "InternVL3-8B-hf": ("OpenGVLab/InternVL3-8B-hf", lambda out: internvl(out, tie_word_embeddings=False)),
    # Qwen2-0.5B-Instruct ties its embeddings, Qwen2-7B-Instruct does not
    "llava-onevision-qwen2-0.5b-ov-hf": (
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        lambda out: llava_onevision(out, tie_word_embeddings=True),
    ),
    "llava-onevision-qwen2-7b-ov-hf": (
        "llava-hf/llava-onevision-qwen2-7b-ov-hf",
        lambda out: llava_onevision(out, tie_word_embeddings=False),
    ),
    "gemma-3-4b-it": ("google/gemma-3-4b-it", gemma3),
    "gemma-3-12b-it": ("google/gemma-3-12b-it", gemma3),
}


def write_standin(name: str, out: Path) -> None:
    if name not in STANDINS:
        raise XmasError(f"no stand-in named {name!r}; there are {', '.join(STANDINS)}")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        STANDINS[name][1](tmp)
