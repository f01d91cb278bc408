"""Initializers that see each entry's real fan-in and fan-out.

Keras' own initializers compute fans from the weight's shape; for a 1-D
``(nnz,)`` values vector that gives ``fan = nnz`` and far too small weights.
These read the fans from the pattern: entry ``(i, j)`` has
``fan_in = pattern.fan_in[j]`` (inputs of output ``j``) and
``fan_out = pattern.fan_out[i]`` (outputs of input ``i``).
"""

from __future__ import annotations

import random as python_random
from typing import Any

import keras
import numpy as np

from sparselayers.sparsity_pattern import SparsityPattern

_MODES = ("fan_in", "fan_out", "fan_avg")
_DISTRIBUTIONS = ("uniform", "truncated_normal", "untruncated_normal")
# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNCATED_STD = 0.87962566103423978


@keras.saving.register_keras_serializable(package="sparselayers")
class SparseVarianceScaling(keras.initializers.Initializer):
    """Keras' ``VarianceScaling`` with per-entry fans taken from a pattern.

    Each entry gets variance ``scale / fan`` where ``fan`` is its own fan-in,
    fan-out or their mean (``mode``). The layer passes the pattern; called
    on its own, give ``pattern=``.

    Args:
        scale: positive scaling factor.
        mode: ``"fan_in"``, ``"fan_out"`` or ``"fan_avg"``.
        distribution: ``"uniform"``, ``"truncated_normal"`` or
            ``"untruncated_normal"``.
        seed: int or None, as in Keras initializers.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> p = sl.patterns.random((1000, 1000), fan_in=10, seed=0)
    >>> w = sl.initializers.SparseVarianceScaling(mode="fan_in", seed=1)((p.nnz,), pattern=p)
    >>> bool(abs(float(np.var(w)) - 1 / 10) < 0.01)
    True
    """

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_avg",
        distribution: str = "uniform",
        seed: int | None = None,
    ):
        if not scale > 0:
            raise ValueError(f"`scale` must be positive. Received: scale={scale}")
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}. Received: mode={mode!r}")
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(
                f"`distribution` must be one of {_DISTRIBUTIONS}. Received: distribution={distribution!r}"
            )
        self.scale, self.mode, self.distribution, self.seed = float(scale), mode, distribution, seed

    def variances(self, pattern: SparsityPattern) -> np.ndarray:
        """Per-entry variance, float32 of shape ``(nnz,)``, in canonical order.

        Float32 and computed in place: the initializer's temporaries stay
        at a few bytes per entry for layers of 10^8 entries.
        """
        fan = np.zeros(pattern.nnz, np.float32)
        if self.mode in ("fan_in", "fan_avg"):
            fan += pattern.fan_in.astype(np.float32)[pattern.cols]
        if self.mode in ("fan_out", "fan_avg"):
            fan += pattern.fan_out.astype(np.float32)[pattern.rows]
        if self.mode == "fan_avg":
            fan *= 0.5
        np.maximum(fan, 1.0, out=fan)
        return np.divide(np.float32(self.scale), fan, out=fan)

    def __call__(self, shape, dtype=None, *, pattern: SparsityPattern | None = None):
        if pattern is None:
            raise ValueError(
                "SparseVarianceScaling needs the layer's pattern to know each entry's fans; "
                "pass `pattern=`. Received: pattern=None"
            )
        if tuple(shape) != (pattern.nnz,):
            raise ValueError(f"`shape` must be (nnz,) = ({pattern.nnz},). Received: shape={tuple(shape)}")
        dtype = dtype or keras.config.floatx()
        # An int seed, never Keras' global SeedGenerator: its state variable,
        # created inside a trace (an unbuilt layer under tf.function), cannot
        # be lifted out of it. Drawn per call from Python's generator, as
        # Keras' initializers draw theirs, so keras.utils.set_random_seed
        # fixes it and two layers sharing this initializer still differ.
        seed = self.seed if self.seed is not None else python_random.randint(1, int(1e9))
        variances = self.variances(pattern)
        std = keras.ops.convert_to_tensor(np.sqrt(variances, out=variances), dtype=dtype)
        if self.distribution == "uniform":
            unit = keras.random.uniform(shape, -np.sqrt(3.0), np.sqrt(3.0), dtype=dtype, seed=seed)
        elif self.distribution == "truncated_normal":
            unit = keras.random.truncated_normal(shape, stddev=1 / _TRUNCATED_STD, dtype=dtype, seed=seed)
        else:
            unit = keras.random.normal(shape, dtype=dtype, seed=seed)
        return unit * std

    def get_config(self) -> dict[str, Any]:
        return {"scale": self.scale, "mode": self.mode, "distribution": self.distribution, "seed": self.seed}


@keras.saving.register_keras_serializable(package="sparselayers")
class SparseGlorotUniform(SparseVarianceScaling):
    """Glorot uniform with per-entry fans: the default for ``SparseDense``."""

    def __init__(self, seed: int | None = None):
        super().__init__(1.0, "fan_avg", "uniform", seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="sparselayers")
class SparseHeNormal(SparseVarianceScaling):
    """He normal (truncated, ``scale=2``, ``fan_in``) for ReLU networks."""

    def __init__(self, seed: int | None = None):
        super().__init__(2.0, "fan_in", "truncated_normal", seed)

    def get_config(self) -> dict[str, Any]:
        return {"seed": self.seed}


_ALIASES = {
    "sparse_glorot_uniform": SparseGlorotUniform,
    "sparse_he_normal": SparseHeNormal,
    "sparse_variance_scaling": SparseVarianceScaling,
}


def get(identifier: Any) -> Any:
    """Like ``keras.initializers.get``, knowing this module's names too."""
    if identifier is None:
        return SparseGlorotUniform()
    if isinstance(identifier, str) and identifier in _ALIASES:
        return _ALIASES[identifier]()
    return keras.initializers.get(identifier)
