"""TFMOT's pruning schedules: at each step, whether to prune and the sparsity to prune to."""

from __future__ import annotations

import abc
import numbers
from typing import Any

import numpy as np
import tensorflow as tf

from sparselayers._validation import _short, check_int


def _check_sparsity(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={_short(value)}")
    return float(value)


class PruningSchedule(abc.ABC):
    """Base of the schedules: ``should_prune, sparsity = schedule(step)``, as in TFMOT.

    Subclass it for a schedule of your own: ``__call__(step)`` returns a
    boolean and a sparsity in ``[0, 1)`` (Python values or scalar tensors),
    and ``get_config`` a dict.
    """

    @staticmethod
    def _should_prune_in_step(step: Any, begin_step: int, end_step: int, frequency: int) -> tf.Tensor:
        """Whether ``step`` lies in ``[begin_step, end_step]`` (``end_step=-1``: no end) on the frequency grid."""
        step = tf.cast(step, tf.int64)
        in_range = tf.logical_and(step >= begin_step, tf.logical_or(step <= end_step, end_step < 0))
        return tf.logical_and(in_range, tf.equal(tf.math.floormod(step - begin_step, frequency), 0))

    @staticmethod
    def _check_steps(begin_step: Any, end_step: Any, frequency: Any, allow_no_end: bool) -> tuple[int, int, int]:
        begin_step = check_int(begin_step, "begin_step", minimum=0)
        end_step = check_int(end_step, "end_step")
        if end_step == -1 and not allow_no_end:
            raise ValueError(
                "`end_step` must be >= begin_step (this schedule decays to its end: it has no -1 for "
                f"'no end'). Received: end_step={end_step}"
            )
        if end_step != -1 and end_step < begin_step:
            raise ValueError(
                f"`end_step` must be -1 or >= begin_step={begin_step}. Received: end_step={end_step}"
            )
        return begin_step, end_step, check_int(frequency, "frequency", minimum=1)

    @abc.abstractmethod
    def __call__(self, step: Any) -> tuple[Any, Any]:
        """``(should_prune, sparsity)`` at ``step``."""

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """``{"class_name": ..., "config": {...}}``, TFMOT's layout."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PruningSchedule:
        """The schedule of ``get_config()["config"]``."""
        return cls(**config)


class ConstantSparsity(PruningSchedule):
    """Prunes to ``target_sparsity`` every ``frequency`` steps from ``begin_step`` to ``end_step``.

    Args:
        target_sparsity: the fraction of zeros, in [0, 1).
        begin_step: the first pruning step, >= 0.
        end_step: the last pruning step; -1 (default) prunes to the end of
            training.
        frequency: steps between two prunings, >= 1.

    Raises:
        TypeError: a step argument that is not an integer.
        ValueError: an argument out of range.

    Example:

    >>> from sparselayers.compat.tfmot.sparsity.keras import ConstantSparsity
    >>> schedule = ConstantSparsity(0.5, begin_step=10, frequency=5)
    >>> [(t, bool(schedule(t)[0])) for t in (5, 10, 12, 15)]
    [(5, False), (10, True), (12, False), (15, True)]
    >>> float(schedule(15)[1])
    0.5
    """

    def __init__(self, target_sparsity: float, begin_step: int, end_step: int = -1, frequency: int = 100):
        self.target_sparsity = _check_sparsity(target_sparsity, "target_sparsity")
        self.begin_step, self.end_step, self.frequency = self._check_steps(begin_step, end_step, frequency, True)

    def __call__(self, step: Any) -> tuple[tf.Tensor, tf.Tensor]:
        return (
            self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency),
            tf.constant(self.target_sparsity, tf.float32),
        )

    def get_config(self) -> dict[str, Any]:
        return {
            "class_name": type(self).__name__,
            "config": {
                "target_sparsity": self.target_sparsity,
                "begin_step": self.begin_step,
                "end_step": self.end_step,
                "frequency": self.frequency,
            },
        }


class PolynomialDecay(PruningSchedule):
    """Sparsity rising from ``initial_sparsity`` to ``final_sparsity`` on TFMOT's polynomial.

    At step ``t`` the sparsity is ``final + (initial - final) * (1 - p) **
    power`` with ``p = (t - begin_step) / (end_step - begin_step)`` clipped
    to [0, 1] (Zhu & Gupta, 2017), computed in float32 as TFMOT does; it
    prunes on steps ``begin_step + k * frequency`` up to ``end_step``.

    Args:
        initial_sparsity: the sparsity at ``begin_step``, in [0, 1).
        final_sparsity: the sparsity at ``end_step``, in [0, 1).
        begin_step: the first pruning step, >= 0.
        end_step: the last pruning step, >= ``begin_step``.
        power: the exponent.
        frequency: steps between two prunings, >= 1.

    Raises:
        TypeError: a step argument that is not an integer.
        ValueError: an argument out of range.

    Example:

    >>> from sparselayers.compat.tfmot.sparsity.keras import PolynomialDecay
    >>> schedule = PolynomialDecay(0.5, 0.8, begin_step=0, end_step=100, frequency=10)
    >>> [round(float(schedule(t)[1]), 4) for t in (0, 50, 100, 200)]
    [0.5, 0.7625, 0.8, 0.8]
    >>> [bool(schedule(t)[0]) for t in (0, 5, 100, 110)]
    [True, False, True, False]
    """

    def __init__(
        self,
        initial_sparsity: float,
        final_sparsity: float,
        begin_step: int,
        end_step: int,
        power: float = 3,
        frequency: int = 100,
    ):
        self.initial_sparsity = _check_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = _check_sparsity(final_sparsity, "final_sparsity")
        if isinstance(power, (bool, np.bool_)) or not isinstance(power, numbers.Real):
            raise TypeError(f"`power` must be a number. Received: power={_short(power)}")
        self.power = power
        self.begin_step, self.end_step, self.frequency = self._check_steps(begin_step, end_step, frequency, False)
        if self.end_step == self.begin_step:
            raise ValueError(
                f"`end_step` must be > begin_step={self.begin_step} (the decay divides by their "
                f"difference). Received: end_step={self.end_step}"
            )

    def __call__(self, step: Any) -> tuple[tf.Tensor, tf.Tensor]:
        progress = tf.cast(tf.cast(step, tf.int64) - self.begin_step, tf.float32) / (self.end_step - self.begin_step)
        progress = tf.minimum(1.0, tf.maximum(0.0, progress))
        sparsity = (self.initial_sparsity - self.final_sparsity) * tf.pow(1 - progress, self.power) + self.final_sparsity
        return self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency), sparsity

    def get_config(self) -> dict[str, Any]:
        return {
            "class_name": type(self).__name__,
            "config": {
                "initial_sparsity": self.initial_sparsity,
                "final_sparsity": self.final_sparsity,
                "power": self.power,
                "begin_step": self.begin_step,
                "end_step": self.end_step,
                "frequency": self.frequency,
            },
        }
