"""Reading a layer back as a table of its named weights."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from sparselayers import seams
from sparselayers._validation import optional_module
from sparselayers.sparse_dense import SparseDense


def _pandas() -> Any:
    return optional_module("pandas", "This function returns a pandas DataFrame", "pandas")


def _labels(names: tuple[str, ...] | None, size: int) -> np.ndarray:
    return np.asarray(names, dtype=object) if names is not None else np.arange(size)


def layer_frame(layer: SparseDense) -> Any:
    """Every entry of a ``SparseDense`` layer as a DataFrame ``input, output, weight``.

    Rows follow ``layer.pattern.indices``; ``input`` and ``output`` hold
    names when the pattern has them, integer positions otherwise.

    >>> import sparselayers as sl
    >>> layer = sl.SparseDense(sl.SparsityPattern.from_edges(["rs1", "rs2"], ["A", "A"]))
    >>> layer.build((None, 2)); _ = layer.values.assign([0.5, -1.0])
    >>> print(layer.to_frame())
      input output  weight
    0   rs1      A     0.5
    1   rs2      A    -1.0
    """
    pd = _pandas()
    pattern = layer.pattern
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' has no weights yet: build it (or call it once) first. Received: an unbuilt layer"
        )
    return pd.DataFrame(
        {
            "input": _labels(pattern.input_names, pattern.shape[0])[pattern.rows],
            "output": _labels(pattern.output_names, pattern.shape[1])[pattern.cols],
            "weight": keras.ops.convert_to_numpy(layer.values),
        }
    )


seams.register_frame(layer_frame)
