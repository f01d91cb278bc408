"""The training-step count of an evolving pattern, as part of a layer's saved state.

RigL and SET schedule their updates by their own count of training steps
(``optimizer.iterations`` is not that count under loss scaling or gradient
accumulation, and is 0 after ``load_weights`` into a fresh optimizer). The
count lives on each evolving :class:`SparseDense`, so it travels wherever
the pattern travels: Keras files (``.keras``, ``.weights.h5``, and so
``BackupAndRestore`` and ``ModelCheckpoint``) through :func:`save` and
:func:`load`, and ``tf.train.Checkpoint`` through :class:`StepCheckpoint`.
A file or checkpoint without it leaves the count at 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.trackable import base as trackable

#: Key of the Keras weights store, and of the checkpoint, holding the count.
STEP_KEY = "evolution_step"


def get(layer: Any) -> int:
    """The training steps counted for ``layer``'s pattern (0 if none were)."""
    return getattr(layer, "_evolution_step", 0)


def set_step(layer: Any, step: int) -> None:
    """Records that ``layer``'s pattern has evolved through ``step`` training steps."""
    object.__setattr__(layer, "_evolution_step", int(step))  # a plain int: no Keras tracking


def save(layer: Any, store: Any) -> None:
    """Writes the count into a Keras weights store."""
    store[STEP_KEY] = np.asarray([get(layer)], np.int64)


def load(layer: Any, store: Any) -> None:
    """Reads the count from a Keras weights store; 0 for files without one."""
    set_step(layer, int(np.asarray(store[STEP_KEY]).reshape(-1)[0]) if STEP_KEY in store else 0)


class StepCheckpoint(trackable.Trackable):
    """The count as a ``tf.train.Checkpoint`` dependency of the layer."""

    def __init__(self, layer: Any):
        self._layer = layer

    def _serialize_to_tensors(self) -> dict[str, tf.Tensor]:
        return {STEP_KEY: tf.constant(get(self._layer), tf.int64)}

    def _restore_from_tensors(self, restored_tensors: dict[str, tf.Tensor]) -> Any:
        if tf.executing_eagerly():  # SavedModel traces restore functions: nothing to count there
            set_step(self._layer, int(restored_tensors[STEP_KEY].numpy()))
        return tf.no_op()
