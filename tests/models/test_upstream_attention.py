"""trajectory.definition upstream against an independent computation of the same formula.

The reference is written from the definition, not from the capture: each layer's q and k are the
model's own q_proj and k_proj applied to that layer's normed input (the eager hidden states), the
heads side by side, softmax(K·Qᵀ/√(H·d)) over every token of the example in float32, the text rows
(after the last image token) and the image columns (the image token), summed over layers.
"""

from __future__ import annotations

import pytest
import torch

from xmas.data.annotations import read_all
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder
from xmas.models.recipe import language_model
from xmas.models.upstream_attention import UpstreamAttention, lowrank_singular_values


@pytest.fixture(scope="module")
def model_and_encoder(tiny_checkpoint, small_demo):
    model, processor = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():  # far from init, so the attention is not near-uniform
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval(), ConversationEncoder.of_checkpoint(tiny_checkpoint, processor, small_demo["images"])


@pytest.fixture(scope="module")
def records(small_demo):
    return [record for record in read_all(small_demo["train"]) if record.get("image")][:3]


@torch.no_grad()
def reference_block(model, batch) -> torch.Tensor:
    """One example (a batch of one, no padding): Σ over layers of softmax(K·Qᵀ/√(H·d))[text, image]."""
    ids = batch["input_ids"][0]
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    text = torch.arange(int(image.max()) + 1, len(ids))
    hidden = model(**batch, output_hidden_states=True).hidden_states
    config = model.config.text_config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    total = torch.zeros(len(text), len(image))
    for number, layer in enumerate(language_model(model).layers):
        normed = layer.input_layernorm(hidden[number][0])
        query = layer.self_attn.q_proj(normed)
        key = layer.self_attn.k_proj(normed).view(len(ids), kv_heads, head_dim)
        key = torch.cat([key[:, h // (heads // kv_heads)] for h in range(heads)], dim=1)
        attention = torch.softmax(key @ query.T / (heads * head_dim) ** 0.5, dim=1)
        total += attention[text][:, image]
    return total


def test_upstream_blocks_equal_the_formula_computed_independently(model_and_encoder, records):
    model, encoder = model_and_encoder
    upstream = UpstreamAttention(model)
    for record in records:
        batch = encoder([record], with_labels=False)
        blocks, positions = upstream.blocks(batch)
        expected = reference_block(model, batch)
        got = blocks[0, : expected.shape[0], : expected.shape[1]]
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)  # half precision against float32
        assert positions.row_valid[0].sum() == expected.shape[0] and positions.col_valid[0].sum() == expected.shape[1]
        exact = torch.linalg.svdvals(expected)[:5]
        lowrank = lowrank_singular_values(blocks, positions, 5)[0]
        torch.testing.assert_close(lowrank[0], exact[0], rtol=2e-2, atol=1e-3)  # the leading value: close
        assert (lowrank <= exact * 1.02 + 1e-3).all()  # a randomized range finder never overshoots


def test_upstream_values_do_not_depend_on_the_batch_and_rerun_identically(model_and_encoder, records):
    model, encoder = model_and_encoder
    upstream = UpstreamAttention(model)
    together = lowrank_singular_values(*upstream.blocks(encoder(records, with_labels=False)), 5)
    alone = torch.cat([lowrank_singular_values(*upstream.blocks(encoder([r], with_labels=False)), 5) for r in records])
    torch.testing.assert_close(together, alone, rtol=1e-3, atol=1e-4)
    again = lowrank_singular_values(*upstream.blocks(encoder(records, with_labels=False)), 5)
    assert torch.equal(together, again)


def test_upstream_differs_from_the_exact_definition(model_and_encoder, records):
    from xmas.models.attention import CrossModalAttention, top_singular_values

    model, encoder = model_and_encoder
    batch = encoder(records[:1], with_labels=False)
    upstream = lowrank_singular_values(*UpstreamAttention(model).blocks(batch), 5)
    exact_blocks, _ = CrossModalAttention(model).blocks(batch)
    model.set_attn_implementation({"text_config": "sdpa"})
    assert not torch.allclose(upstream, top_singular_values(exact_blocks, 5), rtol=1e-2)
