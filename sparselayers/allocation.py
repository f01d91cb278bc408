"""How many entries each layer keeps: uniform, ERK (Erdős–Rényi-Kernel) or one global threshold.

Shared by :func:`sparselayers.sparsify` and
:class:`sparselayers.callbacks.GradualPruning`: both rank a layer's candidate
entries by a score and keep the best ones, in the numbers decided here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparselayers._validation import _short

#: The values of ``distribution``.
DISTRIBUTIONS = ("uniform", "erk", "global")


def check_distribution(distribution: Any) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"`distribution` must be one of {list(DISTRIBUTIONS)}. Received: distribution={_short(distribution)}"
        )
    return distribution


def check_erk_power(erk_power: Any) -> float:
    if isinstance(erk_power, (bool, np.bool_)) or not isinstance(erk_power, numbers.Real):
        raise TypeError(f"`erk_power` must be a number > 0. Received: erk_power={_short(erk_power)}")
    if not erk_power > 0 or not np.isfinite(erk_power):
        raise ValueError(f"`erk_power` must be a finite number > 0. Received: erk_power={erk_power}")
    return float(erk_power)


def erk_densities(shapes: Sequence[tuple[int, ...]], density: float, erk_power: float = 1.0) -> np.ndarray:
    """Per-layer densities of the Erdős–Rényi-Kernel rule (the RigL code's ``erdos_renyi_kernel``).

    Layer ``l`` of kernel shape ``(n_in, n_out)`` gets a density proportional
    to ``((n_in + n_out) / (n_in * n_out)) ** erk_power``; a convolution's
    kernel ``(kh, kw, c_in, c_out)`` gets RigL's kernel term
    ``(sum(shape) / prod(shape)) ** erk_power``. Densities are scaled so that the
    kept entries total ``density`` times the layers' summed size. A layer
    whose density would exceed 1 is made full and the others are scaled
    again, until none exceeds 1.

    Args:
        shapes: each layer's kernel shape in Keras' layout: ``(n_in, n_out)``
            for Dense, ``(*kernel_size, c_in, c_out)`` for a convolution.
        density: overall density, in ``(0, 1]``.
        erk_power: exponent of the rule, > 0 (1 is the rule of the paper).

    Returns:
        float64 densities in ``(0, 1]``, one per layer.

    Example:

    >>> from sparselayers.allocation import erk_densities
    >>> erk_densities([(64, 32), (32, 10)], 0.2).round(3).tolist()
    [0.161, 0.45]
    >>> erk_densities([(3, 3, 16, 32), (512, 10)], 0.1).round(3).tolist()
    [0.02, 0.172]
    """
    sizes = np.array([math.prod(shape) for shape in shapes], np.float64)
    raw = np.array([(sum(shape) / math.prod(shape)) ** erk_power for shape in shapes], np.float64)
    full = np.zeros(len(shapes), bool)
    while True:
        rest = ~full
        if not rest.any():
            return np.ones(len(shapes))
        budget = density * sizes.sum() - sizes[full].sum()
        scale = budget / (raw[rest] * sizes[rest]).sum()
        if raw[rest].max() * scale <= 1.0:
            return np.where(full, 1.0, raw * scale)
        # As the RigL code: the layers of the largest raw density become full.
        full |= rest & (raw == raw[rest].max())


def keep_counts(
    shapes: Sequence[tuple[int, ...]], density: float, distribution: str, erk_power: float = 1.0
) -> list[int]:
    """Entries each layer keeps under ``"uniform"`` or ``"erk"``: ``round(density_l * prod(shape))``."""
    if distribution == "erk":
        densities = erk_densities(shapes, density, erk_power)
    else:
        densities = np.full(len(shapes), density)
    return [round(float(d) * math.prod(shape)) for d, shape in zip(densities, shapes)]


def top_entries(scores: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest scores; equal scores: the earlier index first."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def global_keep(scores: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]], density: float) -> list[np.ndarray]:
    """The entries that one threshold across layers keeps: the ``round(density * total size)`` best scores.

    Equal scores go to the earlier layer, then the earlier entry. A layer may
    keep nothing (layer collapse): no floor is applied.

    Returns:
        Sorted indices into each layer's ``scores``.
    """
    total = sum(math.prod(shape) for shape in shapes)
    kept = top_entries(np.concatenate([np.asarray(s, np.float64) for s in scores]), round(density * total))
    bounds = np.cumsum([0] + [len(s) for s in scores])
    return [kept[(kept >= lo) & (kept < hi)] - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
