"""Rule finetune_target: LoRA wiring with peft, the paper's recipe, the projector's own learning rate."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from xmas.data.annotations import read_all
from xmas.io import seal_path, write_records
from xmas.models.checkpoints import FINETUNE_RUN_FILE, load_checkpoint, load_target
from xmas.models.encoding import ConversationEncoder
from xmas.models.families import LLAVA
from xmas.models.recipe import is_projector, language_model_linear_layers, parameter_groups
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.training.engine import Distributed
from xmas.training.finetune import finetune, fitting_records, prepare_model

SETTINGS = stage_defaults(
    "finetune-target",
    epochs=1,
    batch_size=8,
    learning_rate=1e-3,
    projector_learning_rate=1e-4,
    warmup_ratio=0.0,
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
    freeze_vision_tower=True,
)


@pytest.fixture(scope="module")
def subset(small_demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("subset") / "subset.json"
    write_records(read_all(small_demo["train"])[:24], path)
    return path


def test_lora_goes_on_every_linear_layer_of_the_language_model_and_the_projector_trains_in_full(tiny_checkpoint):
    model, _ = prepare_model(tiny_checkpoint, SETTINGS, Distributed(), seed=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = model.config.text_config.num_hidden_layers
    lora_a = {name for name in trainable if "lora_A" in name}
    assert len(lora_a) == 7 * layers  # q, k, v, o, gate, up, down of every decoder layer
    assert all(".language_model." in name for name in lora_a)
    projector = {name for name in trainable if is_projector(name, LLAVA)}
    assert projector and all("modules_to_save" in name for name in projector)
    assert trainable == lora_a | {n.replace("lora_A", "lora_B") for n in lora_a} | projector
    assert not any("vision_tower" in name or "lm_head" in name or "embed" in name for name in trainable)


def test_the_projector_learns_at_its_own_rate(tiny_checkpoint):
    model, _ = prepare_model(tiny_checkpoint, SETTINGS, Distributed(), seed=0)
    groups = {group["name"]: group for group in parameter_groups(model, 2e-4, 2e-5, 0.0)}
    assert groups["projector"]["lr"] == 2e-5 and groups["model"]["lr"] == 2e-4
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_linear_layer_names_come_from_the_model_not_a_family_list(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    names = language_model_linear_layers(model)
    assert "model.language_model.layers.0.self_attn.q_proj" in names
    assert not any("vision" in name or "projector" in name or "lm_head" in name for name in names)


def test_a_lora_run_saves_an_adapter_that_merges_into_the_same_model(tiny_checkpoint, subset, small_demo, tmp_path):
    out = tmp_path / "target"
    finetune(tiny_checkpoint, subset, small_demo["images"], out, SETTINGS, 0, StageStats("test"))
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    merged, processor = load_target(out)
    base, _ = load_checkpoint(tiny_checkpoint)
    changed = {name for name, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[name])}
    assert any(is_projector(name, LLAVA) for name in changed)
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

    settings = stage_defaults(
        "finetune-target", batch_size=128, micro_batch_size=16, precision="bf16", max_grad_norm=1.0, deepspeed="zero3"
    )
    config = deepspeed_config(settings, world_size=gpus, hidden_size=4096)
    assert config["zero_optimization"]["stage"] == 3 and config["train_micro_batch_size_per_gpu"] == 16
    assert config["gradient_accumulation_steps"] == accumulation
    assert config["train_micro_batch_size_per_gpu"] * accumulation * gpus == 128  # accelerate's train_batch_size


def test_deepspeed_without_the_package_is_a_clear_error(tiny_checkpoint, subset, small_demo, tmp_path):
    """As on a machine without DeepSpeed: `import deepspeed` fails in the stage's process."""
    stage = [*finetune_command(tiny_checkpoint, subset, small_demo, tmp_path / "t")[3:], "--deepspeed", "zero3"]
    without_deepspeed = (
        f"import sys; sys.modules['deepspeed'] = None; from xmas.cli import main; sys.exit(main({stage!r}))"
    )
    result = subprocess.run([sys.executable, "-c", without_deepspeed], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert 'training.deepspeed is set but DeepSpeed is not installed: pip install -e ".[gpu]"' in result.stderr


def finetune_command(tiny_checkpoint, subset, small_demo, out):
    return [
        sys.executable,
        "-m",
        "xmas",
        "finetune-target",
        "--base",
        str(tiny_checkpoint),
        "--subset",
        str(subset),
        "--image-root",
        str(small_demo["images"]),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--micro-batch-size",
        "1",
        "--epochs",
        "3",
        "--save-every-steps",
        "3",
        "--threads",
        "1",
    ]


@pytest.mark.slow
def test_a_killed_fine_tune_resumes_from_its_last_saved_state_to_the_same_weights(
    tiny_checkpoint, subset, small_demo, tmp_path
):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    subprocess.run(
        finetune_command(tiny_checkpoint, subset, small_demo, uninterrupted),
        check=True,
        capture_output=True,
        timeout=600,
    )
    partial = tmp_path / "resumed.partial"
    process = subprocess.Popen(
        finetune_command(tiny_checkpoint, subset, small_demo, resumed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (partial / "step-6" / "step.json").is_file() and process.poll() is None:
            assert time.monotonic() < deadline, "no state saved after step 6"
            time.sleep(0.01)
        process.kill()
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL and not resumed.exists(), "the run ended before it was killed"
    damaged = tmp_path / "damaged"
    shutil.copytree(partial, damaged.with_name("damaged.partial"))
    last = sorted(damaged.with_name("damaged.partial").glob("step-*"))[-1]
    shutil.copyfile(seal_path(partial / last.name), seal_path(last))
    (last / "state.pt").write_bytes((last / "state.pt").read_bytes()[:100])

    rerun = subprocess.run(
        finetune_command(tiny_checkpoint, subset, small_demo, resumed), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # 24 records in batches of 8 for 3 epochs: 9 steps, states saved after steps 3 and 6
    assert re.search(r"resuming from step 6 of 9 \(.*resumed\.partial/step-6\)", rerun.stderr), rerun.stderr[-3000:]
    assert (resumed / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()
    runs = [json.loads((folder / FINETUNE_RUN_FILE).read_text()) for folder in (uninterrupted, resumed)]
    assert runs[0]["losses"] == runs[1]["losses"] and not partial.exists()

    # a saved state cut short is not trusted: the fine-tune starts again from step 0, to the same weights
    again = subprocess.run(
        finetune_command(tiny_checkpoint, subset, small_demo, damaged), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(
        rf"{last}/state\.pt holds 100 bytes, \d+ were written; starting the fine-tune from step 0", again.stderr
    ), again.stderr[-3000:]
    assert (damaged / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


def test_a_record_of_more_images_than_the_target_takes_is_left_out_with_its_reason(tiny_encoder, small_demo, tmp_path):
    records = read_all(small_demo["train"])
    one = next(record for record in records if "image" in record)
    pair = {**one, "id": "pair", "image": [one["image"], one["image"]]}
    pair["conversations"] = [{"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "yes"}]
    write_records([one, pair], tmp_path / "subset.json")
    stats = StageStats("t")
    with fitting_records(tmp_path / "subset.json", tiny_encoder, stats) as kept:
        assert [record["id"] for record in kept] == [one["id"]]
    assert stats.as_dict()["excluded"] == {"too_many_images": 1}


def test_a_parquet_subset_trains_the_target_as_the_same_records_in_json_do(
    tiny_checkpoint, subset, small_demo, tmp_path
):
    """Images decoded from the bytes a parquet subset embeds, records read by position: the same training."""
    from published import dataset_of, onevision_rows, write_parquet_shards

    [shard] = write_parquet_shards(
        dataset_of(onevision_rows(read_all(subset), small_demo["images"]), "onevision"), tmp_path / "pq", shards=1
    )
    finetune(tiny_checkpoint, subset, small_demo["images"], tmp_path / "from-json", SETTINGS, 0, StageStats("t"))
    finetune(tiny_checkpoint, shard, None, tmp_path / "from-parquet", SETTINGS, 0, StageStats("t"))
    from_json, _ = load_target(tmp_path / "from-json")
    from_parquet, _ = load_target(tmp_path / "from-parquet")
    base = load_checkpoint(tiny_checkpoint)[0].state_dict()
    trained = [name for name, p in from_json.state_dict().items() if not torch.equal(p, base[name])]
    assert trained and all(torch.equal(from_json.state_dict()[name], from_parquet.state_dict()[name]) for name in base)
