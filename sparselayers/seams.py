"""Seams below `SparseDense` that feature modules fill in.

The layer never imports a feature module (arrows point down), yet two of its
services live in one: the kernel measured fastest on this device
(:mod:`sparselayers.autotune` keeps the measurements) and the table of its
entries (:mod:`sparselayers.knowledge` makes it). Each feature registers its
function here when it is imported, which ``import sparselayers`` does; the
layer asks this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_measured_kernel: Callable[[Any, Any, str], str] | None = None
_frame: Callable[[Any], Any] | None = None


def register_measured_kernel(lookup: Callable[[Any, Any, str], str]) -> None:
    """Makes ``lookup(layer, flat, name)`` the source of :func:`measured_kernel`."""
    global _measured_kernel
    _measured_kernel = lookup


def measured_kernel(layer: Any, flat: Any, name: str) -> str:
    """The kernel measured fastest for ``layer`` and its input ``flat``, else ``name``.

    Args:
        layer: the calling SparseDense.
        flat: its input flattened to ``(batch, input_dim)``.
        name: the kernel the layer would run without a measurement.

    Returns:
        A kernel name; ``name`` when nothing is registered or measured.

    >>> import numpy as np, sparselayers as sl
    >>> from sparselayers import seams
    >>> layer = sl.SparseDense(sl.patterns.banded((8, 8)))
    >>> layer.build((None, 8))
    >>> seams.measured_kernel(layer, np.zeros((2, 8), "float32"), "block")  # nothing measured
    'block'
    """
    return name if _measured_kernel is None else _measured_kernel(layer, flat, name)


def register_frame(frame: Callable[[Any], Any]) -> None:
    """Makes ``frame(layer)`` the function behind ``SparseDense.to_frame``."""
    global _frame
    _frame = frame


def frame(layer: Any) -> Any:
    """``layer``'s entries as a table, by the registered function.

    Raises:
        ImportError: nothing registered (``import sparselayers`` registers
            :func:`sparselayers.knowledge.layer_frame`).
    """
    if _frame is None:
        raise ImportError("SparseDense.to_frame needs sparselayers.knowledge: import sparselayers first")
    return _frame(layer)
