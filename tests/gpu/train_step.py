"""One training step of the paper's proxy or of a LoRA fine-tune of its 7B target, on random weights
built from configs, through xmas's training engine (``Training.prepare`` and ``Training.train_step`` of
:mod:`xmas.training.engine`): ``python tests/gpu/train_step.py proxy|lora [--smoke] [--fsdp full_shard]``.

- ``proxy``: TinyLLaVA as ``proxy-init`` composes it (StableLM-2-Zephyr-1.6B: 24 layers, hidden 2048,
  32 heads, vocabulary 100352; CLIP ViT-L/14-336: 24 layers, hidden 1024, 576 image tokens; a 2-layer
  GELU projector), float32 weights under bf16 autocast as ``train-segment`` trains it, vision tower
  frozen (paper), the paper's global batch of 32 in micro-batches of 8.
- ``lora``: LLaVA-1.5-7B as ``target-init`` composes it (Llama: 32 layers, hidden 4096, 32 heads,
  intermediate 11008, vocabulary 32000 + the image token; the same CLIP; a 2-layer GELU projector),
  built on the device in bfloat16 (never float32 on the CPU), then ``finetune-target``'s recipe:
  LoRA r=128, alpha 256, dropout 0.05 on the language model's linear layers, the projector trained
  in full, the vision tower frozen, trainable weights float32 under bf16 autocast, gradient
  checkpointing; one micro-batch of 16 (the paper's per-GPU batch).

Examples are generated as ``tools/bench.py trajectory`` generates them (one image each, text lengths
64-512), and the text after the image is the answer (labels). Two steps run: the first warms up, the
second is the measured one. Peak memory is ``torch.cuda.max_memory_allocated`` (absolute, reset
before each step); on a CPU the process's peak resident set (VmHWM). The step must give a finite
loss, change the weights that train and leave the frozen ones alone. The last line is
``RESULT <proxy-step|lora-7b-step> PASS|FAIL key=value ...``; the exit status is 1 on FAIL.

``--fsdp full_shard`` (or ``shard_grad_op``) runs the step through accelerate's FSDP (version 2) in one
process, as ``target.fsdp`` does: on a GPU only (accelerate has no FSDP on CPUs); its RESULT is named
``<name>-fsdp`` (proxy-step-fsdp).

``--smoke`` runs the same code at tiny widths on the CPU (tests/gpu/test_check.py). The recipe is
``xmas.models.recipe``, which needs neither pandas, pyarrow nor pillow.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tools")]

from xmas.models.recipe import freeze_vision_tower, parameter_groups, with_lora  # noqa: E402
from xmas.settings import stage_defaults  # noqa: E402
from xmas.training.engine import (  # noqa: E402
    MicroBatch,
    Training,
    attention_implementation,
    context_from_environment,
)

from bench import PROMPT_TOKENS, PeakMemory, bench_batches  # noqa: E402

IGNORE_INDEX = -100
PROJECTOR = "multi_modal_projector"
GIB = 2**30
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}
TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
    "projection_dim": 32,
}
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 256,
}
STABLELM_2_1_6B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 100352,
}
VICUNA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32001,
}  # 32000 + the image token, as target-init adds it

CHECKS = {
    "proxy": {
        "name": "proxy-step",
        "text": STABLELM_2_1_6B,
        "vision": CLIP_L_336,
        "examples": 32,
        "micro_batches": 4,
        "text_lengths": (64, 512),
        "lora": None,
        "checkpointing": False,
    },
    "lora": {
        "name": "lora-7b-step",
        "text": VICUNA_7B,
        "vision": CLIP_L_336,
        "examples": 16,
        "micro_batches": 1,
        "text_lengths": (64, 512),
        "lora": {"rank": 128, "alpha": 256, "dropout": 0.05},
        "checkpointing": True,
    },
}
SMOKE = {"text": TINY_TEXT, "vision": TINY_VISION, "examples": 4, "micro_batches": 2, "text_lengths": (8, 24)}
SMOKE_LORA = {"rank": 8, "alpha": 16, "dropout": 0.05}
# Learning rates of the paper's recipes: the proxy 2e-5; the target's LoRA 2e-4, its projector 2e-5.
LEARNING_RATES = {"proxy": (2e-5, None), "lora": (2e-4, 2e-5)}


def check_settings(kind: str, smoke: bool) -> dict:
    settings = dict(CHECKS[kind])
    if smoke:
        settings.update(SMOKE, lora=SMOKE_LORA if settings["lora"] else None)
    return settings


# ------------------------------------------------------------------------------------------- models


def llava_config(kind: str, settings: dict):
    """A Llava config as proxy-init (StableLM + CLIP) or target-init (Llama + CLIP) composes it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, StableLmConfig

    text = settings["text"]
    if kind == "proxy":
        text_config = StableLmConfig(
            max_position_embeddings=4096,
            partial_rotary_factor=0.25,
            use_qkv_bias=True,
            layer_norm_eps=1e-5,
            tie_word_embeddings=False,
            pad_token_id=0,
            **text,
        )
    else:
        text_config = LlamaConfig(
            max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, **text
        )
    vision = CLIPVisionConfig(**settings["vision"])
    return LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=text["vocab_size"] - 1,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
    )


def build_model(config, device: torch.device, dtype: torch.dtype, attention: str, seed: int = 0):
    """Random weights created on ``device`` in ``dtype`` directly: nothing is materialised elsewhere first."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        return LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attention)


# ------------------------------------------------------------------------------------------- recipe


def recipe() -> tuple[dict, str]:
    """with_lora, freeze_vision_tower and parameter_groups: xmas's (they import torch and peft alone)."""
    return (
        {"with_lora": with_lora, "freeze_vision_tower": freeze_vision_tower, "parameter_groups": parameter_groups},
        "xmas.models.recipe",
    )


def prepare_model(kind: str, settings: dict, device: torch.device, steps: dict):
    """The model as train-segment (proxy) or finetune-target (LoRA) sets it up; the vision tower frozen."""
    attention = attention_implementation("auto", device)
    config = llava_config(kind, settings)
    lora = settings["lora"]
    model = build_model(config, device, torch.bfloat16 if lora else torch.float32, attention)
    if lora:
        model = steps["with_lora"](model, lora["rank"], lora["alpha"], lora["dropout"])
    steps["freeze_vision_tower"](model)
    for parameter in model.parameters():  # as finetune-target: what trains is float32 under autocast
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model, attention


# ----------------------------------------------------------------------------------------- batches


def with_labels(batch: dict, image_token_id: int) -> dict:
    """The text after the image is the answer: labels on it, IGNORE_INDEX on the prompt, image and padding."""
    labels = batch["input_ids"].clone()
    labels[:, :PROMPT_TOKENS] = IGNORE_INDEX
    labels[(batch["input_ids"] == image_token_id) | (batch["attention_mask"] == 0)] = IGNORE_INDEX
    return {**batch, "labels": labels}


def micro_batches(model, settings: dict, device: torch.device, seed: int = 0) -> list[MicroBatch]:
    """Generated examples sorted by length, cut into the micro-batches of one global batch."""
    per_micro = math.ceil(settings["examples"] / settings["micro_batches"])
    shape = {"text_lengths": settings["text_lengths"], "examples": settings["examples"], "batch_size": per_micro}
    config = model.config
    batches = bench_batches(model, shape, seed)
    return [
        MicroBatch({key: value.to(device) for key, value in with_labels(batch, config.image_token_id).items()})
        for batch in batches
    ]


def label_tokens(micro: MicroBatch) -> int:
    """As xmas.training.loop.label_tokens: labels shifted by one, ignored positions dropped."""
    return int((micro.inputs["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------- the step


class Memory:
    """Absolute peak memory of one step: torch.cuda.max_memory_allocated, or VmHWM on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = (
            "torch.cuda.max_memory_allocated"
            if device.type == "cuda"
            else "peak resident set (VmHWM, reset before each step)"
        )

    def start(self) -> None:
        PeakMemory(self.device).start()  # resets the CUDA peak, or VmHWM through /proc/self/clear_refs

    def now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated()
        return PeakMemory._status("VmRSS")

    def reserved(self) -> str:
        """The CUDA allocator's peak reservation (what the process held), for the step's line."""
        if self.device.type != "cuda":
            return ""
        return f" (reserved {torch.cuda.max_memory_reserved() / GIB:.2f} GiB)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return PeakMemory._status("VmHWM")


def probes(model) -> dict[str, bool]:
    """A few parameters and whether a step must change them: the first trainable projector, LoRA (or
    language model) and vision tower weights, and for LoRA a frozen base weight."""
    names = [name for name, _ in model.named_parameters()]
    rules = [
        (r"multi_modal_projector\.(modules_to_save\.default\.)?linear_1\.weight$", True),
        (r"lora_B\.default\.weight$", True),
        (r"language_model\.layers\.0\..*q_proj\.(base_layer\.)?weight$", None),
        (r"vision_tower\..*\.weight$", False),
    ]
    chosen = {}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for pattern, changes in rules:
        match = next((name for name in names if re.search(pattern, name)), None)
        if match is not None:
            chosen[match] = (match in trainable) if changes is None else changes
    return chosen


def whole(parameter) -> torch.Tensor:
    """A parameter whole: FSDP's are sharded DTensors."""
    parameter = parameter.detach()
    return parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter


def snapshot(model, names) -> dict[str, torch.Tensor]:
    parameters = dict(model.named_parameters())
    return {name: whole(parameters[name]).clone() for name in names}


def changed_as_expected(model, before: dict[str, torch.Tensor], expected: dict[str, bool]) -> list[str]:
    """Problems: a weight that should have changed but did not, or the reverse."""
    parameters = dict(model.named_parameters())
    problems = []
    for name, tensor in before.items():
        changed = not torch.equal(whole(parameters[name]), tensor)
        if changed != expected[name]:
            problems.append(f"{name} {'changed' if changed else 'did not change'}")
    return problems


def timed_step(training, batches: list[MicroBatch], context, memory: Memory) -> tuple[float, float, int]:
    """Seconds, loss and peak memory of one optimizer step."""
    items = context.sum(float(sum(label_tokens(micro) for micro in batches))).clamp(min=1).to(torch.float32)
    memory.start()
    start = time.monotonic()
    loss = float(training.train_step(batches, items))
    if context.device.type == "cuda":
        torch.cuda.synchronize()
    return time.monotonic() - start, loss, memory.peak()


def describe(kind: str, settings: dict, model, attention: str, device: torch.device) -> str:
    text, vision = settings["text"], settings["vision"]
    lm = "StableLM-2" if kind == "proxy" else "Llama"
    dtype = "float32 under bf16 autocast" if not settings["lora"] else "bfloat16 base, float32 trainable, bf16 autocast"
    return (
        f"{lm} LM {text['num_hidden_layers']} layers, hidden {text['hidden_size']}, {text['num_attention_heads']} "
        f"heads, vocab {text['vocab_size']}; CLIP {vision['num_hidden_layers']} layers, hidden "
        f"{vision['hidden_size']}, {model.config.image_seq_length} image tokens; random weights, {dtype}; "
        f"device {device}, attention {attention}"
    )


def report_parameters(name: str, settings: dict, model, source: str) -> dict[str, str]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = settings["lora"]
    trained = (
        f"LoRA r={lora['rank']} alpha={lora['alpha']} dropout={lora['dropout']} on the LM's linear layers, "
        "projector in full"
        if lora
        else "LM and projector trained"
    )
    print(
        f"{name}: {total / 1e6:,.1f}M parameters, {trainable / 1e6:,.1f}M trainable ({trained}, vision tower "
        f"frozen, gradient checkpointing {'on' if settings['checkpointing'] else 'off'}); recipe: {source}",
        flush=True,
    )
    return {"parameters_m": f"{total / 1e6:.1f}", "trainable_m": f"{trainable / 1e6:.1f}"}


def engine(kind: str, model, settings: dict, steps: dict, fsdp: str | None = None) -> Training:
    """AdamW over the trainable weights at the recipe's learning rates, through xmas's Training (DDP's path in one
    process, or FSDP)."""
    learning_rate, projector_rate = LEARNING_RATES[kind]
    optimizer = torch.optim.AdamW(steps["parameter_groups"](model, learning_rate, projector_rate, 0.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    training = Training(
        stage_defaults(
            "finetune-target",
            precision="bf16",
            max_grad_norm=1.0,
            gradient_checkpointing=settings["checkpointing"],
            fsdp=fsdp,
        )
    )
    training.prepare(model, optimizer, scheduler)
    return training


def report_batch(name: str, settings: dict, batches: list[MicroBatch], memory: Memory) -> int:
    tokens = sum(int(micro.inputs["attention_mask"].sum()) for micro in batches)
    low, high = settings["text_lengths"]
    print(
        f"{name}: batch of {settings['examples']} examples in {len(batches)} micro-batch(es) of "
        f"{len(batches[0].inputs['input_ids'])}, {tokens:,} tokens (text lengths {low}-{high}), "
        f"{sum(label_tokens(m) for m in batches):,} label tokens; {memory.now() / GIB:.2f} GiB in use before "
        f"the first step; peak memory: {memory.method}",
        flush=True,
    )
    return tokens


def run_steps(
    name: str, training, batches: list[MicroBatch], context, memory: Memory, count: int, tokens: int
) -> list[tuple[float, float, int]]:
    results = []
    for step in range(1, count + 1):
        seconds, loss, peak = timed_step(training, batches, context, memory)
        results.append((seconds, loss, peak))
        label = " (warm-up)" if step == 1 and count > 1 else ""
        print(
            f"{name}: step {step}{label}: {seconds:.2f} s, loss {loss:.4f}, peak memory {peak / GIB:.2f} GiB"
            f"{memory.reserved()}, {tokens / seconds:,.0f} tokens/s",
            flush=True,
        )
    return results


def verdict(name: str, results: list, problems: list[str], settings: dict, tokens: int, sizes: dict) -> int:
    problems = problems + [f"loss {loss} is not finite" for _, loss, _ in results if not math.isfinite(loss)]
    for problem in problems:
        print(f"{name}: problem: {problem}", flush=True)
    seconds, loss, _ = results[-1]
    peak = max(result[2] for result in results)
    figures = (
        f"step_s={seconds:.3f} first_step_s={results[0][0]:.3f} peak_gib={peak / GIB:.2f} "
        f"tokens_per_s={tokens / seconds:.0f} loss={loss:.4f} examples={settings['examples']} tokens={tokens} "
        + " ".join(f"{key}={value}" for key, value in sizes.items())
    )
    print(f"RESULT {name} {'FAIL' if problems else 'PASS'} {figures}", flush=True)
    return 1 if problems else 0


def run(kind: str, smoke: bool, steps_count: int = 2, fsdp: str | None = None) -> int:
    settings = check_settings(kind, smoke)
    name = settings["name"] + ("-fsdp" if fsdp else "")
    context = context_from_environment()
    steps, source = recipe()
    memory = Memory(context.device)
    start = time.monotonic()
    model, attention = prepare_model(kind, settings, context.device, steps)
    print(
        f"{name}: {describe(kind, settings, model, attention, context.device)}; built in "
        f"{time.monotonic() - start:.1f} s",
        flush=True,
    )
    sizes = report_parameters(name, settings, model, source)
    training = engine(kind, model, settings, steps, fsdp)
    context = training.context
    model.train()
    batches = micro_batches(model, settings, context.device)
    tokens = report_batch(name, settings, batches, memory)
    expected = probes(model)
    before = snapshot(model, expected)
    results = run_steps(name, training, batches, context, memory, steps_count, tokens)
    checked = ", ".join(f"{weight} ({'trains' if trains else 'frozen'})" for weight, trains in expected.items())
    print(f"{name}: weights checked: {checked}", flush=True)
    return verdict(name, results, changed_as_expected(model, before, expected), settings, tokens, sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=tuple(CHECKS))
    parser.add_argument("--smoke", action="store_true", help="tiny widths (for the CPU)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps; the last is the measured one")
    parser.add_argument("--fsdp", choices=("full_shard", "shard_grad_op"), help="through accelerate's FSDP (GPUs only)")
    args = parser.parse_args(argv)
    try:
        return run(args.kind, args.smoke, args.steps, args.fsdp)
    except Exception as error:  # an OOM or a library error still ends with a RESULT line
        traceback.print_exc()
        reason = re.sub(r"\s+", " ", f"{type(error).__name__}: {error}")[:300]
        name = CHECKS[args.kind]["name"] + ("-fsdp" if args.fsdp else "")
        print(f"RESULT {name} FAIL error={reason!r}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
