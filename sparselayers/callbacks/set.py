"""SET: drop the smallest entries, grow at random."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from sparselayers._validation import check_bool
from sparselayers.callbacks.dynamic import _DynamicSparsity, random_positions
from sparselayers.callbacks.fan_in import random_within_units
from sparselayers.sparse_kernel import SparseKernelLayer


class SET(_DynamicSparsity):
    """Sparse Evolutionary Training: drop the smallest entries, grow at random.

    See :mod:`sparselayers.callbacks` for the exact semantics (schedule,
    which entries move, optimizer state, cost).

    Args:
        update_freq: training steps between two updates, >= 1.
        drop_fraction: fraction of each layer's entries moved by the first
            update, in [0, 1); it decays to 0 at ``end_step`` (cosine).
        end_step: step from which the pattern stays fixed; default 75% of the
            steps ``fit`` runs.
        layers: names (or paths) of the sparse layers to evolve; default
            every sparse layer that can.
        seed: seed of the random draws; None draws a fresh one.
        constant_fan_in: drop and grow within each output unit, so that
            every unit keeps its fan-in (as SRigL; see
            :mod:`sparselayers.callbacks.fan_in`).

    Attributes:
        updates: one dict per layer and update: ``step``, ``layer`` (its
            path), ``drop_fraction``, ``dropped`` (entries dropped) and
            ``new`` (connections at positions the layer did not have).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range; at the start of ``fit``, a
            model with no sparse layer that can evolve, a name in ``layers``
            that matches none, or an unknown number of steps without
            ``end_step``.

    Example:

    >>> import keras, numpy as np, sparselayers as sl
    >>> layer = sl.SparseDense(sl.patterns.random((16, 4), density=0.25, seed=0))
    >>> model = keras.Sequential([keras.Input((16,)), layer])
    >>> model.compile(optimizer="adam", loss="mse")
    >>> before = layer.pattern
    >>> x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")
    >>> set_ = sl.callbacks.SET(update_freq=2, drop_fraction=0.5, seed=0)
    >>> _ = model.fit(x, x[:, :4], batch_size=8, epochs=2, verbose=0, callbacks=[set_])
    >>> layer.pattern.nnz == before.nnz, layer.pattern != before
    (True, True)
    """

    def __init__(
        self,
        update_freq: int = 100,
        drop_fraction: float = 0.3,
        end_step: int | None = None,
        layers: Sequence[str] | None = None,
        seed: int | None = None,
        *,
        constant_fan_in: bool = False,
    ):
        super().__init__(update_freq, drop_fraction, end_step, layers, seed)
        self.constant_fan_in = check_bool(constant_fan_in, "constant_fan_in")

    def _grow(
        self,
        layer: SparseKernelLayer,
        kept: np.ndarray,
        n: int,
        rng: np.random.Generator,
        prepared: Any,
        per_unit: np.ndarray | None = None,
    ) -> np.ndarray:
        if per_unit is not None:
            return random_within_units(layer.pattern.shape, kept, per_unit, rng)
        return random_positions(layer.pattern.shape, kept, n, rng)
