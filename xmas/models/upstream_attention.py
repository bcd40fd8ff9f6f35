"""The cross-modal attention as the paper's code computes it (``trajectory.definition: upstream``).

Per selected decoder layer, from the outputs of ``q_proj`` and ``k_proj`` (before the rotary
embedding), every head concatenated into one vector per token (key heads repeated to the query
heads where the model shares them), in half precision:

    A = softmax(K · Qᵀ / √(H·d))   over the example's tokens, with no causal mask,

rows = text tokens, columns = image tokens, summed (or averaged) over layers; the top-k singular
values come from ``torch.svd_lowrank`` with q = k, seeded so that reruns are identical. Padding
never enters the softmax or the SVD, so an example's values do not depend on its batch (the
paper's code lets it in; that is the one difference kept).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from xmas.errors import XmasError
from xmas.models.attention import REDUCTIONS, Positions, one_cpu_thread, selected_attentions

HALF = torch.float16
LOWRANK_SEED = 0


def upstream_block(
    query: torch.Tensor, key: torch.Tensor, heads: int, tokens: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """One example's (text rows × image columns) block of softmax(K·Qᵀ/√(H·d)) over its ``tokens``.

    ``query`` (S, H·d) and ``key`` (S, H_kv·d) are one layer's projections of the example's S positions.
    """
    head_dim = query.shape[-1] // heads
    kv_heads = key.shape[-1] // head_dim
    key = key.view(-1, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=1).reshape(key.shape[0], -1)
    query, key = query[tokens].to(HALF), key[tokens].to(HALF)
    probabilities = (key @ query.T / math.sqrt(heads * head_dim)).softmax(dim=-1)
    position = torch.full((int(tokens.max()) + 1,), -1, dtype=torch.long, device=tokens.device)
    position[tokens] = torch.arange(len(tokens), device=tokens.device)
    return probabilities[position[rows]][:, position[cols]].float()


class UpstreamAttention:
    """Sum (or mean) over layers of the upstream text × image block of each example of a batch."""

    def __init__(self, model, layers: list[int] | None = None, layer_reduce: str = "sum"):
        if layer_reduce not in REDUCTIONS:
            raise XmasError(f"layer_reduce must be one of {REDUCTIONS}")
        self.model, self.layer_reduce = model, layer_reduce
        self.attentions = [attention for _, attention in selected_attentions(model, layers)]
        self.heads = model.config.text_config.num_attention_heads
        self.image_token_id = model.config.image_token_id

    @contextlib.contextmanager
    def _projections(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Each selected layer's q_proj and k_proj outputs during the forward pass inside the block."""
        kept = [{} for _ in self.attentions]
        hooks = []
        for store, attention in zip(kept, self.attentions):
            for name in ("q_proj", "k_proj"):

                def keep(_module, _inputs, output, store=store, name=name):
                    store[name] = output.detach()

                hooks.append(getattr(attention, name).register_forward_hook(keep))
        try:
            yield kept
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def blocks(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Positions]:
        positions = Positions.find(batch["input_ids"], batch["attention_mask"], self.image_token_id)
        with self._projections() as kept:
            self.model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1)
        total = torch.zeros(positions.rows.shape + positions.cols.shape[1:], device=positions.rows.device)
        for example in range(len(total)):
            rows = positions.rows[example][positions.row_valid[example]]
            cols = positions.cols[example][positions.col_valid[example]]
            if not len(rows) or not len(cols):
                continue
            tokens = batch["attention_mask"][example].nonzero().squeeze(1)
            for layer in kept:
                block = upstream_block(
                    layer["q_proj"][example], layer["k_proj"][example], self.heads, tokens, rows, cols
                )
                total[example, : len(rows), : len(cols)] += block
        if self.layer_reduce == "mean":
            total /= len(self.attentions)
        return total, positions


def lowrank_singular_values(blocks: torch.Tensor, positions: Positions, k: int) -> torch.Tensor:
    """Top-k singular values of each example's block by ``torch.svd_lowrank`` (q = k), seeded."""
    values = torch.zeros(len(blocks), k)
    with one_cpu_thread(blocks.device), torch.random.fork_rng(devices=[]):
        for example, block in enumerate(blocks):
            rows, cols = int(positions.row_valid[example].sum()), int(positions.col_valid[example].sum())
            if not rows or not cols:
                continue
            torch.manual_seed(LOWRANK_SEED)
            q = min(k, rows, cols)
            _, singular, _ = torch.svd_lowrank(block[:rows, :cols].float(), q=q)
            values[example, :q] = singular.cpu()
    return values
