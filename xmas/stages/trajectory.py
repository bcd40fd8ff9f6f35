"""Rule ``trajectory``: one (checkpoint, shard) job: the top-k singular values of every image example's attention block.

Work is cut into chunks; each finished chunk is written atomically as a part file next to the
output, so a killed job resumes where it stopped. The shard file is written at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from xmas.data.examples import shard_slice, usable_image_examples
from xmas.data.sources import Source, as_source, stage_source
from xmas.errors import XmasError
from xmas.extraction import extract_chunk, fingerprint, write_in_parts
from xmas.methods import SIGNALS
from xmas.models.attention import CrossModalAttention, capture_output, top_singular_values
from xmas.models.checkpoints import load_checkpoint, load_processor
from xmas.models.encoding import IGNORE_INDEX, ConversationEncoder
from xmas.models.image_tokens import ImageTokens
from xmas.models.upstream_attention import UpstreamAttention, lowrank_singular_values
from xmas.progress import StageStats, add_input_arguments, add_threads_argument, use_threads
from xmas.settings import add_settings, settings_of
from xmas.training.engine import compute_device, resolve_dtype

log = logging.getLogger(__name__)


def trajectory_schema(columns: list[str]) -> pa.Schema:
    return pa.schema([("uid", pa.string()), ("checkpoint", pa.int32()), *[(name, pa.float32()) for name in columns]])


def trajectory_table(uids: np.ndarray, checkpoint: int, columns: list[str], values: np.ndarray) -> pa.Table:
    """Rows of one checkpoint; every part and shard file, empty or not, has the same schema and metadata."""
    frame = pd.DataFrame({"uid": uids, "checkpoint": np.full(len(uids), checkpoint, dtype=np.int32)})
    for position, column in enumerate(columns):
        frame[column] = values[:, position].astype(np.float32)
    return pa.Table.from_pandas(frame, schema=trajectory_schema(columns), preserve_index=False)


def check_top_k(model_path: Path, settings, signal: str) -> None:
    """At most as many singular values as an image can have tokens (the columns of an attention block).
    Where the count depends on the image's size, a record with fewer gets zeros for the missing values,
    as one with fewer text rows does."""
    if signal != "attention":
        return
    image_tokens = ImageTokens(load_processor(model_path)).most()
    if settings.top_k > image_tokens:
        raise XmasError(
            f"trajectory.top_k is {settings.top_k}, but an image of the proxy {model_path} has at most "
            f"{image_tokens} image tokens, so at most {image_tokens} singular values exist; set "
            f"trajectory.top_k to {image_tokens} or less"
        )


def parse_layers(value: str) -> list[int] | None:
    if value == "all":
        return None
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise XmasError(f"--layers must be 'all' or a comma-separated list of layer numbers, got {value!r}") from None


def singular_value_columns(top_k: int) -> list[str]:
    return [f"sv{k}" for k in range(1, top_k + 1)]


class SingularValues:
    """The attention signal: top-k singular values of each record's text-to-image attention block."""

    def __init__(self, attention: CrossModalAttention, encoder: ConversationEncoder, top_k: int):
        self.attention, self.encoder, self.top_k = attention, encoder, top_k
        self.columns = singular_value_columns(top_k)

    def __call__(self, records: list[dict]) -> np.ndarray:
        blocks, _ = self.attention.blocks(self.encoder(records, with_labels=False))
        return top_singular_values(blocks, self.top_k).cpu().numpy()


class UpstreamSingularValues(SingularValues):
    """The attention signal as the paper's code defines it (xmas.models.upstream_attention)."""

    def __call__(self, records: list[dict]) -> np.ndarray:
        blocks, positions = self.attention.blocks(self.encoder(records, with_labels=False))
        return lowrank_singular_values(blocks, positions, self.top_k).numpy()


class ExampleLoss:
    """The loss baseline's signal: each record's mean token loss over its assistant turns (0 if none is left).

    The language-model head runs on the labelled positions only, so a large vocabulary costs little.
    """

    columns = ["loss"]

    def __init__(self, model, encoder: ConversationEncoder):
        self.model, self.encoder = model, encoder

    @torch.no_grad()
    def __call__(self, records: list[dict]) -> np.ndarray:
        batch = self.encoder(records, with_labels=True)
        labels = batch.pop("labels")
        hidden = self.model.model(**batch).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        counted = targets != IGNORE_INDEX
        logits = self.model.lm_head(hidden[counted]).float()
        token_loss = torch.nn.functional.cross_entropy(logits, targets[counted], reduction="none")
        rows = torch.arange(len(records), device=labels.device)[:, None].expand_as(targets)[counted]
        total = torch.zeros(len(records), device=labels.device).index_add_(0, rows, token_loss)
        return (total / counted.sum(dim=1).clamp(min=1)).cpu().numpy()[:, None]


def load_signal(model_path: Path, image_root: Path | None, settings, signal: str, device: torch.device):
    """The checkpoint in the extraction dtype, wrapped as the signal asked for, as the settings define it."""
    dtype = resolve_dtype(settings.dtype)
    model, processor = load_checkpoint(model_path, dtype=dtype)
    model.to(device).eval()
    encoder = ConversationEncoder.of_checkpoint(model_path, processor, image_root, device)
    if signal == "loss":
        return ExampleLoss(model, encoder)
    layers = parse_layers(settings.layers)
    if settings.definition == "upstream":
        return UpstreamSingularValues(UpstreamAttention(model, layers, settings.layer_reduce), encoder, settings.top_k)
    output = capture_output(settings.attn_implementation, device, dtype, encoder.family)
    attention = CrossModalAttention(model, layers, settings.head_reduce, settings.layer_reduce, output=output)
    return SingularValues(attention, encoder, settings.top_k)


def extract_shard(
    model_path: Path,
    checkpoint: int,
    shard: pd.DataFrame,
    source: Source | Path,
    image_root: Path | None,
    out: Path,
    settings,
    signal: str,
    stats: StageStats,
) -> None:
    """One shard's rows of ``signal`` (attention or loss) at checkpoint ``checkpoint``, the trajectory stage's
    ``settings`` defining it."""
    check_top_k(model_path, settings, signal)
    columns = signal_columns(settings, signal)

    def load():
        values_of = load_signal(model_path, image_root, settings, signal, compute_device())

        def compute(chunk: pd.DataFrame) -> pa.Table:
            lengths = chunk["tokens"].tolist() if settings.group_by_length else None
            with as_source(source).reader(chunk) as records:
                values = extract_chunk(values_of, records[:], settings.batch_size, lengths)
            return trajectory_table(chunk["uid"].to_numpy(), checkpoint, columns, values)

        return compute

    computed = {key: value for key, value in dataclasses.asdict(settings).items() if key not in NOT_FINGERPRINTED}
    current = fingerprint(model_path, shard, checkpoint=checkpoint, **computed, signal=signal)
    empty = trajectory_table(np.array([], dtype=str), checkpoint, columns, np.zeros((0, len(columns))))
    write_in_parts(shard, out, current, settings.chunk_size, load, empty, stats, f"checkpoint {checkpoint} chunks")


def signal_columns(settings, signal: str) -> list[str]:
    if signal == "loss":
        return ExampleLoss.columns
    return singular_value_columns(settings.top_k)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="proxy checkpoint folder")
    parser.add_argument("--checkpoint", required=True, type=int, help="checkpoint number written into the rows")
    parser.add_argument("--shard", required=True, type=int, help="which shard (0-based)")
    add_input_arguments(parser, "examples", "annotations", "image_root")
    parser.add_argument("--out", required=True, type=Path, help="shard parquet to write")
    parser.add_argument(
        "--signal",
        choices=SIGNALS,
        default="attention",
        help="attention: top-k singular values of the text-to-image attention (XMAS); "
        "loss: each example's mean loss on its answers (the loss baseline)",
    )
    add_threads_argument(parser)
    add_settings(parser, "trajectory")


# Where the work is cut: a part file written under another shard count is still good.
NOT_FINGERPRINTED = ("shards",)


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    stats = StageStats(f"trajectory checkpoint {args.checkpoint} shard {args.shard}")
    settings = settings_of(args, "trajectory")
    shard = shard_slice(usable_image_examples(args.examples), args.shard, args.shards)
    extract_shard(
        args.model,
        args.checkpoint,
        shard,
        stage_source(args.annotations, settings),
        args.image_root,
        args.out,
        settings,
        args.signal,
        stats,
    )
    stats.finish(args.stats)
