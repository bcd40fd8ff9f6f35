"""Rule ``llamafactory``: the subsets as LLaMA-Factory datasets, in ``results/llamafactory/``.

One ShareGPT data file per subset (``messages`` with ``role``/``content``, an ``images`` list of absolute
paths; embedded images are written to ``images/<name>/``) and the ``dataset_info.json`` that names them, so
the folder is a LLaMA-Factory ``dataset_dir``: ``dataset_dir: results/llamafactory`` and ``dataset: xmas_0.5``
in a LLaMA-Factory training config. The ``<image>`` tags stay where the records have them: they are
LLaMA-Factory's image placeholder too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path, PurePosixPath

from xmas.data.records import ROLES, images_with_bytes
from xmas.data.sources import Source, as_source, stage_source
from xmas.errors import XmasError
from xmas.io import atomic_path
from xmas.progress import StageStats, add_input_arguments, log
from xmas.settings import add_settings, settings_of

DATASET_INFO = "dataset_info.json"
# How LLaMA-Factory reads the data files (its dataset_info.json format for multimodal ShareGPT data).
ENTRY = {
    "formatting": "sharegpt",
    "columns": {"messages": "messages", "images": "images"},
    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
}


def sharegpt_record(record: dict, images: list[str]) -> dict:
    """A LLaVA record (as the subset holds it) in LLaMA-Factory's multimodal ShareGPT form, its images at
    ``images``."""
    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
    return {"messages": messages, "images": images}


def image_locations(record: dict, index: int, image_root: Path | None, embedded_folder: Path, final: Path) -> list[str]:
    """Absolute paths of the record's images: its files under the image root, and its embedded images, written
    to ``embedded_folder`` (whose path once the export is in place is ``final``)."""
    locations = []
    for position, (path, blob) in enumerate(images_with_bytes(record)):
        if blob is None:
            if image_root is None:
                raise XmasError(f"record {index} names image file {path!r}, but no image root was given")
            locations.append(str(image_root / path))
            continue
        name = f"{index}-{position}{PurePosixPath(path).suffix}"
        embedded_folder.mkdir(parents=True, exist_ok=True)
        (embedded_folder / name).write_bytes(blob)
        locations.append(str(final / name))
    return locations


def write_data_file(subset: Source, image_root: Path | None, out: Path, final: Path) -> int:
    """The subset's records as a JSON list, one per line, streamed (a subset of millions of records is never
    held), embedded images written beside it under ``images/<name>/``; returns how many."""
    count = 0
    folder = Path("images") / out.stem
    with out.open("w", encoding="utf-8") as file:
        file.write("[")
        for found in subset.records():
            try:
                images = image_locations(found.record, found.index, image_root, out.parent / folder, final / folder)
                record = sharegpt_record(found.record, images)
            except (KeyError, TypeError, AttributeError) as error:
                raise XmasError(f"{subset.given}: record {found.index} is not a LLaVA record (lacks {error})") from None
            file.write(("\n" if count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
            count += 1
        file.write("\n]\n")
    return count


def export(subsets: list[tuple[str, Source | Path]], image_root: Path | None, out: Path, stats: StageStats) -> None:
    names = [name for name, _ in subsets]
    if len(set(names)) < len(names):
        raise XmasError(f"dataset names must differ: {', '.join(names)}")
    image_root = Path(image_root).absolute() if image_root is not None else None
    with atomic_path(out) as tmp:
        tmp.mkdir()
        info = {}
        for name, subset in subsets:
            subset = as_source(subset)
            file_name = f"{name}.json"
            stats.add("records", write_data_file(subset, image_root, tmp / file_name, Path(out).absolute()))
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
        help="a dataset name and the subset (as `xmas sample` writes it) to write under it; repeat for each subset",
    )
    add_input_arguments(parser, "image_root")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (LLaMA-Factory's dataset_dir)")
    add_settings(parser, "llamafactory")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("llamafactory")
    settings = settings_of(args, "llamafactory")
    export([(name, stage_source(path, settings)) for name, path in args.subset], args.image_root, args.out, stats)
    stats.finish(args.stats)
