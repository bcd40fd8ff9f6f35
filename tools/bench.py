"""Benchmarks: ``python tools/bench.py <name> ...``; each prints what it measured.

``prepare``: generate a LLaVA-format file the size of LLaVA-665k (text-only records, so no image
is checked) and time ``xmas prepare`` on it in a child process: wall seconds and peak memory
(the child's maximum resident set size). Its token counting uses the paper's proxy as
``proxy-init`` builds it (TinyLLaVA, composed from offline stand-ins of StableLM-2-Zephyr and
CLIP: the tokenizer class and chat template count tokens as the real ones do), or ``--model``.
Target: at most 60 s and 4 GB.

``trajectory``: the cost of trajectory extraction against its floor and the naive way. A
LLaVA-architecture model is built from configs (random weights), and the same length-grouped
batches of generated examples (one image each, text lengths drawn from a range) run through
(a) a plain forward with SDPA (flash-attn 2 on CUDA in half precision when installed), (b) our
extraction (:class:`xmas.models.attention.CrossModalAttention` + top-k SVD) and (c) the eager
``output_attentions=True`` reference (float32, every layer's full attention matrix, then the
same sum, block and SVD). It checks that (b) and (c) agree and prints examples/s and peak memory
of each, ending with ``extraction_vs_eager=<ratio> overhead_vs_forward=<ratio> agree=<max rel
diff>`` (time of (c) / time of (b), time of (b) / time of (a), the largest relative difference
of an example's block). Shapes: ``tiny`` (a few seconds) and ``paper`` (a StableLM-2-1.6B-sized
LM: 24 layers, hidden 2048, 32 heads, vocabulary 100352 + a CLIP ViT-L/14-336-sized vision
tower: 576 image tokens; text lengths 64-512). On a CPU, ``paper`` is reduced to ``paper-cpu``
so it runs in a couple of minutes: the paper's widths, head counts, image tokens and text
lengths, but 2 of the 24 LM layers, 2 of the 24 vision layers and 4 examples in batches of 2;
``--text-layers``, ``--vision-layers``, ``--examples`` and ``--batch-size`` override it. ``--dtype``
sets the weights of (a) and (b) (default bfloat16 on CUDA, float32 on a CPU; (c) stays float32),
``--build-on-device`` builds the random model on the GPU rather than on the CPU (faster at the
paper shape), and ``--max-disagreement X`` adds a line ``agreement: <agree> <= X: met|NOT met``
and exits 1 when not met (tests/gpu/check.sh uses these). Peak
memory is ``torch.cuda.max_memory_allocated`` growth on CUDA, and on a CPU the growth of the
process's peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` before each mode)
over its resident set when the mode starts.

``dag``: ``snakemake -n`` of a config (default ``config/llava665k.yaml``, the whole DAG), as a user
waits for it on a login node: median and best wall seconds over ``--repeats`` runs in fresh
folders, and whether torch was imported (``python -X importtime``). Target: at most 5 s, no torch.

``definitions``: the demo's selection run twice, with ``trajectory.definition`` exact and upstream:
the number of clusters of each, their adjusted Rand index and the share of image examples in the
same cluster after matching clusters one to one (greedily), and per budget how many records the
two subsets share.

``scale``: the selection at LLaVA-665k's size and beyond, on parquet as LLaVA-OneVision-Data publishes it. For
each ``--records`` size (default 665,000 and 3,000,000) it writes a parquet set (shards of 250,000 rows in row
groups of 1,000, each record with a small PNG embedded as datasets' Image struct, 1-5 exchanges of text; the
schema is the one ``datasets`` gives those features, tools/published.py), then runs in child processes
``xmas prepare`` (embedded images decoded, tokens counted with the paper's proxy composed from stand-ins) and,
on random trajectories of every usable record, ``merge``, ``cluster`` and ``sample`` (xmas, budget 0.5, writing
the parquet subset) with ``config/llava665k.yaml``'s settings. It prints each stage's wall seconds and peak
memory (the child's maximum resident set), whether that fits the memory the stage's rule asks for in that
config (and, for prepare, 4 GB), and how each grew from the smallest size to the largest against the records.

To add a benchmark, write ``add_<name>(subparsers)`` that registers its parser with
``set_defaults(run=...)`` and list it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a image shows what is of in on and to with man woman dog cat car street table food people "
    "color red blue green white black two three left right top bottom behind near large small sitting "
    "standing holding wearing playing looking building sign tree sky water field room window door light "
    "question answer describe explain why how many where which code function python list value return "
    "error file data model train write story poem summary example number because however therefore"
).split()
NON_ASCII = ["café", "naïve", "Zürich", "東京", "данные", "😀", "señor", "über"]


def sentence_pool(rng: random.Random, size: int = 4000) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 24))).capitalize() + "." for _ in range(size)]


def generated_record(index: int, rng: random.Random, pool: list[str], non_ascii: float) -> dict:
    """A ShareGPT-like text-only record of LLaVA-665k: 1-5 exchanges, about 1.5 KB of JSON on average."""
    turns = []
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        question = " ".join(rng.choices(pool, k=rng.randint(1, 3)))
        answer = " ".join(rng.choices(pool, k=rng.randint(1, 8)))
        if rng.random() < non_ascii:
            answer += " " + rng.choice(NON_ASCII)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"{rng.getrandbits(40):010x}_{index % 7}", "model": "", "conversations": turns}


def generate(path: Path, records: int, seed: int, non_ascii: float, indent: int | None) -> None:
    """A JSON list written record by record (never all in memory), formatted as ``json.dump`` would."""
    rng = random.Random(seed)
    pool = sentence_pool(rng)
    encoder = json.JSONEncoder(ensure_ascii=False, indent=indent or None)
    pad = "\n" + " " * indent if indent else "\n"
    with open(path, "w", encoding="utf-8") as out:
        out.write("[")
        for index in range(records):
            text = encoder.encode(generated_record(index, rng, pool, non_ascii))
            out.write(("," if index else "") + pad + (text.replace("\n", pad) if indent else text))
        out.write("\n]\n")


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident memory (bytes) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    subprocess.run(command, check=True)
    seconds = time.monotonic() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib < before:  # ru_maxrss is the maximum over all children waited for
        peak_kib = before
    return seconds, peak_kib * 1024


def paper_proxy(work: Path, annotations: Path) -> Path:
    """Checkpoint 0 of the paper's proxy preset, composed from the stand-ins of its parts."""
    from xmas.models.presets import init_model, load_presets
    from xmas.models.standins import STANDINS, write_standin
    from xmas.progress import StageStats
    from xmas.settings import stage_defaults

    paths = {}
    for name in ("stablelm-2-zephyr-1_6b", "clip-vit-large-patch14-336"):
        write_standin(name, work / name)
        paths[STANDINS[name][0]] = str(work / name)
    settings = stage_defaults(
        "proxy-init", model="tinyllava-stablelm2-clip336", conversation="phi", max_length=2048, model_paths=paths
    )
    init_model(settings, load_presets(), [annotations], work / "checkpoint-0", StageStats("proxy-init"))
    return work / "checkpoint-0"


def run_prepare(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="xmas-bench-"))
    annotations = args.file or work / "annotations.json"
    if args.file is None or not annotations.exists():
        start = time.monotonic()
        generate(annotations, args.records, args.seed, args.non_ascii, args.indent)
        print(
            f"generated {args.records} records, {annotations.stat().st_size / 1e9:.2f} GB, in "
            f"{time.monotonic() - start:.0f}s: {annotations}",
            flush=True,
        )
    out = work / "examples.parquet"
    model = args.model or paper_proxy(work, annotations)
    command = [
        sys.executable,
        "-m",
        "xmas",
        "prepare",
        "--annotations",
        str(annotations),
        "--image-root",
        str(work),
        "--model",
        str(model),
        "--out",
        str(out),
        "--no-check-images",
        "--stats",
        str(work / "prepare.json"),
    ]
    seconds, peak = measure(command)
    counts = json.loads((work / "prepare.json").read_text())["counts"]
    met = seconds <= args.max_seconds and peak <= args.max_gb * 1e9
    print(
        f"prepare: {counts['in']} records in {seconds:.1f} s wall, peak memory {peak / 1e9:.2f} GB "
        f"({counts['in'] / seconds:,.0f} records/s)"
    )
    print(f"target: <= {args.max_seconds:g} s and <= {args.max_gb:g} GB: {'met' if met else 'NOT met'}")
    if args.keep:
        print(f"kept in {work}")
    else:
        shutil.rmtree(work)  # a --file of your own lies outside it and stays
    return 0 if met else 1


def add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="time `xmas prepare` on a generated 665k-record file",
        description=run_prepare.__doc__ or __doc__,
    )
    parser.add_argument("--records", type=int, default=665_000, help="records to generate (default 665,000)")
    parser.add_argument("--file", type=Path, help="annotation file to use; generated there if it does not exist")
    parser.add_argument(
        "--model",
        type=Path,
        help="the proxy's checkpoint 0 that counts tokens (default: the paper's proxy composed from stand-ins)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (generated file, examples.parquet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--non-ascii", type=float, default=0.01, help="share of records with non-ASCII text")
    parser.add_argument("--indent", type=int, default=4, help="JSON indentation of the file (0: one record a line)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="target wall time")
    parser.add_argument("--max-gb", type=float, default=4.0, help="target peak memory")
    parser.set_defaults(run=run_prepare)


SHAPES = {
    "tiny": {
        "text": {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "vocab_size": 1000,
        },
        "vision": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 112,
            "patch_size": 14,
        },
        "text_lengths": (16, 64),
        "examples": 8,
        "batch_size": 4,
    },
    "paper": {
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 100352,
        },
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
        },
        "text_lengths": (64, 512),
        "examples": 64,
        "batch_size": 8,
    },
}
PAPER_CPU = {"text_layers": 2, "vision_layers": 2, "examples": 4, "batch_size": 2}
PROMPT_TOKENS = 4  # text before the image (a BOS and a role marker in a real template)


def bench_shape(args: argparse.Namespace, on_cuda: bool) -> tuple[str, dict]:
    """The shape's settings with the command line's overrides; ``paper`` on a CPU is reduced."""
    shape = {key: dict(value) if isinstance(value, dict) else value for key, value in SHAPES[args.shape].items()}
    name = args.shape
    reduction = PAPER_CPU if args.shape == "paper" and not on_cuda else {}
    if reduction:
        name = "paper-cpu"
    text_layers = args.text_layers or reduction.get("text_layers")
    vision_layers = args.vision_layers or reduction.get("vision_layers")
    if text_layers:
        shape["text"]["num_hidden_layers"] = text_layers
    if vision_layers:
        shape["vision"]["num_hidden_layers"] = vision_layers
    shape["examples"] = args.examples or reduction.get("examples", shape["examples"])
    shape["batch_size"] = args.batch_size or reduction.get("batch_size", shape["batch_size"])
    return name, shape


def build_bench_model(shape: dict, seed: int):
    """A Llava model (StableLM-2 language model, CLIP vision tower) from configs, random weights."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, StableLmConfig

    vocab = shape["text"]["vocab_size"]
    vision = CLIPVisionConfig(**shape["vision"])
    config = LlavaConfig(
        vision_config=vision,
        image_token_index=vocab - 1,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        text_config=StableLmConfig(max_position_embeddings=4096, pad_token_id=0, **shape["text"]),
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def bench_batches(model, shape: dict, seed: int) -> list[dict]:
    """Generated examples (prompt, image tokens, text), sorted by length and cut into right-padded batches."""
    import torch

    config = model.config
    generator = torch.Generator().manual_seed(seed)
    low, high = shape["text_lengths"]
    lengths = sorted(torch.randint(low, high + 1, (shape["examples"],), generator=generator).tolist())
    size = config.vision_config.image_size
    batches = []
    for start in range(0, len(lengths), shape["batch_size"]):
        part = lengths[start : start + shape["batch_size"]]
        width = PROMPT_TOKENS + config.image_seq_length + max(part)
        input_ids = torch.zeros(len(part), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, text in enumerate(part):
            real = PROMPT_TOKENS + config.image_seq_length + text
            input_ids[row, :real] = torch.randint(1, config.image_token_id, (real,), generator=generator)
            input_ids[row, PROMPT_TOKENS : PROMPT_TOKENS + config.image_seq_length] = config.image_token_id
            attention_mask[row, :real] = 1
        pixel_values = torch.randn(len(part), 3, size, size, generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values})
    return batches


class PeakMemory:
    """Peak memory growth of one mode: CUDA allocator peak, or peak RSS (VmHWM) after a reset on a CPU."""

    def __init__(self, device):
        self.device = device
        self.method = (
            "torch.cuda.max_memory_allocated growth"
            if device.type == "cuda"
            else "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
        )

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base


# Today's families (--family): the sizes their models are built at, in each config's own keys, over the
# family's stand-in (xmas.models.standins: its processor, tokenizer and config). ``tiny`` is the Llava tiny
# shape's widths; ``paper`` is the smallest real checkpoint of the family (config.json of its Hub repo,
# reduced on a CPU like paper-cpu), with its preset's pixel bounds. mrope_section splits half a head.
QWEN_TINY = {
    "text": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "vision": {"hidden_size": 128, "intermediate_size": 256, "depth": 2, "num_heads": 4},
    "mrope_section": [4, 6, 6],
}
SMOLVLM_TINY = {
    "text": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "vision": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4},
}
SMOLVLM_256M = {
    "text": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49280,
    },
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "image_processor": {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}},
    "processor": {"image_seq_len": 64},
}
# Qwen2-0.5B's and Qwen2.5-0.5B's widths (LLaVA-OneVision-0.5B's and InternVL3-1B's language models)
QWEN_HALF_B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
}
FAMILY_SHAPES = {
    "qwen2_5_vl": (
        "Qwen2.5-VL-3B-Instruct",
        {
            "tiny": QWEN_TINY,
            "paper": {
                "text": {
                    "hidden_size": 2048,
                    "intermediate_size": 11008,
                    "num_hidden_layers": 36,
                    "num_attention_heads": 16,
                    "num_key_value_heads": 2,
                    "vocab_size": 151936,
                },
                "vision": {
                    "hidden_size": 1280,
                    "intermediate_size": 3420,
                    "depth": 32,
                    "num_heads": 16,
                    "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31],
                },
                "mrope_section": [16, 24, 24],
                "pixels": (12544, 451584),
            },
        },
    ),
    "qwen3_vl": (
        "Qwen3-VL-2B-Instruct",
        {
            "tiny": {**QWEN_TINY, "text": {**QWEN_TINY["text"], "head_dim": 32}},
            "paper": {
                "text": {
                    "hidden_size": 2048,
                    "intermediate_size": 6144,
                    "num_hidden_layers": 28,
                    "num_attention_heads": 16,
                    "num_key_value_heads": 8,
                    "head_dim": 128,
                    "vocab_size": 151936,
                },
                "vision": {
                    "hidden_size": 1024,
                    "intermediate_size": 4096,
                    "depth": 24,
                    "num_heads": 16,
                    "num_position_embeddings": 2304,
                    "deepstack_visual_indexes": [5, 11, 17],
                },
                "mrope_section": [24, 20, 20],
                "pixels": (12544, 451584),
            },
        },
    ),
    "idefics3": ("SmolVLM-256M-Instruct", {"tiny": SMOLVLM_TINY, "paper": SMOLVLM_256M}),
    "smolvlm": ("SmolVLM2-256M-Video-Instruct", {"tiny": SMOLVLM_TINY, "paper": SMOLVLM_256M}),
    "internvl": (
        "InternVL3-1B-hf",
        {
            "tiny": {
                "text": QWEN_TINY["text"],
                "vision": SMOLVLM_TINY["vision"],  # a ViT of the tiny widths
            },
            "paper": {  # InternVL3-1B: InternViT-300M (448 px crops, 256 tokens each) and Qwen2.5-0.5B
                "text": {**QWEN_HALF_B, "vocab_size": 151674},
                "vision": {
                    "hidden_size": 1024,
                    "intermediate_size": 4096,
                    "num_hidden_layers": 24,
                    "num_attention_heads": 16,
                    "image_size": [448, 448],
                    "patch_size": [14, 14],
                },
                "image_processor": {"size": {"height": 448, "width": 448}},
                "processor": {"image_seq_length": 256},
            },
        },
    ),
    "llava_onevision": (
        "llava-onevision-qwen2-0.5b-ov-hf",
        {
            "tiny": {
                "text": QWEN_TINY["text"],
                "vision": SMOLVLM_TINY["vision"],  # a ViT of the tiny widths
            },
            "paper": {  # OneVision-0.5B: SigLIP-so400m less its last layer (384 px tiles, 729 tokens), Qwen2-0.5B
                "text": {**QWEN_HALF_B, "vocab_size": 151936},
                "vision": {
                    "hidden_size": 1152,
                    "intermediate_size": 4304,
                    "num_hidden_layers": 26,
                    "num_attention_heads": 16,
                    "image_size": 384,
                    "patch_size": 14,
                },
                "config": {"image_grid_pinpoints": [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]},
                "image_processor": {
                    "size": {"height": 384, "width": 384},
                    "image_grid_pinpoints": [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)],
                },
                "processor": {"num_image_tokens": 729},
            },
        },
    ),
    "gemma3": (
        "gemma-3-4b-it",
        {
            "tiny": {
                "text": {**QWEN_TINY["text"], "head_dim": 32, "num_hidden_layers": 6},
                "vision": SMOLVLM_TINY["vision"],  # a ViT of the tiny widths
            },
            "paper": {  # Gemma-3-4B-it: SigLIP at 896 px pooled to 256 tokens; 34 layers, 5 in 6 of 1024-token windows
                "text": {
                    "hidden_size": 2560,
                    "intermediate_size": 10240,
                    "num_hidden_layers": 34,
                    "num_attention_heads": 8,
                    "num_key_value_heads": 4,
                    "head_dim": 256,
                    "query_pre_attn_scalar": 256,
                    "sliding_window": 1024,
                    "vocab_size": 262208,
                },
                "vision": {
                    "hidden_size": 1152,
                    "intermediate_size": 4304,
                    "num_hidden_layers": 27,
                    "num_attention_heads": 16,
                    "image_size": 896,
                    "patch_size": 14,
                },
                "config": {"mm_tokens_per_image": 256},
                "image_processor": {"size": {"height": 896, "width": 896}},
                "processor": {"image_seq_length": 256},
            },
        },
    ),
}
# Images of the family benchmarks: COCO-like photos (paper) or the stand-ins' sizes (tiny), wide and tall.
FAMILY_IMAGE_SIZES = {
    "tiny": [(224, 168), (168, 224), (200, 200), (256, 128)],
    "paper": [(640, 480), (480, 640), (500, 375), (640, 427)],
}


def layers_of(config: dict) -> str:
    return "depth" if "depth" in config else "num_hidden_layers"


def family_bench(args: argparse.Namespace, work: Path):
    """The family's model at the shape (random weights) and the encoder of its stand-in's processor."""
    import torch
    from transformers import AutoConfig

    from xmas.models.checkpoints import load_processor
    from xmas.models.encoding import ConversationEncoder, Encoding
    from xmas.models.families import FAMILIES
    from xmas.models.image_tokens import bound_pixels
    from xmas.models.standins import write_standin

    family = FAMILIES[args.family]
    standin, shapes = FAMILY_SHAPES[args.family]
    shape = shapes["paper" if args.shape == "paper" else "tiny"]
    write_standin(standin, work / standin)
    config = AutoConfig.from_pretrained(work / standin)
    text, vision = dict(shape["text"]), dict(shape["vision"])
    reduced = args.shape == "paper" and not torch.cuda.is_available()
    for part, override in ((text, args.text_layers), (vision, args.vision_layers)):
        if override or reduced:
            part[layers_of(part)] = override or 2
    if "vocab_size" not in text:
        text["vocab_size"] = config.text_config.vocab_size
    if family.layout == "dynamic":
        vision["out_hidden_size"] = text["hidden_size"]
        rope = {**config.text_config.rope_parameters, "mrope_section": shape["mrope_section"]}
        config.text_config.rope_parameters = rope
    config.text_config.update(text)
    config.vision_config.update(vision)
    config.update(shape.get("config", {}))
    pattern = getattr(config.text_config, "layer_types", None)
    if pattern:  # the stand-in's pattern over the layers (Gemma's 5 sliding, 1 global), a global one kept
        layers = config.text_config.num_hidden_layers
        types = [pattern[layer % len(pattern)] for layer in range(layers)]
        if "full_attention" in pattern and "full_attention" not in types:
            types[-1] = "full_attention"
        config.text_config.layer_types = types
    processor = load_processor(work / standin)
    if "pixels" in shape:
        processor.image_processor = bound_pixels(processor.image_processor, family, *shape["pixels"])
    if "image_processor" in shape:
        settings = {k: v for k, v in processor.image_processor.to_dict().items() if k != "image_processor_type"}
        processor.image_processor = type(processor.image_processor)(**{**settings, **shape["image_processor"]})
    if "processor" in shape:  # the tokens of a tile, crop or image: the processor made again with them
        parts = {name: getattr(processor, name) for name in type(processor).get_attributes()}
        processor = type(processor)(**parts, chat_template=processor.chat_template, **shape["processor"])
    torch.manual_seed(args.seed)
    model = family.transformers_class("model_class")(config).eval()
    return model, ConversationEncoder(processor, work / "images", Encoding("front", 1 << 20))


def family_batches(
    encoder, shape_name: str, examples: int, batch_size: int, lengths: tuple[int, int], seed: int
) -> list[dict]:
    """Generated records (a photo of one of FAMILY_IMAGE_SIZES, a question, an answer of random words of a
    length in ``lengths``), encoded by the family's processor, sorted by length and batched."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    encoder.image_root.mkdir(parents=True, exist_ok=True)
    records = []
    for number in range(examples):
        width, height = FAMILY_IMAGE_SIZES[shape_name][number % len(FAMILY_IMAGE_SIZES[shape_name])]
        name = f"{width}x{height}.png"
        if not (encoder.image_root / name).exists():
            pixels = np.random.default_rng(number).integers(0, 255, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(encoder.image_root / name)
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths)))
        records.append(
            {
                "id": str(number),
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is in the image?"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    items = sorted((encoder.encode(record, with_labels=False) for record in records), key=lambda i: len(i["input_ids"]))
    return [encoder.collate(items[start : start + batch_size]) for start in range(0, len(items), batch_size)]


def eager_blocks(model, batch: dict):
    """The naive reference: every layer's full attention matrix, summed over heads and layers, then the block."""
    import torch

    from xmas.models.attention import Positions

    attentions = model(**batch, output_attentions=True, logits_to_keep=1).attentions
    total = sum(layer.float().sum(dim=1) for layer in attentions)
    positions = Positions.find(batch["input_ids"], batch["attention_mask"], model.config.image_token_id)
    rows = positions.rows[:, :, None].expand(-1, -1, total.shape[-1])
    block = total.gather(1, rows).gather(2, positions.cols[:, None, :].expand(-1, rows.shape[1], -1))
    valid = positions.row_valid[:, :, None] & positions.col_valid[:, None, :]
    return torch.where(valid, block, 0.0)


def measure_modes(modes: dict, batches_of: dict, memory: PeakMemory, repeats: int) -> dict:
    """Seconds, peak memory and outputs of each mode; modes take turns on every batch.

    Taking turns (after one warm-up batch each) exposes all modes alike to other load on the
    machine; with ``repeats`` > 1 each batch's time is the fastest of its runs.
    """
    import torch

    results = {name: {"seconds": 0.0, "peak": 0, "outputs": []} for name in modes}
    with torch.no_grad():
        for name, run in modes.items():
            run(batches_of[name][0])
        for position in range(len(next(iter(batches_of.values())))):
            for name, run in modes.items():
                batch, times = batches_of[name][position], []
                for _ in range(repeats):
                    memory.start()
                    start = time.monotonic()
                    output = run(batch)
                    if memory.device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.monotonic() - start)
                    results[name]["peak"] = max(results[name]["peak"], memory.peak())
                results[name]["seconds"] += min(times)
                results[name]["outputs"].append(output)
    return results


def report_mode(name: str, result: dict, examples: int) -> None:
    seconds = result["seconds"]
    print(
        f"{name}: {examples} examples in {seconds:.2f} s, {examples / seconds:.3f} examples/s, "
        f"peak memory +{result['peak'] / 2**30:.2f} GiB",
        flush=True,
    )


def max_relative_difference(ours: list, reference: list) -> float:
    import torch

    worst = 0.0
    for got, expected in zip(ours, reference):
        for row in range(len(got)):
            scale = torch.linalg.norm(expected[row]).clamp(min=1e-30)
            worst = max(worst, float(torch.linalg.norm(got[row].float() - expected[row]) / scale))
    return worst


def run_trajectory(args: argparse.Namespace) -> int:
    import contextlib
    import copy

    import torch

    from xmas.models.attention import IMPLEMENTATION, CrossModalAttention, capture_output, top_singular_values
    from xmas.training.engine import attention_implementation, compute_device, resolve_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    device = compute_device()
    name, shape = bench_shape(args, device.type == "cuda")
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    on_device = torch.device(device) if args.build_on_device else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as work, on_device:
        if args.family == "llava":
            reference = build_bench_model(shape, args.seed)
            batches = bench_batches(reference, shape, args.seed)
        else:
            reference, encoder = family_bench(args, Path(work))
            batches = family_batches(
                encoder,
                "paper" if args.shape == "paper" else "tiny",
                shape["examples"],
                shape["batch_size"],
                shape["text_lengths"],
                args.seed,
            )
    reference = reference.to(device)
    model = reference if dtype == torch.float32 else copy.deepcopy(reference).to(dtype)
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in batches]
    half_batches = [{**batch, "pixel_values": batch["pixel_values"].to(dtype)} for batch in batches]
    text, vision = reference.config.text_config, reference.config.vision_config
    image_tokens = [
        int(count) for batch in batches for count in (batch["input_ids"] == reference.config.image_token_id).sum(dim=1)
    ]
    print(
        f"shape {name} ({args.family}): LM {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
        f"{text.num_attention_heads} heads; vision {getattr(vision, 'depth', None) or vision.num_hidden_layers} "
        f"layers, hidden {vision.hidden_size}, {min(image_tokens)}-{max(image_tokens)} image tokens; text "
        f"lengths {shape['text_lengths'][0]}-{shape['text_lengths'][1]}; {shape['examples']} examples in batches "
        f"of {shape['batch_size']}; device {device}, weights {str(dtype).removeprefix('torch.')} "
        f"(eager reference float32), {torch.get_num_threads()} threads",
        flush=True,
    )
    memory = PeakMemory(device)
    print(f"peak memory: {memory.method}; modes take turns on each batch after one warm-up batch each", flush=True)
    forward_attention = attention_implementation("auto", device) if dtype != torch.float32 else "sdpa"
    capture = CrossModalAttention(model, output=capture_output("auto", device, dtype))

    # Each mode sets its attention first: in float32, (a), (b) and (c) share one model.
    def plain(batch):
        model.set_attn_implementation({"text_config": forward_attention, "vision_config": "sdpa"})
        return model(**batch, logits_to_keep=1)

    def extract(batch):
        model.set_attn_implementation({"text_config": IMPLEMENTATION, "vision_config": "sdpa"})
        blocks, _ = capture.blocks(batch)
        return blocks, top_singular_values(blocks, 5)

    def eager(batch):
        reference.set_attn_implementation("eager")  # the naive way: eager everywhere, vision tower included
        blocks = eager_blocks(reference, batch)
        return blocks, top_singular_values(blocks, 5)

    names = {
        "plain": f"(a) plain forward, {forward_attention}",
        "extract": "(b) extraction",
        "eager": "(c) eager output_attentions=True",
    }
    results = measure_modes(
        {"plain": plain, "extract": extract, "eager": eager},
        {"plain": half_batches, "extract": half_batches, "eager": batches},
        memory,
        args.repeats,
    )
    for key, label in names.items():
        report_mode(label, results[key], shape["examples"])
    agree = max_relative_difference(
        [b for b, _ in results["extract"]["outputs"]], [b for b, _ in results["eager"]["outputs"]]
    )
    seconds = {key: result["seconds"] for key, result in results.items()}
    print(
        f"extraction_vs_eager={seconds['eager'] / seconds['extract']:.2f} "
        f"overhead_vs_forward={seconds['extract'] / seconds['plain']:.2f} agree={agree:.2e}"
    )
    if args.max_disagreement is None:
        return 0
    met = agree <= args.max_disagreement
    print(f"agreement: {agree:.2e} <= {args.max_disagreement:.2e}: {'met' if met else 'NOT met'}")
    return 0 if met else 1


def add_trajectory(subparsers) -> None:
    parser = subparsers.add_parser(
        "trajectory",
        help="trajectory extraction vs a plain forward and the eager reference",
        description=run_trajectory.__doc__ or __doc__,
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default="tiny",
        help="tiny, or paper (on a CPU reduced to paper-cpu unless overridden)",
    )
    parser.add_argument(
        "--family",
        choices=("llava", *FAMILY_SHAPES),
        default="llava",
        help="llava: the paper's proxy (StableLM-2 + CLIP); any other family is built over its "
        "stand-in, paper being its smallest real checkpoint's sizes (Qwen2.5-VL-3B, Qwen3-VL-2B, "
        "SmolVLM-256M)",
    )
    parser.add_argument("--examples", type=int, help="examples to run (paper: 64; paper-cpu: 4)")
    parser.add_argument("--batch-size", type=int, help="examples per batch (paper: 8; paper-cpu: 2)")
    parser.add_argument("--text-layers", type=int, help="LM decoder layers (paper: 24; paper-cpu: 2)")
    parser.add_argument("--vision-layers", type=int, help="vision tower layers, at least 2 (paper: 24; paper-cpu: 2)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weights of (a) and (b); default bfloat16 on CUDA, float32 on a CPU",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each batch per mode; the fastest counts")
    parser.add_argument(
        "--build-on-device",
        action="store_true",
        help="build the random model on the compute device (default: on the CPU, then moved)",
    )
    parser.add_argument(
        "--max-disagreement",
        type=float,
        help="exit 1 unless agree (the largest relative difference of a block) is at most this",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_trajectory)


REPO = Path(__file__).resolve().parent.parent


def run_dag(args: argparse.Namespace) -> int:
    """Build the DAG of a config as a login node would (`snakemake -n`), ``--repeats`` times in fresh
    folders: wall seconds of each, and whether torch was imported (it must not be)."""
    times = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="xmas-bench-dag-") as work:
            command = [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "snakemake",
                "--snakefile",
                str(REPO / "workflow/Snakefile"),
                "--directory",
                work,
                *args.targets,
                "-n",
                "--quiet",
                "all",
                "--configfile",
                str(args.config),
            ]
            start = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True)
            times.append(time.monotonic() - start)
            if result.returncode:
                print(result.stderr[-3000:], file=sys.stderr)
                return 1
            torch_imported = any(line.rstrip().endswith("| torch") for line in result.stderr.splitlines())
    best, median = min(times), sorted(times)[len(times) // 2]
    met = median <= args.max_seconds and not torch_imported
    print(
        f"dag: {args.config.name} -n {' '.join(args.targets)}: median {median:.2f} s, best {best:.2f} s "
        f"over {len(times)} runs; torch imported: {'yes' if torch_imported else 'no'}"
    )
    print(f"target: <= {args.max_seconds:g} s without torch: {'met' if met else 'NOT met'}")
    return 0 if met else 1


def add_dag(subparsers) -> None:
    parser = subparsers.add_parser(
        "dag", help="time `snakemake -n` on a config (the login node's wait)", description=run_dag.__doc__
    )
    parser.add_argument("--config", type=Path, default=REPO / "config/llava665k.yaml", help="config file")
    parser.add_argument(
        "--targets", nargs="*", default=["results/eval/summary.tsv", "results/report.html"], help="targets to plan"
    )
    parser.add_argument("--repeats", type=int, default=5, help="dry runs to time (default 5)")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="target median (default 5)")
    parser.set_defaults(run=run_dag)


def pairs(counts) -> float:
    return float((counts * (counts - 1) / 2).sum())


def adjusted_rand_index(first, second) -> float:
    """Agreement of two partitions of the same items: 1 identical, about 0 as by chance."""
    import pandas as pd

    table = pd.crosstab(pd.Series(list(first)), pd.Series(list(second))).to_numpy()
    together, rows, columns = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    items = int(table.sum())
    expected = rows * columns / (items * (items - 1) / 2) if items > 1 else 0.0
    best = (rows + columns) / 2
    return 1.0 if best == expected else (together - expected) / (best - expected)


def matched_share(first, second) -> float:
    """Share of items in the same cluster once each cluster of one is matched to at most one of the other
    (greedily, largest overlaps first)."""
    import pandas as pd

    table = pd.crosstab(pd.Series(list(first)), pd.Series(list(second))).stack().sort_values(ascending=False)
    used_first, used_second, same = set(), set(), 0
    for (a, b), count in table.items():
        if a not in used_first and b not in used_second:
            used_first.add(a), used_second.add(b)
            same += int(count)
    return same / len(first) if len(first) else 1.0


def with_this_python_on_path() -> dict[str, str]:
    """The environment for Snakemake, whose jobs run `xmas` from this Python's environment."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run_definitions(args: argparse.Namespace) -> int:
    """The demo's selection under both trajectory definitions (exact, upstream), each in its own folder under
    ``--work`` (kept, so a second call reuses them; the upstream run starts from a copy of the exact one, whose
    proxy checkpoints it shares): how far their clusters and subsets agree."""
    import pandas as pd
    import yaml

    budgets = [str(budget) for budget in args.budgets]
    targets = ["results/selection/clusters.parquet", *(f"results/subset_{budget}.json" for budget in budgets)]
    runs = {}
    for definition in ("exact", "upstream"):
        folder = args.work / definition
        if definition == "upstream" and not folder.exists():  # the same proxy: only trajectories on differ
            shutil.copytree(args.work / "exact", folder, symlinks=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(
            yaml.safe_dump({"trajectory": {"definition": definition}, "selection": {"budgets": args.budgets}})
        )
        start = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "--snakefile",
                str(REPO / "workflow/Snakefile"),
                "--directory",
                str(folder),
                *targets,
                "--configfile",
                str(folder / "config.yaml"),
                "--cores",
                str(args.cores),
                "--quiet",
                "all",
            ],
            check=True,
            env=with_this_python_on_path(),
        )
        runs[definition] = folder
        print(f"{definition}: {folder} ({time.monotonic() - start:.0f} s)")
    clusters = [pd.read_parquet(runs[d] / "results/selection/clusters.parquet") for d in ("exact", "upstream")]
    joined = clusters[0].merge(clusters[1], on="uid", suffixes=("_exact", "_upstream"))
    images = joined[joined.cluster_exact >= 0]
    print(
        f"clusters: {images.cluster_exact.nunique()} exact, {images.cluster_upstream.nunique()} upstream, over "
        f"{len(images)} image examples; adjusted Rand index "
        f"{adjusted_rand_index(images.cluster_exact, images.cluster_upstream):.3f}; same cluster after matching "
        f"{matched_share(images.cluster_exact, images.cluster_upstream):.1%}"
    )
    for budget in budgets:
        chosen = [
            set(pd.read_parquet(runs[d] / f"results/subset_{budget}.manifest.parquet").query("selected").uid)
            for d in ("exact", "upstream")
        ]
        print(
            f"subset {budget}: {len(chosen[0])} records; in both {len(chosen[0] & chosen[1])} "
            f"({len(chosen[0] & chosen[1]) / max(len(chosen[0]), 1):.1%})"
        )
    return 0


def add_definitions(subparsers) -> None:
    parser = subparsers.add_parser(
        "definitions",
        help="agreement of the exact and upstream trajectory definitions on the demo",
        description=run_definitions.__doc__,
    )
    parser.add_argument("--work", type=Path, default=Path("bench-definitions"), help="folder of the two runs")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.5], help="subsets to compare")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    parser.set_defaults(run=run_definitions)


# A child process's own peak memory: run it under this wrapper, which writes its child's maximum resident set.
ALONE = (
    "import json, resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
    "json.dump({'code': code, 'kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, open(sys.argv[1], 'w'))"
)
SCALE_STAGES = ("prepare", "merge", "cluster", "sample")
SCALE_SHARD_ROWS = 250_000
SCALE_GROUP_ROWS = 1_000


def measure_alone(command: list[str], report: Path) -> tuple[float, int]:
    """Wall seconds and peak resident memory (bytes) of ``command`` alone, in a process of its own."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", ALONE, str(report), *command], check=True)
    seconds = time.monotonic() - start
    measured = json.loads(report.read_text())
    if measured["code"]:
        raise SystemExit(f"{' '.join(command[:4])} failed with exit code {measured['code']}")
    return seconds, measured["kib"] * 1024


def png_pool(rng: random.Random, count: int = 64, side: int = 16) -> list[bytes]:
    import io

    from PIL import Image

    pool = []
    for _ in range(count):
        image = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pool.append(buffer.getvalue())
    return pool


def generate_parquet(folder: Path, records: int, seed: int) -> None:
    """A LLaVA-OneVision-Data-shaped parquet set: nine records in ten with an embedded image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from published import features

    rng = random.Random(seed)
    pool, images = sentence_pool(rng), png_pool(rng)
    schema = features("onevision").arrow_schema
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-records // SCALE_SHARD_ROWS)
    for shard in range(shards):
        first, last = shard * SCALE_SHARD_ROWS, min(records, (shard + 1) * SCALE_SHARD_ROWS)
        with pq.ParquetWriter(folder / f"train-{shard:05d}-of-{shards:05d}.parquet", schema) as writer:
            for start in range(first, last, SCALE_GROUP_ROWS):
                rows = {"id": [], "image": [], "conversations": [], "data_source": []}
                for index in range(start, min(last, start + SCALE_GROUP_ROWS)):
                    record = generated_record(index, rng, pool, 0.01)
                    if index % 10:
                        turn = record["conversations"][0]
                        turn["value"] = "<image>\n" + turn["value"]
                        rows["image"].append({"bytes": images[index % len(images)], "path": f"{index:08d}.png"})
                    else:
                        rows["image"].append(None)
                    rows["id"].append(f"{index:08d}")
                    rows["conversations"].append(record["conversations"])
                    rows["data_source"].append(f"source-{index % 12}")
                writer.write_table(pa.Table.from_pydict(rows, schema=schema))


def paper_config() -> dict:
    """config/llava665k.yaml with the schema's defaults filled in, as the workflow validates it."""
    import yaml
    from snakemake.utils import validate

    from xmas.settings import SCHEMA

    config = yaml.safe_load((REPO / "config/llava665k.yaml").read_text())
    validate(config, str(SCHEMA))
    return config


def random_trajectories(examples: Path, out: Path, config: dict, seed: int) -> list[Path]:
    """Trajectory shard files of every usable image record, random singular values, as `xmas trajectory`
    writes them (its table, sealed)."""
    import numpy as np

    from xmas.data.examples import shard_slice, usable_image_examples
    from xmas.io import write_parquet
    from xmas.stages.trajectory import singular_value_columns, trajectory_table

    rng = np.random.default_rng(seed)
    usable = usable_image_examples(examples)
    columns = singular_value_columns(config["trajectory"]["top_k"])
    shards, files = config["trajectory"]["shards"], []
    for checkpoint in range(1, config["training"]["checkpoints"] + 1):
        for shard in range(shards):
            part = shard_slice(usable, shard, shards)
            values = np.sort(rng.random((len(part), len(columns)), dtype=np.float32), axis=1)[:, ::-1]
            path = out / f"checkpoint-{checkpoint}/shard-{shard}.parquet"
            write_parquet(trajectory_table(part.uid.to_numpy(), checkpoint, columns, values), path)
            files.append(path)
    return files


def scale_commands(work: Path, data: Path, model: Path, shards: list[Path], config: dict) -> dict[str, list[str]]:
    import shlex

    from xmas.settings import stage_flags

    xmas = [sys.executable, "-m", "xmas"]
    examples, merged, clusters = work / "examples.parquet", work / "trajectories.parquet", work / "clusters.parquet"

    def flags(stage: str) -> list[str]:
        return shlex.split(stage_flags(config, stage))

    return {
        "prepare": [*xmas, "prepare", "--annotations", str(data), "--model", str(model), "--out", str(examples),
                    *flags("prepare")],
        "merge": [*xmas, "merge", *map(str, shards), "--examples", str(examples), "--out", str(merged),
                  *flags("merge")],
        "cluster": [*xmas, "cluster", "--examples", str(examples), "--trajectories", str(merged), "--out",
                    str(clusters), *flags("cluster")],
        "sample": [*xmas, "sample", "--method", "xmas", "--budget", "0.5", "--examples", str(examples),
                   "--annotations", str(data), "--clusters", str(clusters), "--out", str(work / "subset.parquet"),
                   *flags("sample")],
    }  # fmt: skip


def run_scale(args: argparse.Namespace) -> int:
    from xmas.settings import job_resources

    config = paper_config()
    work = Path(tempfile.mkdtemp(prefix="xmas-bench-scale-"))
    results: dict[int, dict[str, tuple[float, int]]] = {}
    misses = []
    try:
        for records in args.records:
            folder = work / f"{records}"
            start = time.monotonic()
            generate_parquet(folder / "data", records, args.seed)
            size = sum(path.stat().st_size for path in (folder / "data").glob("*.parquet"))
            print(f"generated {records:,} records, {size / 1e9:.2f} GB of parquet, in {time.monotonic() - start:.0f} s",
                  flush=True)  # fmt: skip
            model = args.model or paper_proxy(folder, folder / "data")
            commands = scale_commands(folder, folder / "data", model, [], config)
            results[records] = {"prepare": measure_alone(commands["prepare"], folder / "prepare.json")}
            shards = random_trajectories(folder / "examples.parquet", folder / "trajectories", config, args.seed)
            commands = scale_commands(folder, folder / "data", model, shards, config)
            for stage in SCALE_STAGES[1:]:
                results[records][stage] = measure_alone(commands[stage], folder / f"{stage}.json")
            for stage, (seconds, peak) in results[records].items():
                asked = job_resources(config, stage)["mem_mb"] * 1e6
                limit, target = (min(asked, 4e9), ", target 4 GB") if stage == "prepare" else (asked, "")
                print(f"{records:>10,} {stage:8} {seconds:8.1f} s {records / seconds:>10,.0f} records/s "
                      f"peak {peak / 1e9:6.2f} GB (its rule asks {asked / 1e9:.0f} GB{target}): "
                      f"{'fits' if peak <= limit else 'does NOT fit'}", flush=True)  # fmt: skip
                if peak > limit:
                    misses.append(f"{stage} at {records:,} records")
            if not args.keep:
                shutil.rmtree(folder / "data")
    finally:
        if not args.keep:
            shutil.rmtree(work)
        else:
            print(f"kept in {work}")
    sizes = sorted(results)
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"growth from {small:,} to {large:,} records ({large / small:.2f}x the records):")
        for stage in SCALE_STAGES:
            (time_small, memory_small), (time_large, memory_large) = results[small][stage], results[large][stage]
            print(f"  {stage:8} time {time_large / time_small:5.2f}x, peak memory {memory_large / memory_small:5.2f}x")
    verdict = "NOT met: " + ", ".join(misses) if misses else "met"
    print(f"target: every stage within its rule's memory, prepare within 4 GB: {verdict}")
    return 1 if misses else 0


def add_scale(subparsers) -> None:
    parser = subparsers.add_parser(
        "scale",
        help="prepare, merge, cluster and sample on generated parquet sets of 665k and 3M records",
        description=run_scale.__doc__ or __doc__,
    )
    parser.add_argument("--records", type=int, nargs="+", default=[665_000, 3_000_000], help="set sizes to run")
    parser.add_argument("--model", type=Path, help="the proxy's checkpoint 0 (default: the paper's, from stand-ins)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_scale)


BENCHMARKS = [add_prepare, add_trajectory, add_dag, add_definitions, add_scale]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    for add in BENCHMARKS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
