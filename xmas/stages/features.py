"""Rule ``features``: one shard of a reference VLM's features of the usable image records, what COINCIDE and
SemDeDup select by (``results/features/shard-<s>.parquet``; resumable, as the trajectory jobs).

One forward pass per batch gives both:

- ``coincide``: as its authors' ``extract_embed.py`` computes it, for each chosen decoder layer the inputs
  of its attention output projection (``o_proj``), averaged over the record's image tokens and over its
  text after the last image, each through tanh and L2-normalised, layer after layer, the whole divided by
  sqrt(2 x layers) (a unit vector); their LLaVA-665k setting takes layers 3, 7, 11, 15 and 19;
- ``semdedup``: the language model's last hidden state at the record's last real token, L2-normalised.

Both are stored in float16, as COINCIDE stores its features.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from xmas.data.examples import shard_slice, usable_image_examples
from xmas.data.sources import Source, as_source, stage_source
from xmas.extraction import extract_chunk, fingerprint, write_in_parts
from xmas.methods import FEATURES
from xmas.models.attention import selected_attentions
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder
from xmas.progress import StageStats, add_input_arguments, add_threads_argument, use_threads
from xmas.selection.vectors import METADATA, vector_column
from xmas.settings import add_settings, settings_of
from xmas.training.engine import compute_device, resolve_dtype


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, D) mean of ``values`` (B, T, D) over the positions ``mask`` (B, T) marks; 0 where none."""
    weights = mask.to(values.dtype)
    return (values * weights[:, :, None]).sum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1)


class ReferenceFeatures:
    """Both features of a batch of records (see the module's description), from one forward pass."""

    def __init__(self, model, encoder: ConversationEncoder, layers: list[int]):
        self.model, self.encoder = model, encoder
        self.projections = [attention.o_proj for _, attention in selected_attentions(model, layers)]
        self.image_token_id = model.config.image_token_id

    @torch.no_grad()
    def __call__(self, records: list[dict]) -> np.ndarray:
        batch = self.encoder(records, with_labels=False)
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        is_image = ids == self.image_token_id
        index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        is_text = (index > torch.where(is_image, index, -1).amax(dim=1, keepdim=True)) & real
        parts: list[torch.Tensor] = []

        def pool(module, args) -> None:  # reduced at once: a layer's inputs are never all kept
            for mask in (is_image, is_text):
                parts.append(torch.nn.functional.normalize(torch.tanh(masked_mean(args[0].float(), mask)), dim=-1))

        hooks = [projection.register_forward_pre_hook(pool) for projection in self.projections]
        try:
            hidden = self.model.model(**batch).last_hidden_state.float()
        finally:
            for hook in hooks:
                hook.remove()
        coincide = torch.cat(parts, dim=-1) / np.sqrt(len(parts))
        last = real.cumsum(dim=1).argmax(dim=1)  # the last real token, whatever the padding side
        semdedup = torch.nn.functional.normalize(hidden[torch.arange(len(records)), last], dim=-1)
        return torch.cat([coincide, semdedup], dim=-1).cpu().numpy()


def feature_table(uids: np.ndarray, values: np.ndarray, widths: dict[str, int], parts: int) -> pa.Table:
    """uid and a float16 vector column per feature; the widths, and the parts (pooled layer inputs) COINCIDE's
    feature is made of, in the schema's metadata."""
    columns, start = {"uid": pa.array(uids, pa.string())}, 0
    for kind, width in widths.items():
        columns[kind] = vector_column(values[:, start : start + width], pa.float16())
        start += width
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA: json.dumps({"widths": widths, "coincide_parts": parts})})


COINCIDE_LAYERS = (3, 7, 11, 15, 19)  # their LLaVA-665k setting, on TinyLLaVA-2.0B's 24 layers


def reference_shape(model_path: Path, asked: list[int] | None) -> tuple[list[int], dict[str, int]]:
    """The layers COINCIDE's feature pools (``asked``, or by default those of COINCIDE_LAYERS the reference
    has, all of its layers if it has fewer than 4) and the widths of both features: 2 x layers x the
    attention's width, and the hidden size."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_path).get_text_config()
    depth = text.num_hidden_layers
    layers = asked or [layer for layer in COINCIDE_LAYERS if layer < depth] or list(range(depth))
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return layers, {"coincide": 2 * len(layers) * heads * head_dim, "semdedup": text.hidden_size}


def extract_features(
    model_path: Path, shard: pd.DataFrame, source: Source | Path, image_root: Path | None, out: Path, settings, stats
) -> None:
    """One shard's features (``settings``: the features stage's)."""
    layers, widths = reference_shape(model_path, settings.layers)
    parts = 2 * len(layers)

    def load():
        model, processor = load_checkpoint(model_path, dtype=resolve_dtype(settings.dtype))
        device = compute_device()
        model.to(device).eval()
        encoder = ConversationEncoder.of_checkpoint(model_path, processor, image_root, device)
        features = ReferenceFeatures(model, encoder, layers)

        def compute(chunk: pd.DataFrame) -> pa.Table:
            with as_source(source).reader(chunk) as records:
                values = extract_chunk(features, records[:], settings.batch_size, chunk["tokens"].tolist())
            return feature_table(chunk["uid"].to_numpy(), values, widths, parts)

        return compute

    computed = {key: value for key, value in dataclasses.asdict(settings).items() if key != "shards"}
    current = fingerprint(model_path, shard, **computed, features=list(FEATURES))
    empty = feature_table(np.array([], dtype=str), np.zeros((0, sum(widths.values()))), widths, parts)
    write_in_parts(shard, out, current, settings.chunk_size, load, empty, stats, "feature chunks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the reference VLM's checkpoint folder")
    parser.add_argument("--shard", required=True, type=int, help="which shard (0-based)")
    add_input_arguments(parser, "examples", "annotations", "image_root")
    parser.add_argument("--out", required=True, type=Path, help="shard parquet to write")
    add_threads_argument(parser)
    add_settings(parser, "features")


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    stats = StageStats(f"features shard {args.shard}")
    settings = settings_of(args, "features")
    shard = shard_slice(usable_image_examples(args.examples), args.shard, settings.shards)
    source = stage_source(args.annotations, settings)
    extract_features(args.model, shard, source, args.image_root, args.out, settings, stats)
    stats.finish(args.stats)
