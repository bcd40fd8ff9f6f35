"""Evaluate a fine-tuned target checkpoint on the paper's 10 benchmarks with lmms-eval.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval) runs as a separate process, so this
module needs neither it nor torch at import time: it builds the command line, runs it, finds the
results file lmms-eval writes (``<output>/<model folder>/<YYYYMMDD_HHMMSS>_results.json``) and
turns it into ``(benchmark, score)`` rows on the scale the LLaVA-1.5 paper reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from xmas.errors import XmasError

# lmms-eval suffixes every metric key with the filter it ran under; none of our tasks uses a filter.
FILTER = "none"
# Either key lets lmms-eval's judge-based tasks call GPT (API_TYPE=openai is its default, azure the other).
JUDGE_KEYS = ("OPENAI_API_KEY", "AZURE_API_KEY")
# lmms-eval names the file after its start time ("%Y%m%d_%H%M%S"); its task helpers also write
# files such as submissions/mmbench_en_dev_results.json, which must never be mistaken for it.
RESULTS_NAME = re.compile(r"(?P<stamp>\d[\d_T.:-]*)_results\.json")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Benchmark:
    task: str  # lmms-eval task name
    metric: str  # metric name in the results file, without the ",none" filter suffix
    scale: float  # multiply the stored value by this to get the number the LLaVA-1.5 paper reports
    needs_judge: bool  # scores only with a paid GPT judge
    note: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    # The paper scores VQAv2 test-dev on the EvalAI server; vqav2_val scores locally (same VQA accuracy).
    "vqav2": Benchmark("vqav2_val", "exact_match", 100.0, False, "val split (paper: test-dev, server only)"),
    "gqa": Benchmark("gqa", "exact_match", 100.0, False, "testdev-balanced, as in the paper"),
    # VizWiz test needs the EvalAI server as well; the val split has public answers.
    "vizwiz": Benchmark("vizwiz_vqa_val", "exact_match", 100.0, False, "val split (paper: test-dev, server only)"),
    "scienceqa_img": Benchmark("scienceqa_img", "exact_match", 100.0, False, "test split, image questions"),
    # The paper's TextVQA number is on val too.
    "textvqa": Benchmark("textvqa_val", "exact_match", 100.0, False, "val split, as in the paper"),
    # LLaVA-1.5 (and XMAS after it) reports POPE F1; lmms-eval's "pope" pools the adversarial, popular and
    # random splits, the paper averages their three F1s (close, not identical).
    "pope": Benchmark("pope", "pope_f1_score", 100.0, False, "F1 over the pooled 3 splits (paper: mean of 3 F1s)"),
    # MME perception score is a sum over 10 categories (0..2000) and is reported as is; the typo is lmms-eval's.
    "mme": Benchmark("mme", "mme_percetion_score", 1.0, False, "perception score, as in the paper"),
    # lmms-eval already reports MMBench accuracy in %. Answers are matched to options by rules first; GPT is
    # asked only for answers the rules cannot map, and without a key those get a fallback (a random option, or a
    # local letter match in newer versions), so the task runs without a judge; LLaVA-1.5 answers with a bare
    # letter, so the fallback is rare.
    "mmbench": Benchmark("mmbench_en_dev", "gpt_eval_score", 1.0, False, "dev split, as in the paper"),
    "mmbench_cn": Benchmark("mmbench_cn_dev", "gpt_eval_score", 1.0, False, "dev split, as in the paper"),
    # LLaVA-Bench (in-the-wild): GPT-4 rates every answer against its own; the stored value is already the
    # relative score in %.
    "llava_wild": Benchmark("llava_in_the_wild", "gpt_eval_llava_all", 1.0, True, "GPT-4 judge (paid)"),
}


def check_benchmarks(benchmarks: Iterable[str]) -> list[str]:
    names = list(benchmarks)
    if not names:
        raise XmasError(f"no benchmarks to evaluate; choose from {', '.join(BENCHMARKS)}")
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise XmasError(f"unknown benchmark(s) {', '.join(map(repr, unknown))}; known: {', '.join(BENCHMARKS)}")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise XmasError(f"benchmark(s) listed twice: {', '.join(twice)}")
    return names


def judge_key_present(env: Mapping[str, str]) -> bool:
    return any(env.get(key) for key in JUDGE_KEYS)


def check_judge(benchmarks: list[str], allow_judge: bool, env: Mapping[str, str]) -> None:
    judged = [name for name in benchmarks if BENCHMARKS[name].needs_judge]
    if not judged or allow_judge or judge_key_present(env):
        return
    rest = [name for name in benchmarks if name not in judged]
    raise XmasError(
        f"{', '.join(judged)} needs a paid GPT judge, which lmms-eval reaches through {' or '.join(JUDGE_KEYS)}; "
        f"set the key, or leave it out with evaluation.benchmarks: [{', '.join(rest)}]")


def model_args(checkpoint: str | Path, extra_model_args: Mapping[str, object] | None) -> str:
    pairs = {"pretrained": str(checkpoint), **(extra_model_args or {})}
    # lmms-eval splits --model_args on commas and "=", so neither may appear inside a value.
    for key, value in pairs.items():
        if "," in str(value) or "=" in str(value):
            raise XmasError(f"lmms-eval model argument {key}={value!r} contains ',' or '=', which lmms-eval "
                            "cannot parse; rename the path or value")
    return ",".join(f"{key}={value}" for key, value in pairs.items())


def launcher(gpus: int) -> list[str]:
    if gpus < 1:
        raise XmasError(f"gpus must be at least 1, got {gpus}")
    if gpus == 1:
        return [sys.executable, "-m", "lmms_eval"]
    # `accelerate launch` as a module of this interpreter, so the venv's accelerate is the one used.
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "-m", "lmms_eval"]


def lmms_eval_command(checkpoint: str | Path, benchmarks: Iterable[str], output_dir: str | Path, gpus: int = 1,
                      batch_size: int = 1, model: str = "llava_hf",
                      extra_model_args: Mapping[str, object] | None = None, allow_judge: bool = False,
                      env: Mapping[str, str] | None = None) -> list[str]:
    """The argv that evaluates ``checkpoint`` on ``benchmarks`` and writes results under ``output_dir``."""
    names = check_benchmarks(benchmarks)
    check_judge(names, allow_judge, os.environ if env is None else env)
    if batch_size < 1:
        raise XmasError(f"batch_size must be at least 1, got {batch_size}")
    return launcher(gpus) + [
        "--model", model,
        "--model_args", model_args(checkpoint, extra_model_args),
        "--tasks", ",".join(BENCHMARKS[name].task for name in names),
        "--batch_size", str(batch_size),
        "--output_path", str(output_dir),
        "--log_samples",
    ]


def results_files(output_dir: Path) -> list[Path]:
    # The model folder's name depends on the lmms-eval version (full path or its last two parts), so look in all.
    return [path for path in output_dir.glob("*/*_results.json") if RESULTS_NAME.fullmatch(path.name)]


def modification_times(output_dir: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in results_files(output_dir)}


def newest(paths: Iterable[Path]) -> Path:
    # The name's start-time stamp orders runs even after a copy resets mtimes; mtime breaks ties.
    return max(paths, key=lambda path: (RESULTS_NAME.fullmatch(path.name)["stamp"], path.stat().st_mtime))


def find_results_file(output_dir: str | Path) -> Path:
    """The newest ``<model folder>/<timestamp>_results.json`` lmms-eval wrote under ``output_dir``."""
    output_dir = Path(output_dir)
    found = results_files(output_dir) if output_dir.is_dir() else []
    if not found:
        raise XmasError(f"{output_dir}: no lmms-eval results file (<model folder>/<YYYYMMDD_HHMMSS>_results.json)")
    return newest(found)


def load_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XmasError(f"{path}: lmms-eval results file not found") from None
    except json.JSONDecodeError as error:
        raise XmasError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise XmasError(f"{path}: no top-level 'results' object; is this an lmms-eval results file?")
    return data["results"]


def score(path: Path, results: dict, name: str) -> float:
    benchmark = BENCHMARKS[name]
    entry = results.get(benchmark.task)
    if not isinstance(entry, dict):
        raise XmasError(f"{path}: no results for task {benchmark.task!r} (benchmark {name}); "
                        f"tasks present: {', '.join(sorted(results)) or 'none'}")
    key = f"{benchmark.metric},{FILTER}"
    if key not in entry:
        present = sorted(k for k in entry if k != "alias")
        raise XmasError(f"{path}: task {benchmark.task!r} has no metric {key!r}; keys present: {', '.join(present)}")
    value = entry[key]
    # Aggregations that fail in lmms-eval (e.g. a judge without a key) leave null or a string behind.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise XmasError(f"{path}: task {benchmark.task!r} metric {key!r} is {value!r}, not a number")
    return float(value) * benchmark.scale


def parse_results(path: str | Path, benchmarks: Iterable[str]) -> list[tuple[str, float]]:
    """``(benchmark, score)`` rows, in the order given, on the scale the LLaVA-1.5 paper reports."""
    names = check_benchmarks(benchmarks)
    path = Path(path)
    results = load_results(path)
    return [(name, score(path, results, name)) for name in names]


def check_lmms_eval_installed() -> None:
    if importlib.util.find_spec("lmms_eval") is None:
        raise XmasError("lmms-eval is not installed in this environment; install it with "
                        "`pip install lmms-eval` (or `pip install -e .[eval]`)")


def check_checkpoint(checkpoint: str | Path) -> None:
    if not Path(checkpoint).exists() and not HUB_ID.fullmatch(str(checkpoint)):
        raise XmasError(f"{checkpoint}: checkpoint folder not found")


def stream(command: list[str], env: Mapping[str, str]) -> int:
    """Run ``command``, copying its output to our stderr line by line (stdout stays free for our own output)."""
    with subprocess.Popen(command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", bufsize=1) as process:
        for line in process.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
        return process.wait()


def run_lmms_eval(checkpoint: str | Path, benchmarks: Iterable[str], output_dir: str | Path, gpus: int = 1,
                  batch_size: int = 1, model: str = "llava_hf", extra_model_args: Mapping[str, object] | None = None,
                  allow_judge: bool = False, extra_env: Mapping[str, str] | None = None) -> list[tuple[str, float]]:
    """Evaluate ``checkpoint`` with lmms-eval and return ``(benchmark, score)`` rows.

    ``extra_env`` is laid over this process's environment for the lmms-eval process only.
    """
    names = check_benchmarks(benchmarks)
    env = {**os.environ, **(extra_env or {})}
    command = lmms_eval_command(checkpoint, names, output_dir, gpus, batch_size, model, extra_model_args,
                                allow_judge, env)
    check_checkpoint(checkpoint)
    check_lmms_eval_installed()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    before = modification_times(output_dir)
    code = stream(command, env)
    if code != 0:
        raise XmasError(f"lmms-eval exited with code {code} (its output is above): {shlex.join(command)}")
    written = [path for path, mtime in modification_times(output_dir).items() if before.get(path) != mtime]
    if not written:
        # lmms-eval catches errors during evaluation, prints them and still exits 0.
        raise XmasError(f"{output_dir}: lmms-eval exited 0 but wrote no new results file; "
                        f"its output above says why: {shlex.join(command)}")
    return parse_results(newest(written), names)
