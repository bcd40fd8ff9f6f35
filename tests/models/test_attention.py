"""The captured text→image attention equals an independent eager reference and is batch-invariant."""

from __future__ import annotations

import copy

import pytest
import torch

from xmas.data.annotations import read_all
from xmas.errors import XmasError
from xmas.models.attention import CrossModalAttention, Positions, top_singular_values
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder


@pytest.fixture(scope="module")
def model_and_encoder(tiny_checkpoint, small_demo):
    model, processor = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(1)
    with torch.no_grad():  # random weights far from init, so attention is not near-uniform
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    model.eval()
    return model, ConversationEncoder.of_checkpoint(tiny_checkpoint, processor, small_demo["images"])


@pytest.fixture(scope="module")
def mixed_records(small_demo):
    """Image records of different lengths (one- and two-turn, tag before and after the question)."""
    records = [r for r in read_all(small_demo["train"]) if r.get("image")]
    two_turn = [r for r in records if len(r["conversations"]) > 2][:2]
    tag_last = [r for r in records if r["conversations"][0]["value"].endswith("<image>")][:1]
    one_turn = [r for r in records if len(r["conversations"]) == 2][:2]
    return two_turn + tag_last + one_turn


def eager_reference(model, batch, layers=None):
    """Σ over heads and the chosen layers of eager attention probabilities (output_attentions=True)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    chosen = range(len(attentions)) if layers is None else layers
    return sum(attentions[i].sum(dim=1) for i in chosen)


def test_positions_follow_input_ids():
    image, pad = 9, 0
    input_ids = torch.tensor([[5, 9, 9, 9, 6, 7, 8, 0], [5, 6, 9, 9, 9, 7, 0, 0]])
    attention_mask = (input_ids != pad).long()
    positions = Positions.find(input_ids, attention_mask, image)
    assert positions.cols[0][positions.col_valid[0]].tolist() == [1, 2, 3]
    assert positions.cols[1][positions.col_valid[1]].tolist() == [2, 3, 4]
    assert positions.rows[0][positions.row_valid[0]].tolist() == [4, 5, 6]
    assert positions.rows[1][positions.row_valid[1]].tolist() == [5]


def test_capture_equals_eager_reference_on_padded_batch(model_and_encoder, mixed_records):
    model, encoder = model_and_encoder
    batch = encoder(mixed_records, with_labels=False)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    reference = eager_reference(model, batch)
    blocks, positions = CrossModalAttention(copy.deepcopy(model)).blocks(batch)
    for row in range(len(mixed_records)):
        rows = positions.rows[row][positions.row_valid[row]]
        cols = positions.cols[row][positions.col_valid[row]]
        assert len(cols) == 64 and len(rows) > 0
        expected = reference[row][rows][:, cols]
        got = blocks[row, : len(rows), : len(cols)]
        assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) <= 1e-5
        assert blocks[row, len(rows) :].abs().sum() == 0 and blocks[row, :, len(cols) :].abs().sum() == 0


def test_layer_subset_and_mean_reductions(model_and_encoder, mixed_records):
    model, encoder = model_and_encoder
    batch = encoder(mixed_records[:2], with_labels=False)
    layers = [0, 2]
    reference = eager_reference(model, batch, layers) / (len(layers) * model.config.text_config.num_attention_heads)
    blocks, positions = CrossModalAttention(copy.deepcopy(model), layers, "mean", "mean").blocks(batch)
    rows = positions.rows[0][positions.row_valid[0]]
    cols = positions.cols[0][positions.col_valid[0]]
    expected = reference[0][rows][:, cols]
    assert torch.linalg.norm(blocks[0, : len(rows), : len(cols)] - expected) / torch.linalg.norm(expected) <= 1e-5


def test_singular_values_do_not_depend_on_the_batch(model_and_encoder, mixed_records):
    model, encoder = model_and_encoder
    attention = CrossModalAttention(copy.deepcopy(model))
    together = top_singular_values(attention.blocks(encoder(mixed_records, with_labels=False))[0], 5)
    for row, record in enumerate(mixed_records):
        alone = top_singular_values(attention.blocks(encoder([record], with_labels=False))[0], 5)
        torch.testing.assert_close(together[row], alone[0], rtol=1e-5, atol=1e-6)


def test_singular_values_are_exact_and_sorted():
    torch.manual_seed(0)
    matrix = torch.rand(2, 7, 12)
    matrix[1, 5:] = 0  # a shorter example, zero-padded
    values = top_singular_values(matrix, 5)
    torch.testing.assert_close(values[1], torch.linalg.svdvals(matrix[1, :5])[:5])
    assert torch.all(values[:, :-1] >= values[:, 1:])
    assert top_singular_values(matrix[:, :3, :3], 5)[:, 3:].abs().sum() == 0  # fewer than k: padded with zeros


def test_unknown_layer_is_a_clear_error(model_and_encoder):
    model, _ = model_and_encoder
    with pytest.raises(XmasError, match="layer 99 does not exist"):
        CrossModalAttention(copy.deepcopy(model), [99])


def test_vision_tower_keeps_sdpa(model_and_encoder):
    model = copy.deepcopy(model_and_encoder[0])
    CrossModalAttention(model)
    assert model.config.text_config._attn_implementation == "xmas_capture"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_half_precision_weights_keep_float32_capture(model_and_encoder, mixed_records):
    model, encoder = model_and_encoder
    batch = encoder(mixed_records, with_labels=False)
    full, positions = CrossModalAttention(copy.deepcopy(model)).blocks(batch)
    half = copy.deepcopy(model).to(torch.bfloat16)
    blocks, _ = CrossModalAttention(half).blocks({**batch, "pixel_values": batch["pixel_values"].to(torch.bfloat16)})
    assert blocks.dtype == torch.float32
    # bf16 carries 8 significant bits through 4 layers of large random weights: close, not equal
    assert torch.linalg.norm(blocks - full) / torch.linalg.norm(full) <= 0.1


def test_flash_output_needs_cuda(model_and_encoder):
    with pytest.raises(XmasError, match="flash_attention_2 needs the model on a CUDA device"):
        CrossModalAttention(copy.deepcopy(model_and_encoder[0]), output="flash_attention_2")


def test_gemma3s_own_masks_reach_the_capture_layer_by_layer(modern_checkpoints, varied_data):
    """Gemma 3 attends with a mask of its own in every layer: an image's tokens see each other both ways, and 5
    layers in 6 see a sliding window only (8 tokens in its stand-in). The capture takes exactly that mask: a
    sliding layer gives a text row farther than the window from every image column nothing, the global layer
    does; and without the processor's token_type_ids the model would silently attend causally instead."""
    from conftest import varied_records

    checkpoint = modern_checkpoints["gemma3"]
    model, processor = load_checkpoint(checkpoint)
    model.eval()
    encoder = ConversationEncoder.of_checkpoint(checkpoint, processor, varied_data["images"])
    record = next(r for r in varied_records() if r.get("image") and len(r["conversations"]) == 4)
    batch = encoder([record], with_labels=False)
    layer_types = model.config.text_config.layer_types
    sliding, full = layer_types.index("sliding_attention"), layer_types.index("full_attention")
    window = model.config.text_config.sliding_window
    blocks = {}
    for layer in (sliding, full):
        blocks[layer], positions = CrossModalAttention(copy.deepcopy(model), [layer]).blocks(batch)
        rows, cols = positions.rows[0][positions.row_valid[0]], positions.cols[0][positions.col_valid[0]]
        expected = eager_reference(model, batch, [layer])[0][rows][:, cols]
        torch.testing.assert_close(blocks[layer][0, : len(rows), : len(cols)], expected, rtol=1e-4, atol=1e-6)
    far = rows - cols.max() >= window  # rows the window keeps every image column from
    assert far.any() and (~far).any()
    assert torch.all(blocks[sliding][0, : len(rows)][far] == 0) and torch.all(blocks[full][0, : len(rows)][far] > 0)
    causal = {key: value for key, value in batch.items() if key != "token_type_ids"}
    without, _ = CrossModalAttention(copy.deepcopy(model), [full]).blocks(causal)
    assert not torch.allclose(without, blocks[full])  # the image block's two-way attention moved the rows' values
