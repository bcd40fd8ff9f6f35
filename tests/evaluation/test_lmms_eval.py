"""The lmms-eval path of `xmas evaluate`: command line, results file discovery and parsing, the subprocess run."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import pytest

from xmas.errors import XmasError
from xmas.evaluation.lmms_eval import BENCHMARKS, find_results_file, lmms_eval_command, parse_results, run_lmms_eval

from conftest import REPO

RECORDED = REPO / "tests/fixtures/lmms_eval/finetune__llava-1.5-7b-full/20250114_093012_results.json"
# LLaVA-1.5-7B in the LLaVA-1.5 paper, the numbers the recorded file holds on lmms-eval's own scale.
PAPER = {"vqav2": 78.5, "gqa": 62.0, "vizwiz": 50.0, "scienceqa_img": 66.8, "textvqa": 58.2, "pope": 85.9,
         "mme": 1510.7, "mmbench": 64.3, "mmbench_cn": 58.3, "llava_wild": 65.4}
NO_JUDGE = [name for name in BENCHMARKS if name != "llava_wild"]


def test_single_gpu_command_runs_the_module_with_this_interpreter():
    command = lmms_eval_command("/ckpt/xmas-0.1", ["gqa", "mme"], "/out/eval", batch_size=2)
    assert command == [sys.executable, "-m", "lmms_eval", "--model", "llava_hf",
                       "--model_args", "pretrained=/ckpt/xmas-0.1", "--tasks", "gqa,mme", "--batch_size", "2",
                       "--output_path", "/out/eval", "--log_samples"]


def test_several_gpus_go_through_accelerate_launch():
    command = lmms_eval_command("/ckpt", ["vqav2", "vizwiz", "mmbench"], "/out", gpus=4,
                                extra_model_args={"attn_implementation": "sdpa"})
    assert command[:7] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4",
                           "-m", "lmms_eval"]
    assert command[command.index("--model_args") + 1] == "pretrained=/ckpt,attn_implementation=sdpa"
    assert command[command.index("--tasks") + 1] == "vqav2_val,vizwiz_vqa_val,mmbench_en_dev"


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


def test_unknown_benchmark_error_lists_the_known_ones():
    with pytest.raises(XmasError, match="'seedbench'") as caught:
        lmms_eval_command("/ckpt", ["gqa", "seedbench"], "/out")
    assert all(name in str(caught.value) for name in BENCHMARKS)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"checkpoint": "/ckpt,v2"}, "pretrained"),
    ({"gpus": 0}, "gpus"),
    ({"benchmarks": []}, "no benchmarks"),
    ({"benchmarks": ["gqa", "gqa"]}, "twice"),
])
def test_bad_arguments_are_named(kwargs, named):
    arguments = {"checkpoint": "/ckpt", "benchmarks": ["gqa"], "output_dir": "/out", **kwargs}
    with pytest.raises(XmasError, match=named):
        lmms_eval_command(**arguments)


def test_recorded_results_parse_to_the_papers_numbers():
    rows = parse_results(RECORDED, list(BENCHMARKS))
    assert [name for name, _ in rows] == list(BENCHMARKS)
    assert dict(rows) == pytest.approx(PAPER)


def test_parse_keeps_the_requested_order_and_subset():
    assert parse_results(RECORDED, ["mme", "pope"]) == [("mme", pytest.approx(1510.7)), ("pope", pytest.approx(85.9))]


def recorded_copy(tmp_path, edit):
    data = json.loads(RECORDED.read_text())
    edit(data["results"])
    path = tmp_path / "run" / "20250301_120000_results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_missing_task_names_file_task_and_tasks_present(tmp_path):
    path = recorded_copy(tmp_path, lambda results: results.pop("pope"))
    with pytest.raises(XmasError) as caught:
        parse_results(path, ["gqa", "pope"])
    message = str(caught.value)
    assert str(path) in message and "'pope'" in message and "tasks present" in message and "gqa" in message


def test_missing_metric_names_the_keys_present(tmp_path):
    path = recorded_copy(tmp_path, lambda results: results["mme"].pop("mme_percetion_score,none"))
    with pytest.raises(XmasError) as caught:
        parse_results(path, ["mme"])
    message = str(caught.value)
    assert str(path) in message and "'mme_percetion_score,none'" in message and "mme_cognition_score,none" in message


def test_failed_aggregation_is_not_read_as_a_score(tmp_path):
    path = recorded_copy(tmp_path, lambda results: results["llava_in_the_wild"].update(
        {"gpt_eval_llava_all,none": None}))
    with pytest.raises(XmasError, match="not a number"):
        parse_results(path, ["llava_wild"])


def test_a_file_that_is_not_lmms_eval_output_is_named(tmp_path):
    path = tmp_path / "x_results.json"
    path.write_text(json.dumps({"gqa": 0.6}))
    with pytest.raises(XmasError, match="'results'"):
        parse_results(path, ["gqa"])


def test_find_results_file_picks_the_newest_and_skips_task_side_files(tmp_path):
    older = tmp_path / "finetune__ckpt" / "20250114_093012_results.json"
    newer = tmp_path / "finetune__ckpt" / "20250201_101500_results.json"
    side = tmp_path / "submissions" / "mmbench_en_dev_results.json"
    for path in (newer, older, side):
        path.parent.mkdir(exist_ok=True)
        shutil.copy(RECORDED, path)
    (tmp_path / "finetune__ckpt" / "20250201_101500_samples_gqa.jsonl").write_text("{}\n")
    assert find_results_file(tmp_path) == newer


def test_find_results_file_without_results_names_the_folder(tmp_path):
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "mmbench_en_dev_results.json").write_text("{}")
    with pytest.raises(XmasError, match=str(tmp_path)):
        find_results_file(tmp_path)


def test_run_says_how_to_install_lmms_eval_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # None in sys.modules makes the import fail
    with pytest.raises(XmasError, match="pip install lmms-eval"):
        run_lmms_eval(tmp_path, ["gqa"], tmp_path / "eval")


# A stand-in for lmms-eval's command-line contract (not a mock of our code): it takes the flags we pass and
# writes, under --output_path, a results file in the recorded format holding only the tasks asked for.
STAND_IN = textwrap.dedent('''
    """Stand-in for `python -m lmms_eval`: writes the recorded results for the requested tasks."""
    import argparse, datetime, json, os, sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    for flag in ("--model", "--model_args", "--tasks", "--batch_size", "--output_path"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--log_samples", action="store_true")
    args = parser.parse_args()
    print(f"stand-in lmms_eval: {args.model} on {args.tasks}", flush=True)
    if os.environ.get("STAND_IN_EXIT"):
        sys.exit(int(os.environ["STAND_IN_EXIT"]))
    if os.environ.get("STAND_IN_WRITE") == "no":
        sys.exit(0)  # lmms-eval's own habit when an evaluation fails
    data = json.loads(Path(os.environ["STAND_IN_RECORDED"]).read_text())
    data["results"] = {task: data["results"][task] for task in args.tasks.split(",")}
    data["config"]["model_args"] = args.model_args
    folder = Path(args.output_path) / Path(args.model_args.split(",")[0].split("=", 1)[1]).name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    (folder / f"{stamp}_results.json").write_text(json.dumps(data))
''')


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    package = tmp_path / "stand_in" / "lmms_eval"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STAND_IN)
    monkeypatch.syspath_prepend(str(package.parent))  # what PYTHONPATH does for the child, for the installed check
    checkpoint = tmp_path / "llava-ckpt"
    checkpoint.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(package.parent), os.environ.get("PYTHONPATH", "")]),
           "STAND_IN_RECORDED": str(RECORDED)}
    return checkpoint, env


def test_run_streams_the_output_and_parses_the_file_lmms_eval_writes(stand_in, tmp_path, capfd):
    checkpoint, env = stand_in
    rows = run_lmms_eval(checkpoint, ["gqa", "pope", "mme"], tmp_path / "eval", extra_env=env)
    assert rows == [("gqa", pytest.approx(62.0)), ("pope", pytest.approx(85.9)), ("mme", pytest.approx(1510.7))]
    captured = capfd.readouterr()
    assert "stand-in lmms_eval: llava_hf on gqa,pope,mme" in captured.err and "stand-in" not in captured.out


def test_run_reports_a_failed_exit(stand_in, tmp_path):
    checkpoint, env = stand_in
    with pytest.raises(XmasError, match="exited with code 3"):
        run_lmms_eval(checkpoint, ["gqa"], tmp_path / "eval", extra_env={**env, "STAND_IN_EXIT": "3"})


def test_run_does_not_take_an_earlier_runs_file_for_a_silent_failure(stand_in, tmp_path):
    checkpoint, env = stand_in
    earlier = tmp_path / "eval" / "llava-ckpt" / "20250114_093012_results.json"
    earlier.parent.mkdir(parents=True)
    shutil.copy(RECORDED, earlier)
    with pytest.raises(XmasError, match="wrote no new results file"):
        run_lmms_eval(checkpoint, ["gqa"], tmp_path / "eval", extra_env={**env, "STAND_IN_WRITE": "no"})
