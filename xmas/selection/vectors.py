"""The feature vectors the feature methods select by, as they are stored: a fixed-size list column per
feature (float16 features, float32 centroids), with what describes them in the schema's metadata; and a method's
features of every image record as one float16 matrix (``.npy``), which the sample job memory-maps, reading a
cluster's rows at a time (at LLaVA-665k, COINCIDE's are 25 GB)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from xmas.io import atomic_path, read_checked

METADATA = "xmas_features"  # the schema metadata key: the features' widths, COINCIDE's parts


def vector_column(values: np.ndarray, type: pa.DataType) -> pa.FixedSizeListArray:
    """A (rows, width) array as a fixed-size list column of ``type``."""
    flat = pa.array(values.astype(type.to_pandas_dtype()).reshape(-1), type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def feature_matrix(table: pa.Table, column: str) -> np.ndarray:
    """The fixed-size list column (no nulls) as a (rows, width) float32 array."""
    values = table.column(column).combine_chunks()
    width = values.type.list_size
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(values), width)


ROWS_AT_ONCE = 1 << 14


def write_matrix(values: np.ndarray, path: Path) -> None:
    """A (rows, width) matrix as a float16 ``.npy`` file, written a block of rows at a time."""
    with atomic_path(path) as tmp:
        stored = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=values.shape)
        for start in range(0, len(values), ROWS_AT_ONCE):
            stored[start : start + ROWS_AT_ONCE] = values[start : start + ROWS_AT_ONCE]
        stored.flush()
        del stored


def read_matrix(path: Path) -> np.ndarray:
    """The matrix :func:`write_matrix` wrote, memory-mapped (read only): rows are read as they are indexed."""
    return read_checked(path, lambda checked: np.load(checked, mmap_mode="r"), "a NumPy matrix")
