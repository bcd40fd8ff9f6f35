"""Evaluate a fine-tuned target checkpoint with lmms-eval: the paper's 10 benchmarks or any lmms-eval task.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval, installed by tools/install-lmms-eval.sh)
runs as a separate process, so this module needs neither it nor torch at import time: it builds the
command line, runs it, finds the results file lmms-eval writes
(``<output>/<model folder>/<YYYYMMDD_HHMMSS>_results.json``) and turns it into ``(benchmark, score, n)``
rows. Which metric a benchmark reports, and on what scale, comes from a table: the paper's 10
benchmarks are built in (:data:`BENCHMARKS`), the config's ``evaluation.metrics`` adds any other task.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from xmas.errors import XmasError

# lmms-eval suffixes every metric key with the filter it ran under; most tasks run without one.
FILTER = "none"
# Either key lets lmms-eval's judge-based tasks call GPT (API_TYPE=openai is its default, azure the other).
JUDGE_KEYS = ("OPENAI_API_KEY", "AZURE_API_KEY")
# lmms-eval names the file after its start time ("%Y%m%d_%H%M%S"); its task helpers also write
# files such as submissions/mmbench_en_dev_results.json, which must never be mistaken for it.
RESULTS_NAME = re.compile(r"(?P<stamp>\d[\d_T.:-]*)_results\.json")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# METRIC or METRIC*SCALE; METRIC may name its filter ("exact_match,flexible-extract"), else ",none" is meant.
METRIC_SPEC = re.compile(r"(?P<metric>[^*\s]+?)(?:\*(?P<scale>[0-9.eE+-]+))?")
# lmms-eval's (simple) llava_hf passes each turn's content as one string, "<image>" inside, where xmas's chat
# templates iterate over content items; put before a template, this makes such a string one text item, which
# the templates write as is, and leaves list content alone.
STRING_CONTENT_PREAMBLE = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], "
    "'content': [{'type': 'text', 'text': message['content']}]}] -%}"
    "{%- else -%}{%- set ns.messages = ns.messages + [message] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}\n"
)
CHAT_TEMPLATE = "chat_template.jinja"
# The lmms-eval release this module is written against (command-line flags, results layout).
TESTED_VERSION = "0.7.3"
INSTALL_HINT = "install it with tools/install-lmms-eval.sh (docs/lmms-eval.md)"


@dataclass(frozen=True)
class Benchmark:
    task: str  # lmms-eval task name
    metric: str  # metric name in the results file, without the ",none" filter suffix unless it has another filter
    scale: float  # multiply the stored value by this to get the reported number
    needs_judge: bool = False  # scores only with a paid GPT judge
    note: str = ""

    @property
    def key(self) -> str:
        return self.metric if "," in self.metric else f"{self.metric},{FILTER}"


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
    # MME perception score is a sum over 10 categories (0..2000) and is reported as is. lmms-eval <= 0.2.4
    # wrote it as "mme_percetion_score"; set evaluation.metrics: {mme: mme_percetion_score} for those.
    "mme": Benchmark("mme", "mme_perception_score", 1.0, False, "perception score, as in the paper"),
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


def parse_metric(name: str, spec: object) -> tuple[str, float]:
    """``METRIC`` or ``METRIC*SCALE`` (evaluation.metrics) as (metric, scale)."""
    match = METRIC_SPEC.fullmatch(str(spec).strip())
    scale = None
    if match:
        try:
            scale = float(match["scale"] or 1.0)
        except ValueError:
            pass
    if scale is None:
        raise XmasError(
            f"evaluation.metrics.{name}: {spec!r} is not METRIC or METRIC*SCALE "
            "(e.g. exact_match*100: the metric lmms-eval reports, times 100)"
        )
    return match["metric"], scale


def benchmark_table(
    metrics: Mapping[str, object] | None = None, extra: Mapping[str, Benchmark] | None = None
) -> dict[str, Benchmark]:
    """The built-in benchmarks, then ``extra`` (e.g. local tasks), then the config's ``evaluation.metrics``.

    A ``metrics`` entry named after a benchmark changes its metric; any other name is an lmms-eval task.
    """
    table = {**BENCHMARKS, **(extra or {})}
    for name, spec in (metrics or {}).items():
        metric, scale = parse_metric(name, spec)
        known = table.get(name)
        table[name] = replace(known, metric=metric, scale=scale) if known else Benchmark(name, metric, scale)
    return table


def check_benchmarks(benchmarks: Iterable[str], table: Mapping[str, Benchmark] = BENCHMARKS) -> list[str]:
    names = list(benchmarks)
    if not names:
        raise XmasError(
            f"no benchmarks to evaluate; choose from {', '.join(table)}, or any lmms-eval task "
            "named in evaluation.metrics"
        )
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise XmasError(f"benchmark(s) listed twice: {', '.join(twice)}")
    unknown = [name for name in names if name not in table]
    if unknown:
        example = unknown[0]
        raise XmasError(
            f"no metric known for {', '.join(map(repr, unknown))}; built in: {', '.join(table)}. For any other "
            f"lmms-eval task, name the metric its results file reports in the config, e.g. evaluation.metrics: "
            f"{{{example}: exact_match*100}} (or --metrics {example}=exact_match*100)"
        )
    return names


def judge_key_present(env: Mapping[str, str]) -> bool:
    return any(env.get(key) for key in JUDGE_KEYS)


def check_judge(
    benchmarks: list[str], table: Mapping[str, Benchmark], allow_judge: bool, env: Mapping[str, str]
) -> None:
    judged = [name for name in benchmarks if table[name].needs_judge]
    if not judged or allow_judge or judge_key_present(env):
        return
    rest = [name for name in benchmarks if name not in judged]
    raise XmasError(
        f"{', '.join(judged)} needs a paid GPT judge, which lmms-eval reaches through {' or '.join(JUDGE_KEYS)}; "
        f"set the key, or leave it out with evaluation.benchmarks: [{', '.join(rest)}]"
    )


def default_model_args(gpus: int) -> dict[str, str]:
    """What llava_hf needs to land on the right device: it defaults to device=cuda and device_map="",
    which transformers rejects for a single process, so one process gets an explicit device_map."""
    if gpus == 0:
        return {"device": "cpu", "device_map": "cpu"}
    if gpus == 1:
        return {"device_map": "cuda"}
    return {}  # under accelerate launch, llava_hf puts each process on its own GPU when device_map is empty


def model_args(checkpoint: str | Path, gpus: int, extra_model_args: Mapping[str, object] | None) -> str:
    pairs = {"pretrained": str(checkpoint), **default_model_args(gpus), **(extra_model_args or {})}
    # lmms-eval splits --model_args on commas and "=", so neither may appear inside a value.
    for key, value in pairs.items():
        if "," in f"{key}{value}" or "=" in f"{key}{value}":
            raise XmasError(
                f"lmms-eval model argument {key}={value!r} contains ',' or '=', which lmms-eval "
                "cannot parse; rename the path or value"
            )
    return ",".join(f"{key}={value}" for key, value in pairs.items())


def launcher(gpus: int) -> list[str]:
    if gpus < 0:
        raise XmasError(f"gpus must be 0 (the CPU) or more, got {gpus}")
    if gpus <= 1:
        return [sys.executable, "-m", "lmms_eval"]
    # `accelerate launch` as a module of this interpreter, so the venv's accelerate is the one used.
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "-m", "lmms_eval"]


def unique_tasks(benchmarks: list[Benchmark]) -> list[str]:
    return list(dict.fromkeys(benchmark.task for benchmark in benchmarks))


def lmms_eval_command(
    checkpoint: str | Path,
    benchmarks: Iterable[str],
    output_dir: str | Path,
    gpus: int = 0,
    batch_size: int = 1,
    model: str = "llava_hf",
    extra_model_args: Mapping[str, object] | None = None,
    allow_judge: bool = False,
    env: Mapping[str, str] | None = None,
    table: Mapping[str, Benchmark] = BENCHMARKS,
    include_path: str | Path | None = None,
) -> list[str]:
    """The argv that evaluates ``checkpoint`` on ``benchmarks`` and writes results under ``output_dir``."""
    names = check_benchmarks(benchmarks, table)
    check_judge(names, table, allow_judge, os.environ if env is None else env)
    if batch_size < 1:
        raise XmasError(f"batch_size must be at least 1, got {batch_size}")
    command = launcher(gpus) + [
        "--model",
        model,
        "--model_args",
        model_args(checkpoint, gpus, extra_model_args),
        "--tasks",
        ",".join(unique_tasks([table[name] for name in names])),
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(output_dir),
        "--log_samples",
    ]
    if model == "llava_hf":
        # The simple llava_hf prompts as LLaVA-1.5 trains, "<image>\n" + the question as one string; the chat one
        # (lmms-eval's default) passes the image as a content item, which our chat templates write without "\n".
        command.append("--force_simple")
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    return command


def evaluation_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """``checkpoint`` as llava_hf can prompt it: ``out`` links to its files, but for a chat template that also
    takes string content (:data:`STRING_CONTENT_PREAMBLE`). A folder without ``chat_template.jinja`` is used as is.

    The template is fixed here rather than in xmas/resources/conversations.yaml because from-config models
    train their tokenizer on the words of the template: a new word there would change every demo model.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    template = checkpoint / CHAT_TEMPLATE
    if not template.is_file():
        return checkpoint
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for entry in checkpoint.iterdir():
        if entry.name != CHAT_TEMPLATE:
            (out / entry.name).symlink_to(entry.resolve())
    (out / CHAT_TEMPLATE).write_text(STRING_CONTENT_PREAMBLE + template.read_text(encoding="utf-8"), encoding="utf-8")
    return out


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
    return data


def score(path: Path, results: dict, name: str, benchmark: Benchmark) -> float:
    entry = results.get(benchmark.task)
    if not isinstance(entry, dict):
        raise XmasError(
            f"{path}: no results for task {benchmark.task!r} (benchmark {name}); "
            f"tasks present: {', '.join(sorted(results)) or 'none'}"
        )
    if benchmark.key not in entry:
        present = sorted(k for k in entry if k != "alias")
        raise XmasError(
            f"{path}: task {benchmark.task!r} has no metric {benchmark.key!r}; keys present: "
            f"{', '.join(present)}; set the metric with evaluation.metrics: {{{name}: METRIC}}"
        )
    value = entry[benchmark.key]
    # Aggregations that fail in lmms-eval (e.g. a judge without a key) leave null or a string behind.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise XmasError(f"{path}: task {benchmark.task!r} metric {benchmark.key!r} is {value!r}, not a number")
    return float(value) * benchmark.scale


def questions(data: dict, task: str) -> int | None:
    """How many questions lmms-eval scored for ``task`` (None for a group, which has no count of its own)."""
    counts = data.get("n-samples", {}).get(task)
    if not isinstance(counts, dict):
        return None
    count = counts.get("effective", counts.get("original"))
    return count if isinstance(count, int) else None


def parse_results(
    path: str | Path, benchmarks: Iterable[str], table: Mapping[str, Benchmark] = BENCHMARKS
) -> list[tuple[str, float, int | None]]:
    """``(benchmark, score, questions)`` rows, in the order given, on each benchmark's reporting scale."""
    names = check_benchmarks(benchmarks, table)
    path = Path(path)
    data = load_results(path)
    return [
        (name, score(path, data["results"], name, table[name]), questions(data, table[name].task)) for name in names
    ]


def check_lmms_eval_installed(judge: bool = False) -> None:
    """lmms-eval 0.7 is importable, and with ``judge`` the client its GPT judge calls (which the script leaves out)."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise XmasError(f"lmms-eval is not installed in this environment; {INSTALL_HINT}")
    if judge and importlib.util.find_spec("openai") is None:
        raise XmasError(
            "a benchmark scored by a GPT judge is listed, and lmms-eval's judge needs the openai client: "
            "pip install openai"
        )
    try:
        version = importlib.metadata.version("lmms-eval")
    except importlib.metadata.PackageNotFoundError:
        return  # importable without package metadata (a source checkout on the path): trust it
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < (0, 7):
        raise XmasError(
            f"lmms-eval {version} is installed; xmas drives lmms-eval 0.7 (tested with "
            f"{TESTED_VERSION}): {INSTALL_HINT}"
        )


def check_checkpoint(checkpoint: str | Path) -> None:
    if not Path(checkpoint).exists() and not HUB_ID.fullmatch(str(checkpoint)):
        raise XmasError(f"{checkpoint}: checkpoint folder not found")


def stream(command: list[str], env: Mapping[str, str]) -> int:
    """Run ``command``, copying its output to our stderr line by line (stdout stays free for our own output)."""
    with subprocess.Popen(
        command, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
    ) as process:
        for line in process.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
        return process.wait()


def run_lmms_eval(
    checkpoint: str | Path,
    benchmarks: Iterable[str],
    output_dir: str | Path,
    gpus: int = 0,
    batch_size: int = 1,
    model: str = "llava_hf",
    extra_model_args: Mapping[str, object] | None = None,
    allow_judge: bool = False,
    extra_env: Mapping[str, str] | None = None,
    table: Mapping[str, Benchmark] = BENCHMARKS,
    include_path: str | Path | None = None,
) -> list[tuple[str, float, int | None]]:
    """Evaluate ``checkpoint`` with lmms-eval and return ``(benchmark, score, questions)`` rows.

    ``extra_env`` is laid over this process's environment for the lmms-eval process only.
    """
    names = check_benchmarks(benchmarks, table)
    env = {**os.environ, **(extra_env or {})}
    command = lmms_eval_command(
        checkpoint, names, output_dir, gpus, batch_size, model, extra_model_args, allow_judge, env, table, include_path
    )
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
        raise XmasError(
            f"{output_dir}: lmms-eval exited 0 but wrote no new results file; "
            f"its output above says why: {shlex.join(command)}"
        )
    return parse_results(newest(written), names, table)
