"""Rule ``llamafactory``: the subsets as LLaMA-Factory datasets, in ``results/llamafactory/``.

One ShareGPT data file per subset (``messages`` with ``role``/``content``, an ``images`` list of absolute
paths) and the ``dataset_info.json`` that names them, so the folder is a LLaMA-Factory ``dataset_dir``:
``dataset_dir: results/llamafactory`` and ``dataset: xmas_0.5`` in a LLaMA-Factory training config. The
``<image>`` tags stay where the records have them: they are LLaMA-Factory's image placeholder too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xmas.data.annotations import iter_spans
from xmas.data.records import ROLES, image_paths
from xmas.errors import XmasError
from xmas.io import atomic_path
from xmas.progress import StageStats, add_input_arguments, log

DATASET_INFO = "dataset_info.json"
# How LLaMA-Factory reads the data files (its dataset_info.json format for multimodal ShareGPT data).
ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}


def sharegpt_record(record: dict, image_root: Path) -> dict:
    """A LLaVA record (as the subset holds it) in LLaMA-Factory's multimodal ShareGPT form."""
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
    return {"messages": messages, "images": [str(image_root / path) for path in image_paths(record)]}


def write_data_file(subset: Path, image_root: Path, out: Path) -> int:
    """The subset's records as a JSON list, one per line, streamed (a subset of millions of records is never
    held); returns how many."""
    count = 0
    with out.open("w", encoding="utf-8") as file:
        file.write("[")
        for span in iter_spans(subset):
            try:
                record = sharegpt_record(span.record, image_root)
            except (KeyError, TypeError, AttributeError) as error:
                raise XmasError(f"{subset}: record {span.index} is not a LLaVA record (lacks {error})") from None
            file.write(("\n" if count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
            count += 1
        file.write("\n]\n")
    return count


def export(subsets: list[tuple[str, Path]], image_root: Path, out: Path, stats: StageStats) -> None:
    names = [name for name, _ in subsets]
    if len(set(names)) < len(names):
        raise XmasError(f"dataset names must differ: {', '.join(names)}")
    image_root = Path(image_root).absolute()
    with atomic_path(out) as tmp:
        tmp.mkdir()
        info = {}
        for name, subset in subsets:
            file_name = f"{name}.json"
            stats.add("records", write_data_file(Path(subset), image_root, tmp / file_name))
            info[name] = {"file_name": file_name, **ENTRY}
        (tmp / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    stats.add("datasets", len(subsets))
    log.info(
        "LLaMA-Factory datasets %s in %s: set `dataset_dir: %s` and `dataset: <name>` in its training config",
        ", ".join(names),
        out,
        out,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subset",
        nargs=2,
        action="append",
        required=True,
        metavar=("NAME", "PATH"),
        help="a dataset name and the subset (LLaVA JSON) to write under it; repeat for each subset",
    )
    add_input_arguments(parser, "image_root")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (LLaMA-Factory's dataset_dir)")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("llamafactory")
    export([(name, Path(path)) for name, path in args.subset], args.image_root, args.out, stats)
    stats.finish(args.stats)
