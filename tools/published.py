"""Datasets in the layouts they are published in on the Hugging Face Hub, written by the `datasets` library
itself (never typed by hand), from LLaVA records and their image files:

- LLaVA-OneVision-Data (and LLaVA-NeXT-Data): parquet shards of ``id``, ``image`` (an Image: a
  ``{bytes, path}`` struct), ``conversations`` (from/value turns) and ``data_source``;
- The Cauldron (and FineVision): ``images`` (a list of Images) and ``texts`` (user/assistant pairs with
  their ``source``), without ``<image>`` tags;
- a folder written by ``Dataset.save_to_disk``.
"""

from __future__ import annotations

from pathlib import Path

from xmas.data.records import IMAGE_TAG, image_paths


def features(layout: str):
    import datasets

    text = datasets.Value("string")
    if layout == "onevision":
        return datasets.Features(
            {
                "id": text,
                "image": datasets.Image(),
                "conversations": [{"from": text, "value": text}],
                "data_source": text,
            }
        )
    return datasets.Features(
        {"images": datasets.Sequence(datasets.Image()), "texts": [{"user": text, "assistant": text, "source": text}]}
    )


def embedded(image_root: Path, path: str) -> dict:
    return {"bytes": (image_root / path).read_bytes(), "path": Path(path).name}


def onevision_rows(records: list[dict], image_root: Path, source: str = "demo") -> dict[str, list]:
    """LLaVA records as LLaVA-OneVision-Data's columns (one image per record at most)."""
    return {
        "id": [record["id"] for record in records],
        "image": [embedded(image_root, image_paths(record)[0]) if image_paths(record) else None for record in records],
        "conversations": [record["conversations"] for record in records],
        "data_source": [source] * len(records),
    }


def cauldron_rows(records: list[dict], image_root: Path, extra_images: dict[int, list[str]] | None = None):
    """LLaVA records as The Cauldron's columns: the questions without their ``<image>`` tags, the images in
    ``images`` (with ``extra_images[i]`` after record i's own)."""
    extra_images = extra_images or {}
    images, texts = [], []
    for number, record in enumerate(records):
        paths = image_paths(record) + extra_images.get(number, [])
        images.append([embedded(image_root, path) for path in paths])
        turns = record["conversations"]
        texts.append(
            [
                {
                    "user": question["value"].replace(IMAGE_TAG, "").strip(),
                    "assistant": answer["value"],
                    "source": "demo",
                }
                for question, answer in zip(turns[::2], turns[1::2])
            ]
        )
    return {"images": images, "texts": texts}


def dataset_of(rows: dict[str, list], layout: str):
    import datasets

    return datasets.Dataset.from_dict(rows, features=features(layout))


def write_parquet_shards(dataset, folder: Path, shards: int = 2, rows_per_group: int = 16) -> list[Path]:
    """The dataset as ``train-0000i-of-0000n.parquet`` shards, as the Hub holds them, with row groups of
    ``rows_per_group`` rows."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(shards):
        path = folder / f"train-{index:05d}-of-{shards:05d}.parquet"
        dataset.shard(shards, index, contiguous=True).to_parquet(str(path), batch_size=rows_per_group)
        paths.append(path)
    return paths
