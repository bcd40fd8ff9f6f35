"""GPU, precision and distributed machinery shared by proxy training and target fine-tuning.

- :func:`resolve_dtype`, :func:`attention_implementation`: names from the config to torch/transformers.
- :func:`distributed`: rank and world size from the launcher's environment, the process group, the device.
- :func:`prepare_training`: the model and optimizer wrapped for one process, torch DDP, or DeepSpeed
  ZeRO; :mod:`xmas.training.loop` runs the steps through any of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from xmas.errors import XmasError
from xmas.resources import resource
from xmas.training.launch import MIXED_PRECISION

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ATTENTION_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
DEEPSPEED_PRESETS = ("zero2", "zero3")


def resolve_dtype(name: str) -> torch.dtype:
    """A torch dtype from ``float32|bfloat16|float16`` or the precision names ``fp32|bf16|fp16``."""
    key = PRECISIONS.get(name, name)
    if key not in DTYPES:
        raise XmasError(f"unknown precision/dtype {name!r}: use one of {', '.join([*DTYPES, *PRECISIONS])}")
    return DTYPES[key]


def compute_device() -> torch.device:
    """The first visible GPU when torch sees one, else the CPU (also under a GPU grant without a driver)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def flash_attention_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attention_implementation(requested: str, device: torch.device | str) -> str:
    """The transformers attention implementation: ``auto`` is flash-attn 2 on CUDA when installed, else SDPA."""
    if requested not in ATTENTION_CHOICES:
        raise XmasError(f"attn_implementation {requested!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return "flash_attention_2" if on_cuda and flash_attention_installed() else "sdpa"
    if requested == "flash_attention_2":
        if not flash_attention_installed():
            raise XmasError(
                "attn_implementation flash_attention_2: the flash-attn package is not installed; "
                'pip install -e ".[gpu]" (or choose auto/sdpa)'
            )
        if not on_cuda:
            raise XmasError(f"attn_implementation flash_attention_2 needs a CUDA device, the job runs on {device}")
    return requested


# ----------------------------------------------------------------------------------------------- processes


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank 0 of 1 unless started by a launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def sum(self, value: float | torch.Tensor) -> torch.Tensor:
        """The sum over all processes (the value itself in a single process)."""
        from accelerate.utils import reduce

        tensor = (
            value.detach().clone()
            if torch.is_tensor(value)
            else torch.tensor(value, dtype=torch.float64, device=self.device)
        )
        return reduce(tensor, reduction="sum") if self.is_distributed else tensor

    def barrier(self) -> None:
        if self.is_distributed:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def context_from_environment(environ: dict[str, str] | None = None) -> Distributed:
    """Rank, world size and device from the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK: torchrun's)."""
    environ = os.environ if environ is None else environ
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(device=compute_device())
    rank, local_rank = int(environ["RANK"]), int(environ.get("LOCAL_RANK", environ["RANK"]))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return Distributed(rank, world_size, local_rank, device)


@contextlib.contextmanager
def distributed() -> Iterator[Distributed]:
    """The process context; under a launcher (accelerate launch, torchrun), accelerate's process group (NCCL on CUDA,
    gloo on CPU) lives inside."""
    context = context_from_environment()
    if not context.is_distributed:
        yield context
        return
    from accelerate import PartialState

    state = PartialState(cpu=context.device.type == "cpu")
    try:
        yield context
    finally:
        state.destroy_process_group()


# ----------------------------------------------------------------------------------- training wrappers


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward; non-reentrant, so a frozen vision tower's inputs need no grad."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


@dataclasses.dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor]
    weight: float = 1.0  # 0: a filler that only keeps this rank's collective calls in step with the others


class TorchTraining:
    """One process or DDP through accelerate: autocast over fp32 weights in bf16/fp16, a gradient scaler in fp16,
    DDP's gradient sync skipped on all but a step's last micro-batch, clipping of the unscaled gradients."""

    def __init__(self, model, optimizer, scheduler, context: Distributed, precision: str, max_grad_norm: float):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.module, self.scheduler = model, scheduler  # the schedule steps once per global step, as here
        self.context, self.max_grad_norm = context, max_grad_norm
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[precision],
            cpu=context.device.type == "cpu",
            # A batch without images leaves the projector unused on that rank.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def train_step(self, micro_batches: list[MicroBatch], items: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=self.context.device)
        for position, micro in enumerate(micro_batches):
            last = position == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                loss = self.model(**micro.inputs, num_items_in_batch=items).loss * micro.weight
                # DDP averages gradients over ranks; the losses are already fractions of the global batch.
                self.accelerator.backward(loss * self.context.world_size)
            total += loss.detach().float()
        self.accelerator.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def state_dict(self) -> dict:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.accelerator.scaler:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict, folder: Path) -> None:
        if "optimizer" not in state:
            raise XmasError(f"{folder} holds no optimizer state of a torch run (was it trained with DeepSpeed?)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def save_model(self, folder: Path, **kwargs) -> None:
        if self.context.is_main:
            self.module.save_pretrained(folder, **kwargs)

    def save_state(self, folder: Path) -> dict:
        """What goes into the training-state file (the optimizer and scheduler travel in it)."""
        return self.state_dict()


class DeepSpeedTraining:
    """DeepSpeed ZeRO-2/3: DeepSpeed owns mixed precision, clipping, the scheduler step and the shards.

    DeepSpeed is driven directly, not through accelerate, where accelerate leaves a gap: on a machine without
    an accelerator (CI's CPUs, where the ZeRO tests run over gloo) accelerate 1.x falls back to one process of
    its own (DistributedType.NO) while DeepSpeed counts them all, and its ``cpu=True`` drops the DeepSpeed
    plugin, so the ZeRO-2/3 equivalence tests could not run through it.
    """

    STATE_DIR = "deepspeed"
    TAG = "segment"

    def __init__(self, model, optimizer, scheduler, context: Distributed, config: dict):
        deepspeed = import_deepspeed()
        self.context, self.config, self.module = context, config, model
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.accumulation = config["gradient_accumulation_steps"]

    def train_step(self, micro_batches: list[MicroBatch], items: torch.Tensor) -> torch.Tensor:
        """One optimizer step. DeepSpeed steps after exactly ``gradient_accumulation_steps`` micro-batches,
        so a short last batch is filled up with weight-0 micro-batches (their gradients are zeros)."""
        if len(micro_batches) > self.accumulation:
            raise XmasError(f"{len(micro_batches)} micro-batches in a step, DeepSpeed expects {self.accumulation}")
        fillers = [MicroBatch(micro_batches[0].inputs, weight=0.0)] * (self.accumulation - len(micro_batches))
        total = torch.zeros((), device=self.context.device)
        for micro in [*micro_batches, *fillers]:
            loss = self.engine(**micro.inputs, num_items_in_batch=items).loss * micro.weight
            # DeepSpeed divides by the accumulation steps and averages over ranks; undo both.
            self.engine.backward(loss * self.context.world_size * self.accumulation)
            self.engine.step()
            total += loss.detach().float()
        return total

    def load_state_dict(self, state: dict, folder: Path) -> None:
        if not (folder / self.STATE_DIR).is_dir():
            raise XmasError(
                f"{folder} holds no DeepSpeed state ({self.STATE_DIR}/): it was trained without "
                "DeepSpeed; keep training.deepspeed as it was, or train again from checkpoint 0"
            )
        self.engine.load_checkpoint(str(folder / self.STATE_DIR), tag=self.TAG)

    def save_model(self, folder: Path, **kwargs) -> None:
        if self.config.get("zero_optimization", {}).get("stage") == 3:
            weights = self.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
            if self.context.is_main:
                self.module.save_pretrained(folder, state_dict=weights, **kwargs)
        elif self.context.is_main:
            self.module.save_pretrained(folder, **kwargs)

    def save_state(self, folder: Path) -> dict:
        self.engine.save_checkpoint(str(folder / self.STATE_DIR), tag=self.TAG)  # collective
        return {}


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise XmasError('training.deepspeed is set but DeepSpeed is not installed: pip install -e ".[gpu]"') from None
    return deepspeed


def deepspeed_config(settings, world_size: int, hidden_size: int | None = None) -> dict:
    """``settings.deepspeed``, a shipped preset (zero2, zero3) or a JSON file, with its "auto" values filled
    from the training stage's ``settings`` and, for ZeRO-3's bucket sizes, the language model's hidden size."""
    choice = settings.deepspeed
    path = resource("deepspeed", f"{choice}.json") if choice in DEEPSPEED_PRESETS else Path(choice)
    if not path.is_file():
        raise XmasError(
            f"training.deepspeed {choice!r} is neither {' nor '.join(DEEPSPEED_PRESETS)} nor a DeepSpeed JSON file"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise XmasError(f"{path}: not valid JSON ({error})") from None
    per_rank = math.ceil(settings.batch_size / world_size)
    micro = settings.micro_batch_size or per_rank
    accumulation = max(1, math.ceil(per_rank / micro))
    precision = settings.precision
    filled = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "gradient_clipping": settings.max_grad_norm,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for section, wanted in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        if config.get(section, {}).get("enabled") == "auto":
            config[section]["enabled"] = wanted
    _fill_zero_sizes(config.get("zero_optimization", {}), hidden_size)
    leftover = [key for key, value in _flatten(config) if value == "auto"]
    if leftover:
        raise XmasError(f"{path}: cannot fill 'auto' for {', '.join(leftover)}; set numbers there")
    return config


def _fill_zero_sizes(zero: dict, hidden_size: int | None) -> None:
    """ZeRO-3 bucket sizes that the HF integration derives from the model's hidden size."""
    if hidden_size is None:
        return
    derived = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in derived.items():
        if zero.get(key) == "auto":
            zero[key] = value


def _flatten(config: dict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def hidden_size_of(model_config) -> int | None:
    """The language model's hidden size (DeepSpeed derives its ZeRO-3 bucket sizes from it)."""
    return getattr(getattr(model_config, "text_config", model_config), "hidden_size", None)


@contextlib.contextmanager
def partitioned_loading(settings, model_config, world_size: int) -> Iterator[None]:
    """Under ZeRO-3, a model loaded inside is partitioned over the processes as its weights are read
    (transformers builds it under ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig`` is alive), so no
    process ever holds the whole model. Elsewhere, nothing changes."""
    config = deepspeed_config(settings, world_size, hidden_size_of(model_config)) if settings.deepspeed else {}
    if config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    # zero.Init reads the world size from DeepSpeed's own view of the process group
    import_deepspeed().init_distributed()
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    alive = HfDeepSpeedConfig(config)  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        del alive


def parameter_count(parameters) -> int:
    """Elements of the parameters, whole even where ZeRO-3 keeps only this process's partition."""
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in parameters)


def parameters_held(parameters) -> int:
    """Elements this process holds: its partition of a ZeRO-3 parameter, all of any other."""
    return sum(
        parameter.ds_tensor.numel() if hasattr(parameter, "ds_tensor") else parameter.numel()
        for parameter in parameters
    )


def prepare_training(model, optimizer, scheduler, context: Distributed, settings):
    """The model and optimizer wrapped as the training stage's ``settings`` ask: DeepSpeed when ``deepspeed``
    is set, else torch."""
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if settings.deepspeed:
        import_deepspeed()  # before anything else: the missing package is the error to report
        config = deepspeed_config(settings, context.world_size, hidden_size_of(getattr(model, "config", None)))
        return DeepSpeedTraining(model, optimizer, scheduler, context, config)
    return TorchTraining(model, optimizer, scheduler, context, settings.precision, settings.max_grad_norm)
