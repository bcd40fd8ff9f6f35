"""The held-out split as local lmms-eval tasks: the task folder, its docs, and what cannot be asked."""

from __future__ import annotations

import json

import pytest
import yaml

from xmas.data.annotations import read_all
from xmas.data.records import to_messages
from xmas.errors import XmasError
from xmas.evaluation import heldout_task_utils as utils
from xmas.evaluation.local_task import METRIC, as_text, task_name, write_local_tasks
from xmas.io import write_records


class TaskLoader(yaml.SafeLoader):
    """lmms-eval's task YAMLs tag functions of utils.py with !function; read the tag as its text."""


TaskLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


@pytest.fixture(scope="module")
def local(small_demo, tmp_path_factory):
    return write_local_tasks(small_demo["test"], small_demo["images"], tmp_path_factory.mktemp("tasks") / "heldout")


def docs_of(local, name):
    return [json.loads(line) for line in (local.folder / "data" / f"{name}.jsonl").read_text().splitlines()]


def test_one_task_per_question_type_with_images_and_text_only_questions_left_out(local, small_demo):
    records = read_all(small_demo["test"])
    with_image = [record for record in records if record.get("image")]
    assert [task.benchmark for task in local.tasks] == sorted({r["question_type"] for r in with_image})
    assert sum(task.questions for task in local.tasks) == len(with_image)
    assert local.text_only == [record["id"] for record in records if not record.get("image")]
    assert sorted(path.name for path in local.folder.glob("*.yaml")) == sorted(f"{t.name}.yaml" for t in local.tasks)


def test_task_yaml_names_local_data_and_the_functions_of_its_utils(local):
    task = local.tasks[0]
    config = yaml.load((local.folder / f"{task.name}.yaml").read_text(), Loader=TaskLoader)
    assert config["task"] == task.name and config["test_split"] == "test" and config["dataset_path"] == "json"
    data = config["dataset_kwargs"]["data_files"]["test"]
    assert data == str(local.folder / "data" / f"{task.name}.jsonl")
    assert config["dataset_kwargs"]["cache_dir"].startswith(str(local.folder))
    assert config["metric_list"] == [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}]
    functions = [
        config[key] for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "doc_to_messages", "process_results")
    ]
    assert all(f.startswith("!function utils.") and hasattr(utils, f.split(".")[1]) for f in functions)
    assert (local.folder / "utils.py").read_text() == open(utils.__file__).read()


def test_docs_carry_the_question_as_the_encoding_renders_it(local, small_demo):
    records = {record["id"]: record for record in read_all(small_demo["test"])}
    for task in local.tasks:
        for doc in docs_of(local, task.name):
            record = records[doc["id"]]
            content = to_messages(record, "front")[0]["content"]
            assert doc["content"] == content and doc["question"] == as_text(content)
            assert doc["question"].startswith("<image>\n") and doc["answer"] == record["conversations"][1]["value"]
            assert doc["images"] == [str((small_demo["images"] / record["image"]).resolve())]


def test_utils_build_the_request_lmms_eval_sends(local):
    doc = docs_of(local, local.tasks[0].name)[0]
    [image] = utils.doc_to_visual(doc)
    assert image.mode == "RGB" and utils.doc_to_text(doc) == doc["question"]
    assert utils.doc_to_target(doc) == doc["answer"]
    [message] = utils.doc_to_messages(doc)
    assert message["role"] == "user" and [item["type"] for item in message["content"]] == ["image", "text"]
    assert message["content"][1]["text"] == doc["question"].removeprefix("<image>")


@pytest.mark.parametrize(("answer", "correct"), [("The Two.", 1.0), ("two apples", 0.0)])
def test_process_results_scores_by_normalized_exact_match(answer, correct):
    assert utils.process_results({"answer": "2"}, [answer]) == {METRIC: correct}


def record(question_type, turns=("What color?\n<image>", "red"), image="shapes/test/000000.png", id_="q1"):
    sides = ["human", "gpt"] * len(turns)
    return {
        "id": id_,
        "image": image,
        "question_type": question_type,
        "conversations": [{"from": side, "value": value} for side, value in zip(sides, turns)],
    }


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [record("color", turns=("Hi <image>", "hello", "And?", "red"))],
            r"record 0 \(id 'q1'\): field 'conversations'",
        ),
        ([record("color", image="nowhere.png")], r"image 'nowhere.png' not found"),
        ([record("color", image=7)], r"record 0 \(id 'q1'\): 'image' must be a string"),
        ([record("color", turns=("What color?", "red"))], r"0 <image> tag\(s\) for 1 image\(s\)"),
        ([record("a b"), record("a-b", id_="q2")], "benchmark 'a-b' and 'a b'"),
        ([record("color", turns=("What is 2+2?", "4"), image=None)], "no record has an image"),
    ],
)
def test_what_lmms_eval_cannot_ask_is_named(records, message, small_demo, tmp_path):
    test = tmp_path / "test.json"
    write_records(records, test)
    with pytest.raises(XmasError, match=message):
        write_local_tasks(test, small_demo["images"], tmp_path / "tasks")


def test_without_question_types_the_tasks_are_the_sources_else_the_file(small_demo, tmp_path):
    test = tmp_path / "my_split.json"
    write_records([{**record(""), "source": "coco"}, {**record("color", id_="q2"), "source": "gqa"}], test)
    tasks = write_local_tasks(test, small_demo["images"], tmp_path / "by-source").tasks
    assert [(task.name, task.benchmark) for task in tasks] == [
        ("xmas_heldout_coco", "coco"),
        ("xmas_heldout_gqa", "gqa"),
    ]
    write_records([record("", id_="q1"), record("color", id_="q2")], test)
    tasks = write_local_tasks(test, small_demo["images"], tmp_path / "one").tasks
    assert [(task.name, task.benchmark, task.questions) for task in tasks] == [("xmas_heldout_my_split", "my_split", 2)]


def test_task_names_are_lmms_eval_names():
    assert task_name("Spatial Relation/2D") == "xmas_heldout_spatial_relation_2d"
