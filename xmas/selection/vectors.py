"""The feature vectors the feature methods select by, as they are stored: a fixed-size list column per
feature (float16 features, float32 centroids), with what describes them in the schema's metadata."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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
