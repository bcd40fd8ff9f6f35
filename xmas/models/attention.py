"""Text-to-image attention probabilities captured inside the model's own forward pass.

A function registered with transformers' ``AttentionInterface`` runs the normal SDPA
attention for the layer's output and, for the language model's selected layers only, computes
softmax(q·kᵀ·scale + mask) in float32 for the text rows (post-rotary q and k, the model's own
causal and padding mask) and keeps the image columns. Full attention matrices are never
materialised, and the vision tower is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from xmas.errors import XmasError
from xmas.models.recipe import language_model
from xmas.training.engine import attention_implementation

IMPLEMENTATION = "xmas_capture"
REDUCTIONS = ("sum", "mean")
OUTPUTS = ("sdpa", "flash_attention_2")


@dataclasses.dataclass
class Positions:
    """Per example of a batch: text-row and image-column positions, padded to rectangles."""

    rows: torch.Tensor  # (B, T) long, padded with 0
    row_valid: torch.Tensor  # (B, T) bool
    cols: torch.Tensor  # (B, I) long, padded with 0
    col_valid: torch.Tensor  # (B, I) bool

    @classmethod
    def find(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> Positions:
        """Image columns are where ``input_ids`` is the image token; text rows are the real tokens after them."""
        is_image = input_ids == image_token_id
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_image = torch.where(is_image, positions, -1).amax(dim=1, keepdim=True)
        is_text = (positions > last_image) & attention_mask.bool() & is_image.any(dim=1, keepdim=True)
        rows, row_valid = _pack(is_text)
        cols, col_valid = _pack(is_image)
        return cls(rows, row_valid, cols, col_valid)


def _pack(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, left-aligned and padded with 0, plus a validity mask."""
    counts = selected.sum(dim=1)
    width = max(int(counts.max()), 1)
    order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=selected.device)[None, :] < counts[:, None]
    return torch.where(valid, order, 0), valid


class _Capture:
    def __init__(
        self,
        layers: dict[torch.nn.Module, int],
        positions: Positions,
        head_reduce: str,
        output: str = "sdpa",
        padding_mask: torch.Tensor | None = None,
    ):
        self.layers = layers
        self.output, self.padding_mask = output, padding_mask
        self.positions = positions
        self.head_reduce = head_reduce
        batch, rows, cols = positions.rows.shape[0], positions.rows.shape[1], positions.cols.shape[1]
        self.total = torch.zeros(batch, rows, cols, dtype=torch.float32, device=positions.rows.device)
        self.seen: set[int] = set()

    def record(self, module, query, key, attention_mask, scaling: float) -> None:
        """Add this layer's text-row x image-column probabilities. Keys serve their group of query heads (GQA)
        without a copy per head; the mask goes in in place."""
        rows, cols = self.positions.rows, self.positions.cols
        batch, heads, head_dim = query.shape[0], query.shape[1], query.shape[3]
        groups = key.shape[1]
        query_rows = query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, head_dim)).float() * scaling
        grouped = query_rows.view(batch, groups, heads // groups, rows.shape[1], head_dim)
        scores = (grouped @ key.float()[:, :, None].transpose(-1, -2)).flatten(1, 2)  # (B, H, T, L)
        if attention_mask is not None:
            index = rows[:, None, :, None].expand(-1, attention_mask.shape[1], -1, attention_mask.shape[-1])
            mask_rows = attention_mask.gather(2, index)
            if mask_rows.dtype == torch.bool:
                scores.masked_fill_(~mask_rows, float("-inf"))
            else:
                scores += mask_rows.float()
        probabilities = scores.softmax(dim=-1)
        block = probabilities.gather(3, cols[:, None, None, :].expand(-1, heads, rows.shape[1], -1))
        block = block.sum(dim=1) if self.head_reduce == "sum" else block.mean(dim=1)
        self.total += block
        self.seen.add(self.layers[module])


_ACTIVE: list[_Capture] = []


def capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Registered attention function: SDPA for the output, plus the capture for selected layers."""
    if _ACTIVE and module in _ACTIVE[-1].layers:
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise XmasError("attention soft-capping / sinks are not supported by the trajectory capture")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        _ACTIVE[-1].record(module, query, key, attention_mask, scale)
    if _ACTIVE and _ACTIVE[-1].output == "flash_attention_2":
        return flash_output(module, query, key, value, _ACTIVE[-1].padding_mask, dropout, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def flash_output(module, query, key, value, padding_mask, dropout, scaling):
    """The layer output from flash-attn 2 (varlen over the batch's 2-D padding mask), causal."""
    from transformers.modeling_flash_attention_utils import _flash_attention_forward

    output = _flash_attention_forward(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        padding_mask,
        query_length=query.shape[2],
        is_causal=True,
        dropout=dropout,
        softmax_scale=scaling,
        target_dtype=query.dtype if query.dtype != torch.float32 else torch.bfloat16,
        attn_implementation="flash_attention_2",
    )
    return output.to(query.dtype), None


def materialised_mask(*args, **kwargs):
    """SDPA's boolean mask, but always built: the capture needs the mask even where SDPA could skip it."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, capture_attention)
AttentionMaskInterface.register(IMPLEMENTATION, materialised_mask)


def selected_attentions(model, layers: list[int] | None) -> list[tuple[int, torch.nn.Module]]:
    """(number, self-attention module) of the chosen decoder layers of the language model (None: all)."""
    decoder_layers = language_model(model).layers
    chosen = range(len(decoder_layers)) if layers is None else layers
    for layer in chosen:
        if not 0 <= layer < len(decoder_layers):
            raise XmasError(f"layer {layer} does not exist: the proxy has {len(decoder_layers)} decoder layers")
    return [(layer, decoder_layers[layer].self_attn) for layer in chosen]


class CrossModalAttention:
    """Sum (or mean) over heads and layers of the text-row × image-column attention of a batch."""

    def __init__(
        self,
        model,
        layers: list[int] | None = None,
        head_reduce: str = "sum",
        layer_reduce: str = "sum",
        output: str = "sdpa",
    ):
        if head_reduce not in REDUCTIONS or layer_reduce not in REDUCTIONS:
            raise XmasError(f"head_reduce/layer_reduce must be one of {REDUCTIONS}")
        if output not in OUTPUTS:
            raise XmasError(f"attention output {output!r}: use one of {', '.join(OUTPUTS)}")
        if output == "flash_attention_2" and model.device.type != "cuda":
            raise XmasError(f"flash_attention_2 needs the model on a CUDA device, it is on {model.device}")
        self.output = output
        self.model = model
        self.layers = {attention: i for i, attention in selected_attentions(model, layers)}
        self.head_reduce, self.layer_reduce = head_reduce, layer_reduce
        self.image_token_id = model.config.image_token_id
        model.set_attn_implementation({"text_config": IMPLEMENTATION})

    @contextlib.contextmanager
    def _active(self, capture: _Capture) -> Iterator[None]:
        _ACTIVE.append(capture)
        try:
            yield
        finally:
            _ACTIVE.pop()

    @torch.no_grad()
    def blocks(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Positions]:
        """Run the model on ``batch``; return the (B, T, I) blocks, zero outside each example's rows/columns."""
        positions = Positions.find(batch["input_ids"], batch["attention_mask"], self.image_token_id)
        capture = _Capture(self.layers, positions, self.head_reduce, self.output, batch["attention_mask"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with self._active(capture):
            self.model(**inputs, logits_to_keep=1)
        if len(capture.seen) != len(self.layers):
            raise XmasError(
                f"attention capture saw {len(capture.seen)} of {len(self.layers)} layers; "
                "the model does not dispatch through transformers' AttentionInterface"
            )
        total = capture.total / len(self.layers) if self.layer_reduce == "mean" else capture.total
        valid = positions.row_valid[:, :, None] & positions.col_valid[:, None, :]
        return torch.where(valid, total, 0.0), positions


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run LAPACK single-threaded on a CPU: MKL's threaded SVD of these small matrices stalls when the
    cores are shared (measured on 2 busy cores: 16.6 s with 2 threads, 0.08 s with 1, for 2x512x576)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def top_singular_values(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k singular values in float32; zero padding adds only zero singular values."""
    with one_cpu_thread(blocks.device):
        values = torch.linalg.svdvals(blocks.float())
    if values.shape[1] < k:
        values = torch.nn.functional.pad(values, (0, k - values.shape[1]))
    return values[:, :k]


def capture_output(requested: str, device: torch.device, dtype: torch.dtype, family=None) -> str:
    """sdpa or flash_attention_2 for the layer outputs (the captured probabilities never use either); sdpa for a
    ``family`` flash-attn cannot run."""
    if requested == "eager":
        raise XmasError(
            "trajectory attn_implementation eager: the capture replaces eager attention; "
            "use auto, sdpa or flash_attention_2"
        )
    chosen = attention_implementation(requested, device, family)
    if chosen == "flash_attention_2" and requested == "auto" and dtype == torch.float32:
        return "sdpa"  # flash-attn computes in half precision only; float32 weights keep SDPA
    return chosen
