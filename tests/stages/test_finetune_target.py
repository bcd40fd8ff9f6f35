"""Rule finetune_target: LoRA wiring with peft, the paper's recipe, the projector's own learning rate."""

from __future__ import annotations

import pytest
import torch

from xmas.data.annotations import read_all
from xmas.errors import XmasError
from xmas.io import write_records
from xmas.models.checkpoints import load_checkpoint, load_target
from xmas.models.encoding import ConversationEncoder
from xmas.progress import StageStats
from xmas.settings import defaults
from xmas.stages.finetune_target import finetune, language_model_linear_layers, prepare_model
from xmas.training.loop import PROJECTOR, parameter_groups

SETTINGS = {**defaults("finetune-target"), "seed": 0, "epochs": 1, "batch_size": 8, "learning_rate": 1e-3,
            "projector_learning_rate": 1e-4, "warmup_ratio": 0.0, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "freeze_vision_tower": True}


@pytest.fixture(scope="module")
def subset(small_demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("subset") / "subset.json"
    write_records(read_all(small_demo["train"])[:24], path)
    return path


def test_lora_goes_on_every_linear_layer_of_the_language_model_and_the_projector_trains_in_full(tiny_checkpoint):
    model, _ = prepare_model(tiny_checkpoint, SETTINGS, torch.device("cpu"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = model.config.text_config.num_hidden_layers
    lora_a = {name for name in trainable if "lora_A" in name}
    assert len(lora_a) == 7 * layers  # q, k, v, o, gate, up, down of every decoder layer
    assert all(".language_model." in name for name in lora_a)
    projector = {name for name in trainable if PROJECTOR in name}
    assert projector and all("modules_to_save" in name for name in projector)
    assert trainable == lora_a | {n.replace("lora_A", "lora_B") for n in lora_a} | projector
    assert not any("vision_tower" in name or "lm_head" in name or "embed" in name for name in trainable)


def test_the_projector_learns_at_its_own_rate(tiny_checkpoint):
    model, _ = prepare_model(tiny_checkpoint, SETTINGS, torch.device("cpu"))
    groups = {group["name"]: group for group in parameter_groups(model, 2e-4, 2e-5, 0.0)}
    assert groups["projector"]["lr"] == 2e-5 and groups["model"]["lr"] == 2e-4
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


def test_linear_layer_names_come_from_the_model_not_a_family_list(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    names = language_model_linear_layers(model)
    assert "model.language_model.layers.0.self_attn.q_proj" in names
    assert not any("vision" in name or "projector" in name or "lm_head" in name for name in names)


def test_a_lora_run_saves_an_adapter_that_merges_into_the_same_model(tiny_checkpoint, subset, small_demo, tmp_path):
    out = tmp_path / "target"
    finetune(tiny_checkpoint, subset, small_demo["images"], out, SETTINGS, StageStats("test"))
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    merged, processor = load_target(out)
    base, _ = load_checkpoint(tiny_checkpoint)
    changed = {name for name, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[name])}
    assert any(PROJECTOR in name for name in changed)
    assert any("self_attn.q_proj" in name for name in changed)
    assert not any("vision_tower" in name or "embed_tokens" in name for name in changed)

    from peft import PeftModel

    unmerged = PeftModel.from_pretrained(load_checkpoint(tiny_checkpoint)[0], out).eval()
    encoder = ConversationEncoder.of_checkpoint(out, processor, small_demo["images"])
    batch = encoder(read_all(subset)[:4], with_labels=False)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**batch).logits, unmerged(**batch).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gpus, accumulation", [(8, 1), (4, 2), (2, 4)])
def test_the_paper_recipe_zero3_config_keeps_the_global_batch_of_128(gpus, accumulation):
    from xmas.training.engine import deepspeed_config

    settings = {"batch_size": 128, "micro_batch_size": 16, "precision": "bf16", "max_grad_norm": 1.0,
                "hidden_size": 4096}
    config = deepspeed_config("zero3", settings, world_size=gpus)
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_batch_size"] == 128 and config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_accumulation_steps"] == accumulation
    assert config["bf16"]["enabled"] is True and config["gradient_clipping"] == 1.0


def test_deepspeed_without_the_package_is_a_clear_error(tiny_checkpoint, subset, small_demo, tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here")
    with pytest.raises(XmasError, match=r'DeepSpeed is not installed: pip install -e "\.\[gpu\]"'):
        finetune(tiny_checkpoint, subset, small_demo["images"], tmp_path / "t", {**SETTINGS, "deepspeed": "zero3"},
                 StageStats("test"))
