"""Rule ``trajectory``: one (checkpoint, shard) job: the top-k singular values of every image example's attention block.

Work is cut into chunks; each finished chunk is written atomically as a part file next to the
output, so a killed job resumes where it stopped. The shard file is written at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from xmas.data.examples import shard_slice, usable_image_examples
from xmas.data.sources import Source, as_source, stage_source
from xmas.errors import XmasError
from xmas.io import damage_of, read_json, read_seal, read_table, write_json, write_parquet
from xmas.methods import SIGNALS
from xmas.models.attention import CrossModalAttention, capture_output, top_singular_values
from xmas.models.checkpoints import load_checkpoint, load_processor
from xmas.models.encoding import IGNORE_INDEX, ConversationEncoder
from xmas.models.image_tokens import ImageTokens
from xmas.models.upstream_attention import UpstreamAttention, lowrank_singular_values
from xmas.progress import StageStats, add_input_arguments, add_threads_argument, progress, use_threads
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


def fingerprint(model_path: Path, checkpoint: int, shard: pd.DataFrame, settings, signal: str) -> dict:
    """What the part files depend on: a part written under another fingerprint is not reused."""
    files = [path for path in Path(model_path).iterdir() if path.is_file()]
    model_files = sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    uids = hashlib.sha256("\n".join(shard["uid"]).encode()).hexdigest()
    computed = {key: value for key, value in dataclasses.asdict(settings).items() if key not in NOT_FINGERPRINTED}
    return {
        "model": str(model_path),
        "model_files": model_files,
        "checkpoint": checkpoint,
        "uids": uids,
        **computed,
        "signal": signal,
    }


def reset_stale_parts(parts: Path, current: dict) -> None:
    """Part files written under another fingerprint, or under one that cannot be read, are discarded."""
    marker = parts / "fingerprint.json"
    if parts.exists() and recorded_fingerprint(marker) != json.loads(json.dumps(current)):
        shutil.rmtree(parts)
    if not parts.exists():
        parts.mkdir(parents=True)
        write_json(current, marker)


def recorded_fingerprint(marker: Path) -> dict | None:
    if not marker.exists():
        return None
    try:
        return read_json(marker)
    except XmasError as error:
        log.warning("%s; the part files beside it are computed again", error)
        return None


def reusable_part(path: Path) -> bool:
    """A part file is reused only when its seal vouches for it; a damaged one is computed again."""
    if not path.exists():
        return False
    damage = damage_of(path)
    if damage is None and read_seal(path) is not None:
        return True
    log.warning("%s; computing it again", damage.what if damage else f"{path} has no seal")
    path.unlink()
    return False


def batch_positions(lengths: list[int] | None, count: int, batch_size: int) -> list[np.ndarray]:
    """Positions of each batch: in order, or (given lengths) sorted by length so batches pad little.

    The sort is stable, so equal lengths keep source order and the grouping is deterministic.
    """
    order = np.arange(count) if lengths is None else np.argsort(np.asarray(lengths), kind="stable")
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def run_batches(
    records: list[dict], batches: list[np.ndarray], compute: Callable[[list[dict]], np.ndarray]
) -> np.ndarray:
    """``compute`` on each batch of records, its rows put back at the records' positions."""
    values = None
    for positions in batches:
        rows = compute([records[i] for i in positions])
        if values is None:
            values = np.zeros((len(records), *rows.shape[1:]), dtype=np.float32)
        values[positions] = rows
    return values if values is not None else np.zeros((0,), dtype=np.float32)


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


def extract_chunk(signal, records: list[dict], batch_size: int, lengths: list[int] | None = None) -> np.ndarray:
    """The signal of every record, in the records' order whatever the batching (grouped by ``lengths``)."""
    return run_batches(records, batch_positions(lengths, len(records), batch_size), signal)


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
    output = capture_output(settings.attn_implementation, device, dtype)
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
    parts = out.with_name(out.name + ".parts")
    reset_stale_parts(parts, fingerprint(model_path, checkpoint, shard, settings, signal))
    chunk_size = settings.chunk_size
    chunks = [shard.iloc[i : i + chunk_size] for i in range(0, len(shard), chunk_size)]
    todo = [(n, chunk) for n, chunk in enumerate(chunks) if not reusable_part(parts / f"part-{n:05d}.parquet")]
    stats.add("in", len(shard))
    stats.add("resumed_rows", len(shard) - sum(len(chunk) for _, chunk in todo))
    columns = signal_columns(settings, signal)
    if todo:
        values_of = load_signal(model_path, image_root, settings, signal, compute_device())
        for n, chunk in progress(todo, total=len(todo), desc=f"checkpoint {checkpoint} chunks", unit="chunk"):
            lengths = chunk["tokens"].tolist() if settings.group_by_length else None
            with as_source(source).reader(chunk) as records:
                values = extract_chunk(values_of, records[:], settings.batch_size, lengths)
            write_parquet(
                trajectory_table(chunk["uid"].to_numpy(), checkpoint, columns, values), parts / f"part-{n:05d}.parquet"
            )
            stats.add("computed_rows", len(chunk))
    tables = [read_table(parts / f"part-{n:05d}.parquet") for n in range(len(chunks))]
    if not tables:  # no example in this shard
        tables = [trajectory_table(np.array([], dtype=str), checkpoint, columns, np.zeros((0, len(columns))))]
    merged = pa.concat_tables(tables)
    write_parquet(merged, out)
    stats.add("out", merged.num_rows)
    shutil.rmtree(parts)


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
