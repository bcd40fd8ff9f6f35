"""One (checkpoint, shard) job: the top-k singular values of every image example's attention block.

Work is cut into chunks; each finished chunk is written atomically as a part file next to the
output, so a killed job resumes where it stopped. The shard file is written at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from xmas.annotations import SPAN_COLUMNS, SourceRecords, read_examples
from xmas.attention import CrossModalAttention, top_singular_values
from xmas.encoding import ConversationEncoder
from xmas.errors import XmasError
from xmas.io import write_json, write_parquet
from xmas.proxy import compute_device, load_checkpoint
from xmas.stage import StageStats, add_input_arguments, progress


def trajectory_schema(top_k: int) -> pa.Schema:
    return pa.schema([("uid", pa.string()), ("checkpoint", pa.int32()),
                      *[(f"sv{i}", pa.float32()) for i in range(1, top_k + 1)]])


def usable_image_examples(examples: Path) -> pd.DataFrame:
    table = read_examples(examples, ["uid", "index", "has_image", "status", *SPAN_COLUMNS])
    return table[(table.status == "ok") & table.has_image].sort_values("index")


def shard_slice(usable: pd.DataFrame, shard: int, shards: int) -> pd.DataFrame:
    """Block ``shard`` of ``shards`` contiguous blocks of the usable image examples (source order)."""
    if not 0 <= shard < shards:
        raise XmasError(f"--shard must be in 0..{shards - 1}, got {shard}")
    bounds = np.linspace(0, len(usable), shards + 1).round().astype(int)
    return usable.iloc[bounds[shard] : bounds[shard + 1]]


def parse_layers(value: str) -> list[int] | None:
    if value == "all":
        return None
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise XmasError(f"--layers must be 'all' or a comma-separated list of layer numbers, got {value!r}") from None


def fingerprint(model_path: Path, checkpoint: int, shard: pd.DataFrame, settings: dict) -> dict:
    """What the part files depend on: a part written under another fingerprint is not reused."""
    model_files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(model_path).iterdir() if f.is_file())
    uids = hashlib.sha256("\n".join(shard["uid"]).encode()).hexdigest()
    return {"model": str(model_path), "model_files": model_files, "checkpoint": checkpoint, "uids": uids, **settings}


def reset_stale_parts(parts: Path, current: dict) -> None:
    marker = parts / "fingerprint.json"
    if parts.exists() and (not marker.exists() or json.loads(marker.read_text()) != json.loads(json.dumps(current))):
        shutil.rmtree(parts)
    if not parts.exists():
        parts.mkdir(parents=True)
        write_json(current, marker)


def extract_chunk(attention: CrossModalAttention, encoder: ConversationEncoder, records: list[dict],
                  batch_size: int, top_k: int) -> np.ndarray:
    values = []
    for start in range(0, len(records), batch_size):
        blocks, _ = attention.blocks(encoder(records[start : start + batch_size], with_labels=False))
        values.append(top_singular_values(blocks, top_k).cpu().numpy())
    return np.concatenate(values).astype(np.float32)


def extract_shard(model_path: Path, checkpoint: int, shard: pd.DataFrame, annotations: Path, image_root: Path,
                  out: Path, settings: dict, stats: StageStats) -> None:
    parts = out.with_name(out.name + ".parts")
    reset_stale_parts(parts, fingerprint(model_path, checkpoint, shard, settings))
    chunk_size, top_k = settings["chunk_size"], settings["top_k"]
    chunks = [shard.iloc[i : i + chunk_size] for i in range(0, len(shard), chunk_size)]
    todo = [(n, chunk) for n, chunk in enumerate(chunks) if not (parts / f"part-{n:05d}.parquet").exists()]
    stats.add("in", len(shard))
    stats.add("resumed_rows", len(shard) - sum(len(chunk) for _, chunk in todo))
    if todo:
        device = compute_device()
        model, processor = load_checkpoint(model_path)
        model.to(device).eval()
        attention = CrossModalAttention(model, settings["layers"], settings["head_reduce"], settings["layer_reduce"])
        encoder = ConversationEncoder(processor, image_root, settings["max_length"], device)
        for n, chunk in progress(todo, total=len(todo), desc=f"checkpoint {checkpoint} chunks", unit="chunk"):
            with SourceRecords(annotations, chunk) as records:
                values = extract_chunk(attention, encoder, records[:], settings["batch_size"], top_k)
            frame = pd.DataFrame({"uid": chunk["uid"].to_numpy(), "checkpoint": np.int32(checkpoint)})
            for k in range(top_k):
                frame[f"sv{k + 1}"] = values[:, k]
            write_parquet(pa.Table.from_pandas(frame, schema=trajectory_schema(top_k), preserve_index=False),
                          parts / f"part-{n:05d}.parquet")
            stats.add("computed_rows", len(chunk))
    tables = [pq.read_table(parts / f"part-{n:05d}.parquet") for n in range(len(chunks))]
    merged = pa.concat_tables(tables) if tables else trajectory_schema(top_k).empty_table()
    write_parquet(merged, out)
    stats.add("out", merged.num_rows)
    shutil.rmtree(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="proxy checkpoint folder")
    parser.add_argument("--checkpoint", required=True, type=int, help="checkpoint number written into the rows")
    parser.add_argument("--shard", required=True, type=int, help="which shard (0-based)")
    parser.add_argument("--shards", required=True, type=int, help="number of shards")
    add_input_arguments(parser, "examples", "annotations", "image_root")
    parser.add_argument("--out", required=True, type=Path, help="shard parquet to write")
    parser.add_argument("--top-k", type=int, default=5, help="singular values kept per checkpoint (default 5)")
    parser.add_argument("--layers", default="all", help="'all' or comma-separated decoder layers, e.g. 0,5,11")
    parser.add_argument("--head-reduce", choices=("sum", "mean"), default="sum", help="how heads combine")
    parser.add_argument("--layer-reduce", choices=("sum", "mean"), default="sum", help="how layers combine")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=256, help="examples per resumable part file")
    parser.add_argument("--max-length", type=int, default=None, help="truncate longer conversations (tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = StageStats(f"trajectory checkpoint {args.checkpoint} shard {args.shard}")
    settings = {"layers": parse_layers(args.layers), "head_reduce": args.head_reduce, "layer_reduce": args.layer_reduce,
                "batch_size": args.batch_size, "chunk_size": args.chunk_size, "top_k": args.top_k,
                "max_length": args.max_length}
    shard = shard_slice(usable_image_examples(args.examples), args.shard, args.shards)
    extract_shard(args.model, args.checkpoint, shard, args.annotations, args.image_root, args.out, settings, stats)
    stats.finish(args.stats)
