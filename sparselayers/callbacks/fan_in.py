"""Drop and grow within each output unit, so every unit keeps its fan-in (SRigL, Lasby et al., 2024).

Used by :class:`~sparselayers.callbacks.RigL` and :class:`~sparselayers.callbacks.SET`
with ``constant_fan_in=True``: unit ``j`` (column ``j``) of fan-in ``k_j``
drops its ``n_j = round(fraction * k_j)`` entries of smallest ``|value|``
and grows ``n_j`` positions in the same column, so ``pattern.fan_in`` never
changes. Starting from an equal fan-in (``sl.patterns.random(shape,
fan_in=k)``), every unit keeps ``k`` inputs for the whole run, the layout
that ELL-style kernels store without padding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

from sparselayers.sparsity_pattern import SparsityPattern


def unit_counts(pattern: SparsityPattern, fraction: float) -> np.ndarray:
    """``round(fraction * fan_in_j)`` for every output unit ``j`` (Python's round: halves to even)."""
    return np.array([round(fraction * int(k)) for k in pattern.fan_in], np.int64)


def drop_within_units(pattern: SparsityPattern, values: np.ndarray, per_unit: np.ndarray) -> np.ndarray:
    """Sorted row-major positions kept after each unit drops its ``per_unit[j]`` smallest ``|value|``.

    Equal magnitudes: the earlier entry in canonical order is dropped first.
    """
    cols = pattern.cols.astype(np.int64)
    # By column, then |value|, then canonical index.
    order = np.lexsort((np.arange(cols.size), np.abs(values), cols))
    starts = np.concatenate([[0], np.cumsum(pattern.fan_in)[:-1]])
    rank = np.empty(cols.size, np.int64)
    rank[order] = np.arange(cols.size) - starts[cols[order]]
    return np.sort(pattern.linear[rank >= per_unit[cols]])


def random_within_units(
    shape: tuple[int, int], kept: np.ndarray, per_unit: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``per_unit[j]`` distinct rows per column ``j``, uniformly among those not in ``kept``."""
    units = shape[1]
    rows, cols = np.divmod(kept, units)
    grown = []
    for j in np.flatnonzero(per_unit):
        taken = np.sort(rows[cols == j])
        free = shape[0] - taken.size
        ranks = np.sort(rng.choice(free, size=int(per_unit[j]), replace=False))
        new_rows = ranks + np.searchsorted(taken - np.arange(taken.size), ranks, side="right")
        grown.append(new_rows * units + j)
    return np.sort(np.concatenate(grown)) if grown else np.zeros(0, np.int64)


def top_gradient_within_units(
    x: tf.Tensor,
    dy: tf.Tensor,
    kept: np.ndarray,
    per_unit: np.ndarray,
    tile_elements: int,
    tile_sum: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> np.ndarray:
    """Up to ``per_unit[j]`` rows per column ``j`` outside ``kept`` where ``|x.T @ dy|`` is largest and nonzero.

    Scores column tiles of at most ``max(tile_elements, input_dim)`` gradient
    entries, as :func:`~sparselayers.callbacks.dynamic.top_gradient_positions`
    (``tile_sum`` sums a tile over a cluster's workers there too); equal
    scores go to the lower row.
    """
    from sparselayers.callbacks.dynamic import input_gradient_tile  # dynamic imports this module

    input_dim, units = int(x.shape[1]), int(dy.shape[1])
    width = max(1, tile_elements // input_dim)
    kept_rows, kept_cols = np.divmod(kept, units)
    grown = []
    for start in range(0, units, width):
        stop = min(units, start + width)
        k = int(per_unit[start:stop].max(initial=0))
        if k == 0:
            continue
        tile = tf.transpose(input_gradient_tile(x, dy[:, start:stop]))  # (columns, input_dim)
        tile = tf.abs(tile if tile_sum is None else tile_sum(tile))
        inside = (kept_cols >= start) & (kept_cols < stop)
        if inside.any():
            where = np.stack([kept_cols[inside] - start, kept_rows[inside]], axis=1)
            tile = tf.tensor_scatter_nd_update(tile, where, tf.zeros(int(inside.sum()), tile.dtype))
        scores, rows = tf.math.top_k(tile, k=k)  # lower row first among equals
        scores, rows = scores.numpy(), rows.numpy().astype(np.int64)
        wanted = np.arange(k)[None, :] < per_unit[start:stop, None]
        chosen = wanted & (scores > 0)
        cols = np.broadcast_to(np.arange(start, stop)[:, None], rows.shape)
        grown.append(rows[chosen] * units + cols[chosen])
    return np.sort(np.concatenate(grown)) if grown else np.zeros(0, np.int64)
