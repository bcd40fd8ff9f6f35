"""Offline stand-ins of the paper's models, for rehearsing a real run and testing the real path.

Each stand-in is written by the libraries the real model was made with, so it has the real
family's tokenizer class and files, processor settings and checkpoint layout, with tiny random
weights: what matters for the code is how the parts behave (a sentencepiece tokenizer that adds
BOS and has no pad token, a CLIP processor that resizes and centre-crops, LLaVA's projector file),
not what the weights know. Never downloaded; `config/rehearsal.yaml` maps each Hub id to one.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import torch

from xmas.errors import XmasError
from xmas.io import atomic_path

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
        sentence_iterator=iter(CORPUS.split(". ") * 20), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return model.getvalue()


def vicuna(out: Path, padding_side: str = "right") -> None:
    """Vicuna-7B-v1.5: a Llama model; its tokenizer is a sentencepiece ``tokenizer.model`` only (no
    tokenizer.json), that adds BOS and has no pad token, as the real repository's."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    (out / "tokenizer.model").write_bytes(sentencepiece_model())
    tokenizer = LlamaTokenizer.from_pretrained(out, legacy=False, add_bos_token=True, add_eos_token=False,
                                               padding_side=padding_side, model_max_length=4096)
    tokenizer.save_pretrained(out)
    (out / "tokenizer.json").unlink()  # the real repository ships the sentencepiece model alone
    # transformers 5 writes its own keys; the real file (written by transformers 4) also names how
    # the sentencepiece model is used. Loading it again reads them, so they must say what Vicuna's say.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(add_bos_token=True, add_eos_token=False, legacy=False, pad_token=None, sp_model_kwargs={})
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LANGUAGE_HIDDEN, intermediate_size=2 * LANGUAGE_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False))
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
    bpe.train_from_iterator(CORPUS.split(". ") * 20, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=4096,
                                  chat_template=ZEPHYR_TEMPLATE)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    model = StableLmForCausalLM(StableLmConfig(
        vocab_size=len(tokenizer), hidden_size=LANGUAGE_HIDDEN, intermediate_size=2 * LANGUAGE_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        partial_rotary_factor=0.25, use_qkv_bias=True, layer_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.to(torch.bfloat16).save_pretrained(out)


def clip_336(out: Path) -> None:
    """CLIP ViT-L/14-336: the full CLIP model (text and vision towers) and its image processor's
    settings (bicubic resize of the short side, centre crop, OpenAI's mean and std), scaled down."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": VISION_HIDDEN, "intermediate_size": 2 * VISION_HIDDEN, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": VISION_HIDDEN, "intermediate_size": 2 * VISION_HIDDEN, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE},
        projection_dim=VISION_HIDDEN)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                          do_center_crop=True, resample=3, image_mean=OPENAI_CLIP_MEAN,
                          image_std=OPENAI_CLIP_STD).save_pretrained(out)


def llava_projector(out: Path) -> None:
    """LLaVA-1.5's stage-1 projector: ``mm_projector.bin``, a torch state dict of the 2-layer MLP under
    ``model.mm_projector.{0,2}``, in bfloat16, as LLaVA's pretraining saves it."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(VISION_HIDDEN, LANGUAGE_HIDDEN), torch.nn.GELU(),
                              torch.nn.Linear(LANGUAGE_HIDDEN, LANGUAGE_HIDDEN))
    state = {f"model.mm_projector.{name}": tensor.to(torch.bfloat16) for name, tensor in mlp.state_dict().items()}
    torch.save(state, out / "mm_projector.bin")


# stand-in name (the folder) -> (the Hub id it stands for, what writes it)
STANDINS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "vicuna-7b-v1.5": ("lmsys/vicuna-7b-v1.5", vicuna),
    "stablelm-2-zephyr-1_6b": ("stabilityai/stablelm-2-zephyr-1_6b", stablelm_zephyr),
    "clip-vit-large-patch14-336": ("openai/clip-vit-large-patch14-336", clip_336),
    "llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5": (
        "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5", llava_projector),
}


def write_standin(name: str, out: Path) -> None:
    if name not in STANDINS:
        raise XmasError(f"no stand-in named {name!r}; there are {', '.join(STANDINS)}")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        STANDINS[name][1](tmp)
