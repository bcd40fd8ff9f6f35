"""A held-out split in our LLaVA format as local lmms-eval tasks, one task per benchmark: per question
type, else per source, else one (``xmas.evaluation.grouping``, as the exact-match suite groups them).

``write_local_tasks`` writes a folder that lmms-eval reads with ``--include_path``: per benchmark
a task YAML and its questions as JSON lines (read with the ``json`` builder of ``datasets``, so
nothing is downloaded), and ``utils.py`` (a copy of ``xmas.evaluation.heldout_task_utils``) with the
functions the YAMLs name. Each question is the user's turn as the checkpoint's encoding renders it
(``<image>`` where ``image_position`` puts it), so lmms-eval's ``llava_hf`` prompts the model as
``xmas evaluate --suite exact-match`` does; answers are scored by the same normalized exact match.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from xmas.data.annotations import read_all
from xmas.data.records import IMAGE_TAG, InvalidRecord, image_paths, to_messages
from xmas.errors import XmasError
from xmas.evaluation import heldout_task_utils
from xmas.evaluation.grouping import benchmark_names

# The task names are this prefix and the benchmark; the rows of the scores keep the benchmark.
TASK_PREFIX = "xmas_heldout_"
METRIC = "exact_match"  # the key process_results returns; 0/1 per question, mean over the task
UTILS = "utils.py"


@dataclass(frozen=True)
class LocalTask:
    name: str  # lmms-eval task name
    benchmark: str  # the row it is reported as
    questions: int


def task_name(benchmark: str) -> str:
    return TASK_PREFIX + re.sub(r"\W+", "_", benchmark).strip("_").lower()


def user_turn(record: dict, where: str, image_position: str) -> list[dict]:
    """The single question as chat items (``{"type": "image"}``, ``{"type": "text", "text": ...}``)."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) != 2 or [turn.get("from") for turn in turns] != ["human", "gpt"]:
        raise XmasError(
            f"{where}: field 'conversations' must be one question and its answer (a 'human' then a "
            "'gpt' turn); lmms-eval asks one question per image"
        )
    return to_messages(record, image_position)[0]["content"]


def as_text(content: list[dict]) -> str:
    """The items as the chat templates write them: each image as ``<image>``, the text as it is."""
    return "".join(IMAGE_TAG if item["type"] == "image" else item["text"] for item in content)


def image_files(record: dict, where: str, image_root: Path) -> list[str]:
    try:
        paths = image_paths(record)
    except InvalidRecord as error:
        raise XmasError(f"{where}: {error.detail}") from None
    files = []
    for path in paths:
        file = (image_root / path).resolve()
        if not file.is_file():
            raise XmasError(f"{where}: image {path!r} not found under the image root {image_root}")
        files.append(str(file))
    return files


def doc_of(record: dict, where: str, image_root: Path, image_position: str, benchmark: str) -> dict:
    content, images = user_turn(record, where, image_position), image_files(record, where, image_root)
    tags = sum(item["type"] == "image" for item in content)
    if tags != len(images):
        raise XmasError(f"{where}: the question has {tags} {IMAGE_TAG} tag(s) for {len(images)} image(s)")
    return {
        "id": str(record.get("id")),
        "content": content,
        "question": as_text(content),
        "answer": record["conversations"][1]["value"],
        "images": images,
        "benchmark": benchmark,
    }


def task_yaml(name: str, data: Path, cache: Path, max_new_tokens: int) -> str:
    # JSON strings are YAML strings: any path is quoted safely. The !function tags keep the text hand-written.
    return "\n".join(
        [
            f"task: {json.dumps(name)}",
            "dataset_path: json",
            "dataset_kwargs:",
            f"  data_files: {{test: {json.dumps(str(data))}}}",
            f"  cache_dir: {json.dumps(str(cache))}",
            "test_split: test",
            "output_type: generate_until",
            "doc_to_visual: !function utils.doc_to_visual",
            "doc_to_text: !function utils.doc_to_text",
            "doc_to_messages: !function utils.doc_to_messages",
            "doc_to_target: !function utils.doc_to_target",
            "process_results: !function utils.process_results",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  top_p: 1.0",
            "  num_beams: 1",
            "  do_sample: false",
            "metric_list:",
            f"  - metric: {METRIC}",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            "  version: 0.0",
            "",
        ]
    )


def group_docs(test: Path, image_root: Path, image_position: str) -> tuple[dict[str, list[dict]], list[str]]:
    """The questions with an image, by benchmark, and the ids of those without one (left out)."""
    records = read_all(test)
    if not records:
        raise XmasError(f"{test}: no records to evaluate")
    groups: dict[str, list[dict]] = {}
    text_only = []
    for position, (record, benchmark) in enumerate(zip(records, benchmark_names(records, test)[0])):
        where = f"{test}: record {position} (id {record.get('id')!r})"
        doc = doc_of(record, where, image_root, image_position, benchmark)
        if doc["images"]:
            groups.setdefault(benchmark, []).append(doc)
        else:
            text_only.append(doc["id"])
    if not groups:
        raise XmasError(f"{test}: no record has an image; lmms-eval's llava_hf answers only questions about images")
    return groups, text_only


def check_names(groups: dict[str, list[dict]], test: Path) -> None:
    names: dict[str, str] = {}
    for benchmark in groups:
        name = task_name(benchmark)
        if name == TASK_PREFIX or name in names:
            other = f" and {names[name]!r}" if name in names else ""
            raise XmasError(
                f"{test}: benchmark {benchmark!r}{other} give the lmms-eval task name "
                f"{name!r}; benchmarks must differ in letters or digits"
            )
        names[name] = benchmark


@dataclass(frozen=True)
class LocalTasks:
    folder: Path  # for --include_path
    tasks: list[LocalTask]
    text_only: list[str]  # ids of the questions left out: llava_hf answers them with an empty string


def write_local_tasks(
    test: str | Path, image_root: str | Path, out: str | Path, image_position: str = "front", max_new_tokens: int = 8
) -> LocalTasks:
    """Write the task folder ``out`` (replacing it) from the held-out split ``test``; one task per benchmark.

    Questions without an image are left out: lmms-eval's ``llava_hf`` builds no inputs for them and
    answers with an empty string, which would count as wrong.
    """
    test, image_root, out = Path(test), Path(image_root), Path(out)
    groups, text_only = group_docs(test, image_root, image_position)
    check_names(groups, test)
    shutil.rmtree(out, ignore_errors=True)
    (out / "data").mkdir(parents=True)
    shutil.copyfile(heldout_task_utils.__file__, out / UTILS)
    tasks = []
    for benchmark, docs in sorted(groups.items()):
        name = task_name(benchmark)
        data = (out / "data" / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
        (out / f"{name}.yaml").write_text(task_yaml(name, data, (out / "hf-cache").resolve(), max_new_tokens))
        tasks.append(LocalTask(name, benchmark, len(docs)))
    return LocalTasks(out.resolve(), tasks, text_only)
