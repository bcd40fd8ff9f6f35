"""Rule ``evaluate``: score a fine-tuned target: one row (benchmark, score) per benchmark, written as a TSV.

``--suite exact-match``: a held-out LLaVA-format split (the demo's, or any), one benchmark per
question type, else per source, else one (``xmas.evaluation.grouping``). The target answers each
question by greedy generation and scores by normalized exact match (accuracy in %).
``--suite lmms-eval``: the paper's benchmarks, or any lmms-eval task, through lmms-eval (see
``xmas.evaluation.lmms_eval``); the benchmark ``heldout`` is the held-out split as local lmms-eval tasks
(``xmas.evaluation.local_task``), grouped and scored like the exact-match suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from xmas.data.annotations import read_all
from xmas.data.records import to_messages
from xmas.errors import XmasError
from xmas.evaluation.grouping import benchmark_names
from xmas.evaluation.heldout_task_utils import normalize_answer
from xmas.io import atomic_path, write_parquet
from xmas.models.checkpoints import load_target
from xmas.models.encoding import ConversationEncoder, Encoding
from xmas.progress import StageStats, add_threads_argument, log, progress, use_threads
from xmas.settings import add_settings, settings_of
from xmas.training.engine import compute_device

# In evaluation.benchmarks of the lmms-eval suite: the held-out split (--test) as local lmms-eval tasks.
HELDOUT = "heldout"


def question_and_answer(
    record: dict, path: Path, position: int, image_position: str = "front"
) -> tuple[list[dict], str]:
    """The chat messages up to the last question, and the reference answer."""
    where = f"{path}: record {position} (id {record.get('id')!r})"
    turns = record.get("conversations") if isinstance(record, dict) else None
    if (
        not isinstance(turns, list)
        or len(turns) < 2
        or not isinstance(turns[-1], dict)
        or turns[-1].get("from") != "gpt"
    ):
        raise XmasError(f"{where}: field 'conversations' must end with the reference answer (a 'gpt' turn)")
    return to_messages(record, image_position)[:-1], turns[-1]["value"]


class AnswerGenerator:
    """Greedy answers for a batch of questions: the generation prompt of the chat template, the images as
    training encodes them, left padding."""

    def __init__(self, model, encoder: ConversationEncoder, max_new_tokens: int):
        self.model, self.encoder = model, encoder
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, prompts: list[list[dict]], records: list[dict]) -> list[str]:
        items = [self.encoder.prompt(messages, record) for messages, record in zip(prompts, records)]
        inputs = self.encoder.collate(items, padding_side="left")
        tokenizer = self.encoder.tokenizer
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_exact_match(
    model_path: Path, test: Path, image_root: Path, batch_size: int, max_new_tokens: int, stats: StageStats
) -> tuple[pd.DataFrame, pd.DataFrame]:
    records = read_all(test)
    if not records:
        raise XmasError(f"{test}: the held-out split has no records")
    image_position = Encoding.load(model_path).image_position
    questions = [question_and_answer(record, test, position, image_position) for position, record in enumerate(records)]
    benchmarks, grouped_by = benchmark_names(records, test)
    log.info("%s: %d questions, one benchmark per value of %s", test, len(records), grouped_by)
    device = compute_device()
    model, processor = load_target(model_path)
    model.to(device).eval()
    encoder = ConversationEncoder.of_checkpoint(model_path, processor, image_root, device)
    generate = AnswerGenerator(model, encoder, max_new_tokens)
    answers = []
    starts = range(0, len(records), batch_size)
    for start in progress(starts, total=len(starts), desc="answer the test questions", unit="batch"):
        batch = slice(start, start + batch_size)
        answers += generate([messages for messages, _ in questions[batch]], records[batch])
    predictions = pd.DataFrame(
        {
            "id": [str(record.get("id")) for record in records],
            "benchmark": benchmarks,
            "reference": [reference for _, reference in questions],
            "answer": answers,
        }
    )
    predictions["correct"] = [
        normalize_answer(a) == normalize_answer(r) for a, r in zip(predictions.answer, predictions.reference)
    ]
    stats.add("in", len(records))
    stats.add("correct", int(predictions.correct.sum()))
    return accuracy_per_benchmark(predictions), predictions


def accuracy_per_benchmark(predictions: pd.DataFrame) -> pd.DataFrame:
    grouped = predictions.groupby("benchmark", sort=True).correct
    return pd.DataFrame({"score": (100 * grouped.mean()).round(4), "n": grouped.size()}).reset_index()


def heldout_benchmarks(
    model_path: Path, test: Path | None, image_root: Path | None, folder: Path, max_new_tokens: int, stats: StageStats
) -> tuple[dict, Path]:
    """The held-out split as local lmms-eval tasks: their benchmarks (as the exact-match suite groups them)
    and task folder."""
    from xmas.evaluation.lmms_eval import Benchmark
    from xmas.evaluation.local_task import METRIC, write_local_tasks

    if test is None or image_root is None:
        raise XmasError(
            f"benchmark {HELDOUT!r} of the lmms-eval suite needs --test and --image-root "
            "(evaluation.test and evaluation.test_image_root): the held-out split it is built from"
        )
    local = write_local_tasks(test, image_root, folder, Encoding.load(model_path).image_position, max_new_tokens)
    if local.text_only:
        log.warning(
            "%s: %d question(s) without an image left out of the lmms-eval tasks (lmms-eval's llava_hf "
            "answers only questions about images): %s%s",
            test,
            len(local.text_only),
            ", ".join(local.text_only[:5]),
            " ..." if len(local.text_only) > 5 else "",
        )
    stats.add("text_only_left_out", len(local.text_only))
    benchmarks = {
        task.benchmark: Benchmark(task.name, METRIC, 100.0, note=f"{task.questions} held-out questions")
        for task in local.tasks
    }
    return benchmarks, local.folder


def expand_heldout(names: list[str], heldout: dict) -> list[str]:
    clash = sorted(set(heldout) & set(names))
    if clash:
        raise XmasError(
            f"benchmark(s) {', '.join(clash)} of the held-out split have the name of a benchmark "
            f"also listed in evaluation.benchmarks; rename one of them"
        )
    expanded = []
    for name in names:
        expanded += list(heldout) if name == HELDOUT else [name]
    return expanded


class Held(NamedTuple):
    """The held-out split: its records (LLaVA format) and the folder their image paths are relative to."""

    records: Path | None
    image_root: Path | None


def lmms_benchmarks(model_path: Path, settings, test: Held, work_dir: Path, stats: StageStats):
    """The benchmarks to run, the table of their tasks and metrics, and the local task folder (or None)."""
    from xmas.evaluation.lmms_eval import benchmark_table, check_benchmarks, check_judge

    names, heldout, include_path = list(settings.benchmarks), {}, None
    if HELDOUT in names:
        heldout, include_path = heldout_benchmarks(
            model_path, test.records, test.image_root, work_dir / "heldout-tasks", settings.max_new_tokens, stats
        )
        names = expand_heldout(names, heldout)
    table = benchmark_table(settings.metrics, heldout)
    names = check_benchmarks(names, table)
    check_judge(names, table, settings.allow_judge, os.environ)
    return names, table, include_path


@contextlib.contextmanager
def lmms_checkpoint(model_path: Path, work_dir: Path) -> Iterator[Path]:
    """The checkpoint as lmms-eval loads it (a LoRA run merged, the chat template taking string content);
    what was written for it is removed afterwards."""
    from xmas.evaluation.lmms_eval import evaluation_checkpoint

    checkpoint, merged, linked = model_path, work_dir / "merged-checkpoint", work_dir / "checkpoint"
    try:
        if (model_path / "adapter_config.json").is_file():
            model, processor = load_target(model_path, torch.bfloat16)
            with atomic_path(merged) as tmp:
                model.save_pretrained(tmp)
                processor.save_pretrained(tmp)
            checkpoint = merged
        yield evaluation_checkpoint(checkpoint, linked)
    finally:
        shutil.rmtree(merged, ignore_errors=True)
        shutil.rmtree(linked, ignore_errors=True)


def lmms_eval_model(checkpoint: Path, extra_model_args: dict) -> tuple[str, dict]:
    """lmms-eval's model for the checkpoint's family, and its model arguments: the image bounds the checkpoint
    was trained with (where the family has them), then the config's ``evaluation.model_args``."""
    from xmas.models.checkpoints import load_processor
    from xmas.models.families import family_of
    from xmas.models.image_tokens import pixel_bounds

    processor = load_processor(checkpoint)
    family = family_of(processor)
    if not family.lmms_eval_model:
        raise XmasError(
            f"{checkpoint}: lmms-eval has no model for {family.name} models; score them with "
            "evaluation.suite: exact-match"
        )
    return family.lmms_eval_model, {**pixel_bounds(processor.image_processor, family), **extra_model_args}


def evaluate_lmms(model_path: Path, settings, test: Held, work_dir: Path, stats: StageStats) -> pd.DataFrame:
    """``evaluation.benchmarks`` through lmms-eval (``settings``: the evaluate stage's): one row (benchmark,
    score, n) each."""
    from xmas.evaluation.lmms_eval import check_lmms_eval_installed, run_lmms_eval

    names, table, include_path = lmms_benchmarks(model_path, settings, test, work_dir, stats)
    check_lmms_eval_installed(judge=any(table[name].needs_judge for name in names))
    with lmms_checkpoint(model_path, work_dir) as checkpoint:
        model, model_args = lmms_eval_model(checkpoint, settings.model_args)
        # lmms-eval's llava_hf answers one question at a time (it asserts batch_size 1).
        rows = run_lmms_eval(
            checkpoint,
            names,
            work_dir / "lmms-eval",
            gpus=settings.gpus,
            batch_size=1,
            model=model,
            extra_model_args=model_args,
            allow_judge=settings.allow_judge,
            table=table,
            include_path=include_path,
        )
    stats.add("in", len(names))
    stats.set("lmms_eval_model", model)
    return pd.DataFrame(rows, columns=["benchmark", "score", "n"]).astype({"n": "Int64"})


def write_scores(scores: pd.DataFrame, out: Path) -> None:
    with atomic_path(out) as tmp:
        scores.to_csv(tmp, sep="\t", index=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, type=Path, help="fine-tuned target folder (from `xmas finetune-target`)"
    )
    parser.add_argument("--out", required=True, type=Path, help="TSV to write: benchmark, score[, n]")
    parser.add_argument(
        "--test",
        type=Path,
        help="exact-match suite and the lmms-eval suite's benchmark 'heldout': "
        "held-out split (LLaVA format; grouped by question_type, else source, else one benchmark)",
    )
    parser.add_argument(
        "--image-root", type=Path, help="with --test: folder the test records' image paths are relative to"
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        help="exact-match suite: parquet of every answer (default: <out>.predictions.parquet)",
    )
    parser.add_argument("--work-dir", type=Path, help="lmms-eval suite: its outputs (default: <out> without .tsv)")
    add_threads_argument(parser)
    add_settings(parser, "evaluate")


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    stats = StageStats(f"evaluate {args.model}")
    settings = settings_of(args, "evaluate")
    if settings.suite == "exact-match":
        if args.test is None or args.image_root is None:
            raise XmasError("--suite exact-match needs --test and --image-root")
        scores, predictions = evaluate_exact_match(
            args.model, args.test, args.image_root, settings.batch_size, settings.max_new_tokens, stats
        )
        write_parquet(predictions, args.predictions or args.out.with_suffix(".predictions.parquet"))
    else:
        work_dir = args.work_dir or args.out.with_suffix("")
        scores = evaluate_lmms(args.model, settings, Held(args.test, args.image_root), work_dir, stats)
    stats.add("out", len(scores))
    write_scores(scores, args.out)
    stats.finish(args.stats)
