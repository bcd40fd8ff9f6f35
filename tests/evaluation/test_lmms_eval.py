"""The lmms-eval path of `xmas evaluate`: command line, benchmark table, results parsing, and a real run.

The real run (lmms-eval's own CLI, through `xmas evaluate --suite lmms-eval`, on the tiny demo model and
the held-out split as local tasks) is skipped only where lmms-eval is not installed and
XMAS_REQUIRE_LMMS_EVAL is unset; CI installs it with tools/install-lmms-eval.sh and sets it. Every
results file read here is one lmms-eval wrote in that run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter

import pandas as pd
import pytest

from xmas.data.annotations import read_all
from xmas.errors import XmasError
from xmas.evaluation.heldout_task_utils import normalize_answer
from xmas.evaluation.lmms_eval import (
    BENCHMARKS,
    Benchmark,
    benchmark_table,
    evaluation_checkpoint,
    find_results_file,
    lmms_eval_command,
    parse_results,
    run_lmms_eval,
)
from xmas.evaluation.local_task import task_name
from xmas.io import write_records
from xmas.models.families import FAMILIES
from xmas.progress import StageStats
from xmas.stages.evaluate import evaluate_exact_match

from conftest import REPO

INSTALL = "bash tools/install-lmms-eval.sh"


def test_cpu_command_runs_the_module_with_this_interpreter_on_the_cpu():
    command = lmms_eval_command("/ckpt/xmas-0.1", ["gqa", "mme"], "/out/eval", batch_size=2)
    assert command == [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "llava_hf",
        "--model_args",
        "pretrained=/ckpt/xmas-0.1,device=cpu,device_map=cpu",
        "--tasks",
        "gqa,mme",
        "--batch_size",
        "2",
        "--output_path",
        "/out/eval",
        "--log_samples",
        "--force_simple",
    ]


def test_one_gpu_gets_an_explicit_device_map_which_the_config_can_override():
    command = lmms_eval_command("/ckpt", ["gqa"], "/out", gpus=1)
    assert command[command.index("--model_args") + 1] == "pretrained=/ckpt,device_map=cuda"
    command = lmms_eval_command(
        "/ckpt", ["gqa"], "/out", gpus=1, extra_model_args={"device_map": "auto", "attn_implementation": "sdpa"}
    )
    assert command[command.index("--model_args") + 1] == "pretrained=/ckpt,device_map=auto,attn_implementation=sdpa"


def test_several_gpus_go_through_accelerate_launch():
    command = lmms_eval_command(
        "/ckpt",
        ["vqav2", "vizwiz", "mmbench"],
        "/out",
        gpus=4,
        extra_model_args={"attn_implementation": "sdpa"},
        include_path="/tasks",
    )
    assert command[:7] == [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "4",
        "-m",
        "lmms_eval",
    ]
    assert command[command.index("--model_args") + 1] == "pretrained=/ckpt,attn_implementation=sdpa"
    assert command[command.index("--tasks") + 1] == "vqav2_val,vizwiz_vqa_val,mmbench_en_dev"
    assert command[-2:] == ["--include_path", "/tasks"]


def test_judge_benchmark_is_refused_without_a_key_and_the_error_says_how_to_leave_it_out():
    with pytest.raises(XmasError) as caught:
        lmms_eval_command("/ckpt", ["gqa", "llava_wild", "pope"], "/out", env={})
    message = str(caught.value)
    assert "llava_wild" in message and "OPENAI_API_KEY" in message
    assert "evaluation.benchmarks: [gqa, pope]" in message


@pytest.mark.parametrize(("allow_judge", "env"), [(True, {}), (False, {"OPENAI_API_KEY": "sk-test"})])
def test_judge_benchmark_runs_when_allowed_or_keyed(allow_judge, env):
    command = lmms_eval_command("/ckpt", ["llava_wild"], "/out", allow_judge=allow_judge, env=env)
    assert command[command.index("--tasks") + 1] == "llava_in_the_wild"


def test_a_task_without_a_known_metric_is_refused_with_the_setting_that_adds_it():
    with pytest.raises(XmasError, match="'seedbench'") as caught:
        lmms_eval_command("/ckpt", ["gqa", "seedbench"], "/out")
    message = str(caught.value)
    assert all(name in message for name in BENCHMARKS) and "evaluation.metrics: {seedbench: exact_match*100}" in message


def test_any_task_runs_once_given_its_metric_and_the_config_can_change_a_built_in_one():
    table = benchmark_table(
        {"seedbench": "seed_image*100", "mme": "mme_percetion_score", "ok_vqa": "exact_match,flexible-extract*100"}
    )
    assert table["seedbench"] == Benchmark("seedbench", "seed_image", 100.0)
    assert table["mme"] == Benchmark("mme", "mme_percetion_score", 1.0, False, BENCHMARKS["mme"].note)
    assert (table["seedbench"].key, table["ok_vqa"].key) == ("seed_image,none", "exact_match,flexible-extract")
    command = lmms_eval_command("/ckpt", ["seedbench", "mme", "gqa"], "/out", table=table)
    assert command[command.index("--tasks") + 1] == "seedbench,mme,gqa"


def test_the_built_in_mme_metric_is_the_one_lmms_eval_writes_since_0_3():
    assert BENCHMARKS["mme"].key == "mme_perception_score,none"


@pytest.mark.parametrize("spec", ["exact_match*", "exact_match*x", "exact match", "*100"])
def test_a_malformed_metric_names_the_setting(spec):
    with pytest.raises(XmasError, match=r"evaluation.metrics.task: .* METRIC\*SCALE"):
        benchmark_table({"task": spec})


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"checkpoint": "/ckpt,v2"}, "pretrained"),
        ({"extra_model_args": {"dtype": "a=b"}}, "dtype"),
        ({"gpus": -1}, "gpus"),
        ({"batch_size": 0}, "batch_size"),
        ({"benchmarks": []}, "no benchmarks"),
        ({"benchmarks": ["gqa", "gqa"]}, "twice"),
    ],
)
def test_bad_arguments_are_named(kwargs, named):
    arguments = {"checkpoint": "/ckpt", "benchmarks": ["gqa"], "output_dir": "/out", **kwargs}
    with pytest.raises(XmasError, match=named):
        lmms_eval_command(**arguments)


def test_find_results_file_picks_the_newest_and_skips_task_side_files(tmp_path):
    older = tmp_path / "finetune__ckpt" / "20250114_093012_results.json"
    newer = tmp_path / "finetune__ckpt" / "20250201_101500_results.json"
    side = tmp_path / "submissions" / "mmbench_en_dev_results.json"
    for path in (newer, older, side):  # only names matter here
        path.parent.mkdir(exist_ok=True)
        path.write_text("{}")
    (tmp_path / "finetune__ckpt" / "20250201_101500_samples_gqa.jsonl").write_text("{}\n")
    assert find_results_file(tmp_path) == newer


def test_find_results_file_without_results_names_the_folder(tmp_path):
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "mmbench_en_dev_results.json").write_text("{}")
    with pytest.raises(XmasError, match=str(tmp_path)):
        find_results_file(tmp_path)


def test_a_file_that_is_not_lmms_eval_output_is_named(tmp_path):
    path = tmp_path / "x_results.json"
    path.write_text(json.dumps({"gqa": 0.6}))
    with pytest.raises(XmasError, match="'results'"):
        parse_results(path, ["gqa"])


def test_run_says_how_to_install_lmms_eval_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # None in sys.modules makes the import fail
    with pytest.raises(XmasError, match="tools/install-lmms-eval.sh"):
        run_lmms_eval(tmp_path, ["gqa"], tmp_path / "eval")


def test_the_evaluation_checkpoint_takes_string_content_and_renders_lists_as_before(tiny_checkpoint, tmp_path):
    from transformers import AutoProcessor

    linked = evaluation_checkpoint(tiny_checkpoint, tmp_path / "linked")
    assert (linked / "model.safetensors").resolve() == (tiny_checkpoint / "model.safetensors").resolve()
    ours, theirs = AutoProcessor.from_pretrained(tiny_checkpoint), AutoProcessor.from_pretrained(linked)
    items = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat color?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    assert theirs.apply_chat_template(items, tokenize=False) == ours.apply_chat_template(items, tokenize=False)
    # what lmms-eval's llava_hf sends: one string, "<image>" inside
    text = [{"role": "user", "content": "<image>\nWhat color?"}]
    prompt = theirs.tokenizer.apply_chat_template(text, tokenize=False, add_generation_prompt=True)
    assert prompt == ours.apply_chat_template(items[:1], tokenize=False, add_generation_prompt=True)
    assert "What color?" not in ours.tokenizer.apply_chat_template(text, tokenize=False, add_generation_prompt=True)


# --- lmms-eval itself ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lmms_eval():
    if importlib.util.find_spec("lmms_eval") is None:
        if os.environ.get("XMAS_REQUIRE_LMMS_EVAL"):
            pytest.fail(f"XMAS_REQUIRE_LMMS_EVAL is set but lmms-eval is not installed: {INSTALL}")
        pytest.skip(f"lmms-eval is not installed ({INSTALL}; CI sets XMAS_REQUIRE_LMMS_EVAL)")


def lmms_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def rigged_test(small_demo, tiny_checkpoint, tmp_path_factory):
    """The held-out split with the references of every other question per type set to the exact-match suite's answer.

    The tiny model is untrained, so against the real references both suites score 0; with these, lmms-eval
    scores 50% on a question type exactly when it answers each question as the exact-match suite did.
    """
    records = read_all(small_demo["test"])
    _, predictions = evaluate_exact_match(
        tiny_checkpoint, small_demo["test"], small_demo["images"], 1, 8, StageStats("t")
    )
    seen = Counter()
    for record, answer in zip(records, predictions.answer):
        seen[record["question_type"]] += 1
        if seen[record["question_type"]] % 2:
            record["conversations"][-1]["value"] = answer
    path = tmp_path_factory.mktemp("rigged") / "test.json"
    write_records(records, path)
    return path


@pytest.fixture(scope="module")
def heldout_run(lmms_eval, rigged_test, small_demo, tiny_checkpoint, tmp_path_factory):
    """`xmas evaluate --suite lmms-eval --benchmarks heldout` once: its scores, work folder and output."""
    root = tmp_path_factory.mktemp("lmms")
    scores = root / "scores.tsv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmas",
            "evaluate",
            "--suite",
            "lmms-eval",
            "--benchmarks",
            "heldout",
            "--model",
            str(tiny_checkpoint),
            "--test",
            str(rigged_test),
            "--image-root",
            str(small_demo["images"]),
            "--out",
            str(scores),
            "--stats",
            str(root / "stats.json"),
        ],
        capture_output=True,
        text=True,
        env=lmms_env(root),
        cwd=root,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return {"scores": scores, "work": root / "scores", "stats": root / "stats.json", "result": result}


def samples(work, task):
    [path] = (work / "lmms-eval").glob(f"*/*_samples_{task}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_real_run_scores_one_row_per_question_type_with_images(heldout_run, rigged_test):
    records = read_all(rigged_test)
    with_image = Counter(record["question_type"] for record in records if record.get("image"))
    table = pd.read_csv(heldout_run["scores"], sep="\t")
    assert list(table.columns) == ["benchmark", "score", "n"]
    assert dict(zip(table.benchmark, table.n)) == dict(with_image)
    # every other question per type carries the exact-match suite's own answer as its reference
    assert table.score.tolist() == [100.0 * ((n + 1) // 2) / n for n in table.n]
    stats = json.loads(heldout_run["stats"].read_text())
    assert stats["counts"]["text_only_left_out"] == len(records) - sum(with_image.values())
    assert stats["counts"]["in"] == stats["counts"]["out"] == len(with_image)
    assert "|xmas_heldout_" in heldout_run["result"].stderr and heldout_run["result"].stdout == ""


def test_real_run_scores_match_a_recomputation_from_lmms_eval_samples(heldout_run):
    table = pd.read_csv(heldout_run["scores"], sep="\t")
    for benchmark, score in zip(table.benchmark, table.score):
        logged = samples(heldout_run["work"], task_name(benchmark))
        correct = [
            normalize_answer(sample["filtered_resps"]) == normalize_answer(sample["target"]) for sample in logged
        ]
        assert [sample["exact_match"] for sample in logged] == [float(c) for c in correct]
        assert score == pytest.approx(100 * sum(correct) / len(correct))


def test_real_results_file_holds_what_the_parser_reads(heldout_run):
    path = find_results_file(heldout_run["work"] / "lmms-eval")
    data = json.loads(path.read_text())
    tasks = sorted(task for task in data["results"])
    assert tasks and all(task.startswith("xmas_heldout_") for task in tasks)
    assert {"alias", "exact_match,none", "exact_match_stderr,none"} <= set(data["results"][tasks[0]])
    assert data["n-samples"][tasks[0]]["effective"] > 0 and data["lmms_eval_version"]


@pytest.fixture
def real_results(heldout_run, tmp_path):
    """A copy of the real results file to edit, and the table that reads it."""
    source = find_results_file(heldout_run["work"] / "lmms-eval")
    data = json.loads(source.read_text())
    table = benchmark_table(
        None, {task.removeprefix("xmas_heldout_"): Benchmark(task, "exact_match", 100.0) for task in data["results"]}
    )

    def edited(edit):
        copy = json.loads(source.read_text())
        edit(copy["results"])
        path = tmp_path / "run" / source.name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(copy))
        return path

    return data, table, edited


def test_parse_keeps_the_requested_order_and_subset(real_results):
    data, table, edited = real_results
    path = edited(lambda results: None)
    names = list(reversed([name for name in table if name not in BENCHMARKS]))[:2]
    rows = parse_results(path, names, table)
    assert [name for name, _, _ in rows] == names
    for name, score, n in rows:
        assert score == 100 * data["results"][table[name].task]["exact_match,none"]
        assert n == data["n-samples"][table[name].task]["effective"]


def test_missing_task_names_file_task_and_tasks_present(real_results):
    _, table, edited = real_results
    path = edited(lambda results: results.pop("xmas_heldout_color"))
    with pytest.raises(XmasError) as caught:
        parse_results(path, ["shape", "color"], table)
    message = str(caught.value)
    assert str(path) in message and "'xmas_heldout_color'" in message and "xmas_heldout_shape" in message


def test_missing_metric_names_the_keys_present_and_the_setting(real_results):
    _, table, edited = real_results
    path = edited(lambda results: results["xmas_heldout_color"].pop("exact_match,none"))
    with pytest.raises(XmasError) as caught:
        parse_results(path, ["color"], table)
    message = str(caught.value)
    assert "'exact_match,none'" in message and "exact_match_stderr,none" in message
    assert "evaluation.metrics: {color: METRIC}" in message


def test_failed_aggregation_is_not_read_as_a_score(real_results):
    _, table, edited = real_results
    path = edited(lambda results: results["xmas_heldout_color"].update({"exact_match,none": None}))
    with pytest.raises(XmasError, match="not a number"):
        parse_results(path, ["color"], table)


def test_an_lmms_eval_error_after_start_is_not_taken_for_results(lmms_eval, tiny_checkpoint, tmp_path):
    # lmms-eval prints errors during evaluation and still exits 0; here its task lookup fails
    table = benchmark_table({"no_such_task": "exact_match"})
    with pytest.raises(XmasError, match="exited 0 but wrote no new results file"):
        run_lmms_eval(tiny_checkpoint, ["no_such_task"], tmp_path / "eval", table=table, extra_env=lmms_env(tmp_path))


def test_heldout_needs_the_test_split(tiny_checkpoint, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmas",
            "evaluate",
            "--suite",
            "lmms-eval",
            "--benchmarks",
            "heldout,gqa",
            "--model",
            str(tiny_checkpoint),
            "--out",
            str(tmp_path / "s.tsv"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode != 0 and "'heldout' of the lmms-eval suite needs --test" in result.stderr


# --- today's families ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def questions_of_varied_sizes(varied_data, tmp_path_factory):
    """The varied images as held-out colour and count questions."""
    records = [
        {**record, "question_type": "count" if number % 2 else "color", "conversations": record["conversations"][:2]}
        for number, record in enumerate(read_all(varied_data["train"]))
        if record.get("image")
    ]
    path = tmp_path_factory.mktemp("varied-test") / "test.json"
    write_records(records, path)
    return path


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision", "gemma3"])
def test_the_families_are_scored_by_lmms_evals_own_models_with_their_own_image_bounds(
    family, lmms_eval, modern_checkpoints, questions_of_varied_sizes, varied_data, tmp_path
):
    from xmas.models.checkpoints import load_processor
    from xmas.models.image_tokens import pixel_bounds as bounds_of

    def pixel_bounds(processor):  # what xmas gives lmms-eval: Qwen's pixel bounds, InternVL's crop bounds
        return bounds_of(processor.image_processor, FAMILIES[family])

    checkpoint, scores = modern_checkpoints[family], tmp_path / "scores.tsv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmas",
            "evaluate",
            "--suite",
            "lmms-eval",
            "--benchmarks",
            "heldout",
            "--model",
            str(checkpoint),
            "--test",
            str(questions_of_varied_sizes),
            "--image-root",
            str(varied_data["images"]),
            "--out",
            str(scores),
            "--stats",
            str(tmp_path / "stats.json"),
        ],
        capture_output=True,
        text=True,
        env=lmms_env(tmp_path),
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    bounds = ",".join(f"{name}={value}" for name, value in pixel_bounds(load_processor(checkpoint)).items())
    assert f"xmas_{family} (pretrained=" in result.stderr and bounds in result.stderr  # lmms-eval's own log line
    table = pd.read_csv(scores, sep="\t")
    assert dict(zip(table.benchmark, table.n)) == {"color": 3, "count": 3} and table.score.between(0, 100).all()
    assert json.loads((tmp_path / "stats.json").read_text())["lmms_eval_model"] == f"xmas_{family}"
    logged = samples(tmp_path / "scores", task_name("color"))
    assert [sample["input_media"] for sample in logged] == [
        [str(varied_data["images"] / record["image"])]
        for record in read_all(questions_of_varied_sizes)
        if record["question_type"] == "color"
    ]


def test_a_family_lmms_eval_has_no_model_for_is_refused_with_the_suite_that_scores_it(modern_checkpoints, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "xmas",
            "evaluate",
            "--suite",
            "lmms-eval",
            "--benchmarks",
            "gqa",
            "--model",
            str(modern_checkpoints["idefics3"]),
            "--out",
            str(tmp_path / "s.tsv"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=lmms_env(tmp_path),
    )
    assert result.returncode != 0
    assert "lmms-eval has no model for idefics3 models; score them with evaluation.suite: exact-match" in result.stderr


def test_images_reach_lmms_evals_qwen_models_resized_as_qwen_vl_utils_resizes_them(lmms_eval, varied_data):
    from lmms_eval.models.model_utils.media_encoder import encode_image_to_data_url
    from PIL import Image

    from xmas.evaluation.lmms_eval_qwen import process_vision_info

    pictures = [Image.open(varied_data["images"] / name) for name in ("100x60.png", "300x40.png")]
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {
            "role": "user",
            "content": [
                *(
                    {
                        "type": "image",
                        "image": encode_image_to_data_url(picture),
                        "min_pixels": 3136,
                        "max_pixels": 12544,
                    }
                    for picture in pictures
                ),
                {"type": "text", "text": "What color?"},
            ],
        },
    ]
    images, videos = process_vision_info([conversation])
    # each side rounded to a multiple of a merged patch (28 px), the area within the bounds
    assert videos is None and [image.size for image in images] == [(112, 56), (308, 28)]
    images, _, video_kwargs = process_vision_info(conversation, return_video_kwargs=True, image_patch_size=16)
    assert [image.size for image in images] == [(96, 64), (288, 32)] and video_kwargs == {}  # Qwen3-VL: 32 px
    with pytest.raises(XmasError, match="images only"):
        process_vision_info([[{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]])
