"""Rule evaluate: greedy answers on a held-out split scored by normalized exact match (the lmms-eval
suite is tested in tests/evaluation/)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from xmas.data.annotations import read_all
from xmas.errors import XmasError
from xmas.evaluation.grouping import benchmark_names
from xmas.io import write_records
from xmas.stages.evaluate import normalize_answer, question_and_answer


@pytest.fixture(scope="module")
def subset(small_demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("subset") / "subset.json"
    write_records(read_all(small_demo["train"])[:24], path)
    return path


def test_finetune_then_evaluate_on_the_demo_test_split(tiny_checkpoint, subset, small_demo, tmp_path):
    target, scores = tmp_path / "target", tmp_path / "scores.tsv"
    xmas = [sys.executable, "-m", "xmas"]
    subprocess.run(
        [
            *xmas,
            "finetune-target",
            "--base",
            str(tiny_checkpoint),
            "--subset",
            str(subset),
            "--image-root",
            str(small_demo["images"]),
            "--out",
            str(target),
            "--lora-r",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--learning-rate",
            "1e-3",
            "--stats",
            str(tmp_path / "ft.json"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    run = json.loads((target / "xmas_finetune.json").read_text())
    assert run["records"] == 24 and len(run["losses"]) == 3
    subprocess.run(
        [
            *xmas,
            "evaluate",
            "--model",
            str(target),
            "--test",
            str(small_demo["test"]),
            "--image-root",
            str(small_demo["images"]),
            "--out",
            str(scores),
            "--batch-size",
            "7",
            "--stats",
            str(tmp_path / "ev.json"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    test = read_all(small_demo["test"])
    table = pd.read_csv(scores, sep="\t")
    assert list(table.columns) == ["benchmark", "score", "n"]
    assert dict(zip(table.benchmark, table.n)) == pd.Series([r["question_type"] for r in test]).value_counts().to_dict()
    assert table.score.between(0, 100).all()
    predictions = pd.read_parquet(scores.with_suffix(".predictions.parquet"))
    assert len(predictions) == len(test) and predictions.answer.map(lambda a: isinstance(a, str)).all()
    correct = [normalize_answer(a) == normalize_answer(r) for a, r in zip(predictions.answer, predictions.reference)]
    assert predictions.correct.tolist() == correct
    stats = json.loads((tmp_path / "ev.json").read_text())
    assert stats["counts"]["in"] == len(test) and stats["counts"]["correct"] == sum(correct)


@pytest.mark.parametrize(
    "answer, reference", [("The Two.", "2"), ("  blue ", "Blue"), ("a red circle", "red circle"), ("ten", "10")]
)
def test_answers_match_after_normalization(answer, reference):
    assert normalize_answer(answer) == normalize_answer(reference)


def test_normalization_keeps_different_answers_apart():
    assert normalize_answer("blue") != normalize_answer("blue square")
    assert normalize_answer("three") != normalize_answer("2")


def test_a_test_record_without_its_reference_answer_names_the_file_and_record(tmp_path):
    record = {"id": "q7", "conversations": [{"from": "human", "value": "What?"}]}
    with pytest.raises(XmasError, match=r"test.json: record 3 \(id 'q7'\): field 'conversations' must end with"):
        question_and_answer(record, tmp_path / "test.json", 3)


def test_benchmarks_are_question_types_else_sources_else_the_file():
    typed = [{"question_type": "color", "source": "a"}, {"question_type": "count", "source": "b"}]
    assert benchmark_names(typed, "split.json") == (["color", "count"], "question_type")
    sourced = [{"question_type": "color", "source": "a"}, {"source": "b"}]
    assert benchmark_names(sourced, "split.json") == (["a", "b"], "source")
    plain = [{"id": 1}, {"source": ""}]
    assert benchmark_names(plain, "data/my_split.json")[0] == ["my_split", "my_split"]
