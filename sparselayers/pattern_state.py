"""The pattern as part of a layer's saved state.

A layer whose connections can change (pruning, RigL, SET, a checkpoint
restored mid-training) must never pair its ``values`` with another pattern's
connections. This module makes the current pattern travel with the values:

* Keras files (``.keras``, ``.weights.h5``): :func:`save_pattern` writes the
  pattern (its compressed config, about 1 to 2 bytes per entry) next to the
  variables, :func:`load_pattern` reads it back;
* ``tf.train.Checkpoint`` (and SavedModel): :class:`PatternCheckpoint` is a
  trackable child of the layer holding the same bytes (and, as its own
  child, :class:`MaskCheckpoint`, the pruning mask of that pattern);
* traced functions: :class:`PatternState` counts pattern changes, and a
  graph traced under an older pattern fails loudly instead of running with
  stale index constants.

Either way, a saved pattern with the layer's shape, ``nnz`` and unit names
replaces the layer's pattern; any other raises ``ValueError``
(:func:`check_replacement`). Nothing here adds Keras weights, so
``count_params()`` stays ``nnz (+ units)``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.saved_model import save_context
from tensorflow.python.trackable import base as trackable

from sparselayers import evolution_step
from sparselayers.ops.context import kernel_context
from sparselayers.sparsity_pattern import SparsityPattern

#: Key of the Keras weights store, and of the checkpoint, holding the pattern.
PATTERN_KEY = "pattern"


def encode(pattern: SparsityPattern) -> bytes:
    """The pattern's config as JSON bytes: compressed, about 1 to 2 bytes per entry."""
    return json.dumps(pattern.get_config()).encode("utf-8")


def decode(blob: bytes, where: str, layer: Any = None) -> SparsityPattern:
    """Inverse of :func:`encode`, checked like any other input.

    With ``layer``, the declared shape and ``nnz`` are compared with the
    layer's before anything is decompressed, so a file cannot make the load
    inflate more than the layer holds (see :func:`check_replacement`).
    """
    try:
        config = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Corrupt pattern in {where}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"Corrupt pattern in {where}: expected a config dict, found {type(config).__name__}")
    if layer is not None:
        shape, nnz = config.get("shape"), config.get("nnz")
        if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
            _check_fits(layer, tuple(shape), nnz if isinstance(nnz, int) else None, where.capitalize())
    return SparsityPattern.from_config(config)


def save_pattern(pattern: SparsityPattern, store: Any) -> None:
    """Writes ``pattern`` into a Keras weights store, as a byte array."""
    store[PATTERN_KEY] = np.frombuffer(encode(pattern), np.uint8)


def load_pattern(store: Any, where: str, layer: Any = None) -> SparsityPattern | None:
    """The pattern saved in a Keras weights store, or None for files without one.

    With ``layer``, a pattern that cannot fit it raises before it is
    decompressed (see :func:`decode`).
    """
    if PATTERN_KEY not in store:
        return None
    return decode(np.asarray(store[PATTERN_KEY], np.uint8).tobytes(), where, layer)


def identical(a: SparsityPattern, b: SparsityPattern) -> bool:
    """Same connections and same unit names (``==`` compares connections only)."""
    return a == b and (a.input_names, a.output_names) == (b.input_names, b.output_names)


def check_replacement(layer: Any, pattern: SparsityPattern, source: str) -> None:
    """Raises ValueError unless ``pattern`` can replace ``layer.pattern`` in place.

    Legitimate replacements are the same layer's pattern after it evolved:
    same shape, same ``nnz``, and the same unit names in the same order
    where both sides name their units (a side named on one only keeps or
    takes those names: the positions mean the same). Names in another order
    would make the layer read the data's columns in the file's order, so
    they raise instead.
    """
    _check_fits(layer, pattern.shape, pattern.nnz, source)
    for side in ("input_names", "output_names"):
        mine, saved = getattr(layer.pattern, side), getattr(pattern, side)
        if mine is not None and saved is not None and mine != saved:
            k = next(k for k, (a, b) in enumerate(zip(mine, saved)) if a != b)
            raise ValueError(
                f"{source} does not fit layer '{layer.name}': its {side} differ from the layer's "
                f"({side}[{k}] is {saved[k]!r} in the file, {mine[k]!r} in the layer), so loading would make "
                "the layer read its units in the file's order. Build the layer with the saved names in the "
                "same order (for example from the model's config, or from_edges(..., inputs=...) with the "
                "file's order) and order the data's columns to match."
            )


def _check_fits(layer: Any, shape: tuple, nnz: int | None, source: str) -> None:
    """Raises ValueError unless a saved pattern of ``shape`` and ``nnz`` fits ``layer``."""
    if shape != layer.pattern.shape:
        raise ValueError(
            f"{source} does not fit layer '{layer.name}': the saved pattern has shape {shape}, "
            f"the layer {layer.pattern.shape}."
        )
    if nnz is not None and nnz != layer.pattern.nnz:
        raise ValueError(
            f"{source} does not fit layer '{layer.name}': the saved pattern has nnz={nnz}, "
            f"the layer nnz={layer.pattern.nnz}. Build the layer with the saved pattern "
            "(for example from the model's config) before loading its values."
        )


class PatternCheckpoint(trackable.Trackable):
    """The layer's current pattern as a ``tf.train.Checkpoint`` dependency."""

    def __init__(self, layer: Any):
        self._layer = layer
        # The pruning mask belongs to this pattern: a child, so a checkpoint
        # restores it after the pattern, and one written without it still loads.
        self._track_trackable(MaskCheckpoint(layer), name=evolution_step.MASK_KEY)

    def _serialize_to_tensors(self) -> dict[str, tf.Tensor]:
        return {PATTERN_KEY: tf.constant(encode(self._layer.pattern))}

    def _restore_from_tensors(self, restored_tensors: dict[str, tf.Tensor]) -> Any:
        if not tf.executing_eagerly():
            # SavedModel traces restore functions; a loaded SavedModel's graph
            # already holds the pattern it was saved with.
            return tf.no_op()
        pattern = decode(restored_tensors[PATTERN_KEY].numpy(), "the checkpoint", self._layer)
        check_replacement(self._layer, pattern, "The checkpoint")
        self._layer.set_pattern(pattern)
        return tf.no_op()


class MaskCheckpoint(trackable.Trackable):
    """The layer's pruning mask (:mod:`sparselayers.evolution_step`) as a child of its :class:`PatternCheckpoint`."""

    def __init__(self, layer: Any):
        self._layer = layer

    def _serialize_to_tensors(self) -> dict[str, tf.Tensor]:
        return {evolution_step.MASK_KEY: tf.constant(evolution_step.encode_mask(self._layer))}

    def _restore_from_tensors(self, restored_tensors: dict[str, tf.Tensor]) -> Any:
        if tf.executing_eagerly():  # SavedModel traces restore functions: no mask to keep there
            evolution_step.restore_mask(self._layer, restored_tensors[evolution_step.MASK_KEY].numpy(), "the checkpoint")
        return tf.no_op()


class PatternState:
    """Counts pattern changes so that a graph traced before one fails loudly.

    Keras caches traced train, test and predict functions; they hold the
    pattern's index tensors as constants. After :meth:`SparseDense.set_pattern`
    such a function would pair the values with the old connections, so every
    graph checks the layer's version (one scalar read) and raises instead.
    """

    def __init__(self) -> None:
        with tf.init_scope():
            self.version = tf.Variable(0, dtype=tf.int64, trainable=False, name="pattern_version")
        self._python_version = 0

    def bump(self) -> None:
        self._python_version += 1
        self.version.assign(self._python_version)

    def guard(self, y: tf.Tensor, layer_name: str) -> tf.Tensor:
        """``y``, after checking in graphs that the pattern did not change since tracing.

        A stale graph raises ``InvalidArgumentError``; a stale XLA-compiled
        graph, where asserts compile to nothing, returns NaN. Exported and
        saved graphs are traced anew and hold no version variable.
        """
        if tf.executing_eagerly() or save_context.in_save_context():
            return y
        context = kernel_context()
        if context == "export":
            return y
        if context == "xla":
            # XLA compiles Assert as a no-op: a stale compiled graph returns
            # NaN instead, which no loss or metric can mistake for a result.
            stale = tf.not_equal(self.version.read_value(), tf.constant(self._python_version, tf.int64))
            return tf.where(stale, tf.constant(float("nan"), y.dtype), y)
        check = tf.debugging.assert_equal(
            self.version.read_value(),
            tf.constant(self._python_version, tf.int64),
            message=(
                f"The pattern of layer '{layer_name}' changed after this function was traced, so it "
                "would pair the values with the old connections. Rebuild the model's functions: "
                "sl.reset_compiled_functions(model), or compile the model again."
            ),
        )
        with tf.control_dependencies([check]):
            return tf.identity(y)


def reset_compiled_functions(model: Any) -> None:
    """Makes ``model`` trace its train, test and predict functions anew.

    Needed after a layer's pattern changed outside ``fit`` (the callbacks of
    :mod:`sparselayers.callbacks` do it themselves); a stale function raises
    rather than computing with the old pattern.
    """
    for kind in ("train", "test", "predict"):
        if getattr(model, f"{kind}_function", None) is not None:
            # Rebuilt rather than cleared: fit() reads train_function anew at
            # every step, so a callback may call this mid-epoch.
            getattr(model, f"make_{kind}_function")(force=True)
