"""Argument checks shared by patterns and layers.

Every check raises with Keras wording: the argument in backticks, what was
expected, then ``Received: name=value``.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

# TensorFlow sizes and dense shapes of a SparseTensor are int64, but matmul
# output dimensions and many kernels index with int32.
MAX_DIM = 2**31 - 1


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(
    value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Returns ``value`` as a Python int, or raises naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be an integer. Received: {name}={_short(value)} "
            f"of type {type(value).__name__}"
        )
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}. Received: {name}={value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}. Received: {name}={value}")
    return value


def check_layer_names(layers: Any) -> list[str] | None:
    """``layers`` as a list of layer names, or None; TypeError for anything else (a bare string too)."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
        isinstance(name, str) for name in layers
    ):
        raise TypeError(f"`layers` must be a list of layer names. Received: layers={_short(layers)}")
    return list(layers)


def check_bool(value: Any, name: str) -> bool:
    """Returns ``value`` as a Python bool, or raises naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool. Received: {name}={_short(value)}")
    return bool(value)


def check_shape(shape: Any, name: str = "shape") -> tuple[int, int]:
    """Checks a 2-D ``(input_dim, units)`` shape of positive integers."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__len__"):
        raise TypeError(
            f"`{name}` must be a tuple of two positive integers "
            f"(input_dim, units). Received: {name}={_short(shape)}"
        )
    if len(shape) != 2:
        raise ValueError(
            f"`{name}` must have exactly two entries (input_dim, units). "
            f"Received: {name}={_short(tuple(shape))}"
        )
    try:
        dims = tuple(check_int(d, name, minimum=1, maximum=MAX_DIM) for d in shape)
    except (TypeError, ValueError) as error:
        kind = type(error)
        raise kind(
            f"`{name}` must be two integers in [1, {MAX_DIM}]. "
            f"Received: {name}={_short(tuple(shape))}"
        ) from None
    return dims  # type: ignore[return-value]


def as_index_array(values: Any, name: str) -> np.ndarray:
    """Converts ``values`` to a 1-D int64 array, refusing non-integer data."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"`{name}` must be an array of integers. Received: {name}={_short(values)}")
    try:
        array = np.asarray(values)
    except (ValueError, TypeError) as error:
        raise TypeError(
            f"`{name}` must be a 1-D array of integers, not a ragged sequence. "
            f"Received: {name}={_short(values)} ({error})"
        ) from None
    if array.ndim != 1:
        raise ValueError(
            f"`{name}` must be 1-D. Received: {name} with shape {array.shape}"
        )
    if array.size == 0:
        return np.zeros(0, np.int64)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"`{name}` must hold integers. Received: {name} of dtype {array.dtype} "
            f"(first entries {_short(array[:5].tolist())})"
        )
    if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"`{name}` has entries beyond int64. Received: max {name}={array.max()}")
    return array.astype(np.int64, copy=False)


def check_probability(value: Any, name: str) -> float:
    """Checks a finite real number in [0, 1]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number in [0, 1]. Received: {name}={_short(value)}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also False for NaN
        raise ValueError(f"`{name}` must be in [0, 1]. Received: {name}={value}")
    return value


def optional_module(name: str, needed_for: str, extra: str) -> Any:
    """Imports the optional dependency ``name``, or raises ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:  # pragma: no cover - depends on the environment
        package = name.split(".")[0]
        raise ImportError(
            f"{needed_for}: pip install 'sparselayers[{extra}]' (or pip install {package})"
        ) from None
