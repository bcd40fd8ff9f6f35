"""GPU, precision and distributed machinery shared by proxy training and target fine-tuning.

- :func:`resolve_dtype`, :func:`attention_implementation`: names from the config to torch/transformers.
- :func:`context_from_environment`: rank and world size from the launcher's environment, and the device.
- :class:`Training` (:func:`training`): one accelerate ``Accelerator`` per training stage, for one process, torch
  DDP, DeepSpeed ZeRO-2/3 or FSDP; :mod:`xmas.training.loop` runs the steps through any of them.
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
from xmas.io import load_torch
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


def attention_implementation(requested: str, device: torch.device | str, family=None) -> str:
    """The transformers attention implementation: ``auto`` is flash-attn 2 on CUDA when installed, else SDPA (and
    SDPA for a ``family`` that flash-attn cannot run: Gemma 3's image blocks and sliding windows)."""
    if requested not in ATTENTION_CHOICES:
        raise XmasError(f"attn_implementation {requested!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    on_cuda = torch.device(device).type == "cuda"
    flash_runs = family is None or family.flash_attention
    if requested == "auto":
        return "flash_attention_2" if on_cuda and flash_attention_installed() and flash_runs else "sdpa"
    if requested == "flash_attention_2" and not flash_runs:
        raise XmasError(
            f"attn_implementation flash_attention_2: {family.name} models attend with masks flash-attn cannot "
            "apply (transformers refuses it for them); choose auto or sdpa"
        )
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


# ----------------------------------------------------------------------------------- training


@dataclasses.dataclass
class MicroBatch:
    inputs: dict[str, torch.Tensor]
    weight: float = 1.0  # 0: a filler that only keeps this rank's collective calls in step with the others


def strategy_of(settings) -> str:
    """How the processes share the model: ``deepspeed`` (ZeRO), ``fsdp``, or ``ddp`` (whole copies; one
    process without a launcher). ``settings``: a training stage's."""
    if settings.deepspeed and settings.fsdp:
        raise XmasError(
            f"deepspeed ({settings.deepspeed}) and fsdp ({settings.fsdp}) are both set: choose one way to shard"
        )
    return "deepspeed" if settings.deepspeed else "fsdp" if settings.fsdp else "ddp"


def sharded(settings) -> bool:
    """Whether the run gathers parameters module by module (ZeRO, FSDP): every process must then run every
    module in every micro-batch, the vision tower included (:func:`xmas.training.loop.encode_share`)."""
    return strategy_of(settings) != "ddp"


class Training:
    """One accelerate ``Accelerator`` for a training stage, made before the model loads (ZeRO-3 then loads
    each process's partition only): torch DDP, DeepSpeed ZeRO-2/3 or FSDP as ``settings`` ask; autocast in
    bf16/fp16 over fp32 weights (DeepSpeed: its own mixed precision), fp16's gradient scaler, gradient sync
    on a step's last micro-batch only, clipping, and the whole state saved and restored by accelerate.

    What stays ours: the global batch cut into equal numbers of micro-batches per process, each loss a
    fraction of the global batch's label tokens (:mod:`xmas.training.loop`).
    """

    def __init__(self, settings, model_config=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.settings, self.strategy = settings, strategy_of(settings)
        launched = context_from_environment()
        on_cpu = launched.device.type == "cpu"
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)]  # a text-only batch skips the projector
        plugins = {}
        if self.strategy == "deepspeed":
            import_deepspeed()  # before anything else: the missing package is the error to report
            self.accumulation = accumulation_steps(settings, launched.world_size)
            plugins["deepspeed_plugin"] = deepspeed_plugin(settings, self.accumulation, model_config)
            if on_cpu:
                # accelerate has no CPU backend for DeepSpeed (a gap): gloo, as DeepSpeed's CPU accelerator uses.
                handlers.append(InitProcessGroupKwargs(backend="gloo"))
        elif self.strategy == "fsdp":
            if on_cpu:
                raise XmasError(
                    f"fsdp {settings.fsdp}: accelerate shards with FSDP on GPUs only, and this job sees none "
                    "(torch.cuda.is_available() is False); set gpus, or use deepspeed (it runs on CPUs too) or neither"
                )
            plugins["fsdp_plugin"] = fsdp_plugin(settings)
        self.own_environment = process_group_environment() if plugins else []
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[settings.precision],
            cpu=on_cpu and self.strategy == "ddp",
            kwargs_handlers=handlers,
            **plugins,
        )
        state = self.accelerator.state
        self.context = Distributed(state.process_index, state.num_processes, state.local_process_index, state.device)
        self.trainable_file: str | None = None
        self.accelerator.register_save_state_pre_hook(self._save_trainable)
        self.accelerator.register_load_state_pre_hook(self._load_trainable)

    def prepare(self, model, optimizer, scheduler) -> None:
        """The model and optimizer wrapped for the strategy; the schedule steps once per global step, here."""
        if self.settings.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.module, self.scheduler = model, scheduler
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.register_for_checkpointing(scheduler)

    @property
    def loss_scale(self) -> int:
        """What undoes the averaging the strategy does: over the processes (each loss is already a fraction of the
        global batch), and DeepSpeed's over its gradient accumulation steps."""
        return self.context.world_size * (self.accumulation if self.strategy == "deepspeed" else 1)

    def train_step(self, micro_batches: list[MicroBatch], items: torch.Tensor) -> torch.Tensor:
        """One optimizer step over this process's micro-batches of a global batch."""
        total = torch.zeros((), device=self.context.device)
        for position, micro in enumerate(micro_batches):
            last = position == len(micro_batches) - 1
            self.accelerator.sync_gradients = last  # DeepSpeed steps at this boundary, DDP and FSDP sync there
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                loss = self.model(**micro.inputs, num_items_in_batch=items).loss * micro.weight
                self.accelerator.backward(loss * self.loss_scale)
            total += loss.detach().float()
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def save_model(self, folder: Path | None, **kwargs) -> None:
        """The whole model (the adapter, for LoRA) in transformers' layout; under ZeRO-3 and FSDP every process
        joins the gather, the main process writes."""
        weights = self.accelerator.get_state_dict(self.model)
        if self.context.is_main:
            self.accelerator.unwrap_model(self.model).save_pretrained(folder, state_dict=weights, **kwargs)

    def save_state(self, folder: Path, trainable_file: str | None = None) -> None:
        """accelerate's state of the run in ``folder`` (every process takes part): optimizer, schedule, gradient
        scaler, each process's random state; DeepSpeed's and FSDP's shards. Of the weights, only the trainable
        ones, in ``trainable_file``, where the run's checkpoint does not hold them (None: it does)."""
        self.trainable_file = trainable_file
        kwargs = {"exclude_frozen_parameters": True} if self.strategy == "deepspeed" else {}
        self.accelerator.save_state(str(folder), **kwargs)

    def load_state(self, folder: Path, trainable_file: str | None = None) -> None:
        if not folder.is_dir():
            raise XmasError(f"{folder} is missing: the run's training state (optimizer, schedule, random states)")
        self.trainable_file = trainable_file
        kwargs = {"load_module_strict": False} if self.strategy == "deepspeed" else {}
        try:
            self.accelerator.load_state(str(folder), **kwargs)
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as error:
            raise XmasError(
                f"{folder} cannot be resumed with strategy {self.strategy}: {error}; it was saved by another "
                "(keep deepspeed and fsdp as they were), or train again from the start"
            ) from None

    def _save_trainable(self, models, weights: list, folder: str) -> None:
        """(DDP's path: DeepSpeed and FSDP keep their shards of the weights in their own files.)"""
        weights.clear()  # the checkpoint holds the whole model, or only what trains is kept, here
        if self.trainable_file and self.strategy == "ddp" and self.context.is_main:
            trainable = {name: p.detach().cpu() for name, p in self.module.named_parameters() if p.requires_grad}
            torch.save(trainable, Path(folder) / self.trainable_file)

    def _load_trainable(self, models, folder: str) -> None:
        models.clear()  # the weights came with the checkpoint, or come from the trainable file, here
        if self.trainable_file and self.strategy == "ddp":
            parameters = dict(self.module.named_parameters())
            with torch.no_grad():
                for name, value in load_torch(Path(folder) / self.trainable_file).items():
                    parameters[name].copy_(value)

    def close(self) -> None:
        self.accelerator.state.destroy_process_group()  # a no-op where none was started
        for name in self.own_environment:
            os.environ.pop(name, None)


@contextlib.contextmanager
def training(settings, model_config=None) -> Iterator[Training]:
    """The stage's :class:`Training`; its process group ends with the block."""
    run = Training(settings, model_config)
    try:
        yield run
    finally:
        run.close()


def process_group_environment() -> list[str]:
    """DeepSpeed and FSDP need a process group even for one process: one of its own when no launcher started
    this one (as ``torchrun --standalone`` would set it up). Returns the variables it set."""
    if "LOCAL_RANK" in os.environ:
        return []
    own = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    own = {name: value for name, value in own.items() if name not in os.environ}
    if "MASTER_PORT" not in os.environ:
        own["MASTER_PORT"] = str(free_port())
    os.environ.update(own)
    return list(own)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward; non-reentrant, so a frozen vision tower's inputs need no grad."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


# ----------------------------------------------------------------------------------- DeepSpeed and FSDP


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise XmasError('training.deepspeed is set but DeepSpeed is not installed: pip install -e ".[gpu]"') from None
    return deepspeed


def accumulation_steps(settings, world_size: int) -> int:
    """Micro-batches per global step on each process (:func:`xmas.training.loop.rank_micro_batches`)."""
    per_rank = math.ceil(settings.batch_size / world_size)
    return max(1, math.ceil(per_rank / (settings.micro_batch_size or per_rank)))


def deepspeed_config(settings, world_size: int, hidden_size: int | None = None) -> dict:
    """``settings.deepspeed``, a shipped preset (zero2, zero3) or a JSON file, with the "auto" values accelerate
    cannot fill filled: the micro-batch size and accumulation steps (accelerate reads them off a DataLoader, and
    the data order here is ours) and ZeRO-3's bucket sizes (accelerate reads the hidden size off the top-level
    config, which a VLM's is not: its language model's is). accelerate fills the rest."""
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
    filled = {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size or per_rank,
        "gradient_accumulation_steps": accumulation_steps(settings, world_size),
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    zero = config.setdefault("zero_optimization", {})
    if hidden_size is not None:
        derived = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        for key, value in derived.items():
            if zero.get(key) == "auto":
                zero[key] = value
    unfillable = [f"zero_optimization.{key}" for key in BUCKET_KEYS if zero.get(key) == "auto"]
    if unfillable:
        raise XmasError(f"{path}: cannot fill 'auto' for {', '.join(unfillable)}; set numbers there")
    return config


BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def deepspeed_plugin(settings, accumulation: int, model_config=None):
    """accelerate's DeepSpeed plugin: ZeRO-3 partitions the model as it loads (zero.Init, through transformers)."""
    from accelerate.utils import DeepSpeedPlugin

    world_size = context_from_environment().world_size
    config = deepspeed_config(settings, world_size, hidden_size_of(model_config))
    return DeepSpeedPlugin(
        hf_ds_config=config,
        gradient_accumulation_steps=accumulation,
        gradient_clipping=settings.max_grad_norm,
        zero3_init_flag=config["zero_optimization"].get("stage") == 3,
    )


def fsdp_plugin(settings):
    """accelerate's FSDP (version 2) plugin: every decoder and vision layer its own shard unit (the model's
    ``_no_split_modules``, which accelerate reads), parameters resharded after the forward (``full_shard``) or
    kept until the backward (``shard_grad_op``); activation checkpointing by FSDP's own wrapper."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=settings.fsdp == "full_shard",
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="SHARDED_STATE_DICT",
        activation_checkpointing=settings.gradient_checkpointing,
        cpu_ram_efficient_loading=False,
    )


def hidden_size_of(model_config) -> int | None:
    """The language model's hidden size (DeepSpeed derives its ZeRO-3 bucket sizes from it)."""
    return getattr(getattr(model_config, "text_config", model_config), "hidden_size", None)


def parameter_count(parameters) -> int:
    """Elements of the parameters, whole even where ZeRO-3 keeps only this process's partition."""
    return sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in parameters)


def parameters_held(parameters) -> int:
    """Elements this process holds: its partition of a ZeRO-3 parameter, all of any other."""
    return sum(
        parameter.ds_tensor.numel() if hasattr(parameter, "ds_tensor") else parameter.numel()
        for parameter in parameters
    )
