"""The workarounds users try before sparselayers, for side-by-side comparisons.

- :class:`MaskedDense`: a full dense kernel times a constant 0/1 mask;
- :func:`dense_towers`: one small Keras ``Dense`` MLP per output.

Both can take the weights of a trained :class:`~sparselayers.Towers`, so
they compute the very same function and only their cost differs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers.sparse_dense import as_pattern
from sparselayers.sparsity_pattern import SparsityPattern
from sparselayers.towers import Towers


@keras.saving.register_keras_serializable(package="sparselayers")
class MaskedDense(keras.layers.Layer):
    """``activation(x @ (kernel * mask) + bias)`` with a dense trainable kernel.

    The zeros of the mask still cost memory, FLOPs, gradients and optimizer
    state: this is the baseline :class:`~sparselayers.SparseDense` replaces.
    """

    def __init__(self, pattern: Any, activation: Any = None, use_bias: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.pattern = as_pattern(pattern)
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias

    def build(self, input_shape: Any) -> None:
        shape = self.pattern.shape
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(shape[1],), initializer="zeros") if self.use_bias else None
        with tf.init_scope():
            self._mask = tf.constant(self.pattern.to_dense(np.ones(self.pattern.nnz, np.float32)))

    def call(self, inputs):
        y = tf.matmul(inputs, self.kernel * tf.cast(self._mask, self.kernel.dtype))
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y) if self.activation is not None else y

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "pattern": self.pattern.get_config(),
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
        }


def masked_towers(towers: Towers, towers_to_build: Iterable[int] | None = None) -> keras.Sequential:
    """The masked-dense equivalent of a built ``towers``, with its weights.

    ``towers_to_build`` selects towers (default all): the dense kernels then
    span only their units, so that benchmarks can measure a baseline whose
    full size would not fit in memory. Its outputs are those towers' output
    columns, in the order given.

    Raises:
        ValueError: ``towers_to_build`` is empty, repeats a tower or names
            one out of range; or a chosen tower is fed by a tower left out (after
            ``set_pattern``, RigL or SET), so that the subset would compute
            something else.
    """
    chosen = None if towers_to_build is None else [int(t) for t in towers_to_build]
    if chosen is not None and (not chosen or min(chosen) < 0 or max(chosen) >= towers.n_towers
                               or len(set(chosen)) < len(chosen)):
        raise ValueError(
            f"`towers_to_build` must list distinct towers from 0 to {towers.n_towers - 1}. "
            f"Received: towers_to_build={chosen}"
        )
    in_units = towers.tower_layers[0].input_dim
    rows = np.arange(in_units)
    layers = []
    for layer, width in zip(towers.tower_layers, towers.widths):
        cols = np.arange(layer.units)
        if chosen is not None:
            cols = (np.asarray(chosen)[:, None] * width + np.arange(width)).ravel()
        pattern, kernel = _restricted(layer, rows, cols, chosen)
        masked = MaskedDense(pattern, activation=layer.activation, use_bias=layer.use_bias)
        masked.build((None, len(rows)))
        masked.kernel.assign(kernel)
        if layer.bias is not None:
            masked.bias.assign(keras.ops.convert_to_numpy(layer.bias)[cols])
        layers.append(masked)
        rows = cols
    return keras.Sequential(layers, name="masked_towers")


def _restricted(
    layer: Any, rows: np.ndarray, cols: np.ndarray, chosen: list[int] | None
) -> tuple[SparsityPattern, np.ndarray]:
    """``layer``'s pattern and dense float32 kernel on ``rows`` x ``cols``, renumbered in that order."""
    pattern = layer.pattern
    values = keras.ops.convert_to_numpy(layer.values).astype("float32")
    row_of = np.full(pattern.shape[0], -1)
    row_of[rows] = np.arange(len(rows))
    col_of = np.full(pattern.shape[1], -1)
    col_of[cols] = np.arange(len(cols))
    new_rows, new_cols = row_of[pattern.rows], col_of[pattern.cols]
    if np.any((new_cols >= 0) & (new_rows < 0)):
        raise ValueError(
            f"`towers_to_build` must include every tower that feeds a chosen one: in {layer.name}, units of "
            f"other towers feed the chosen towers. Received: towers_to_build={chosen}"
        )
    keep = (new_rows >= 0) & (new_cols >= 0)
    kernel = np.zeros((len(rows), len(cols)), np.float32)
    kernel[new_rows[keep], new_cols[keep]] = values[keep]
    return SparsityPattern.from_coo(new_rows[keep], new_cols[keep], kernel.shape), kernel


def dense_towers(towers: Towers, input_dim: int, towers_to_build: Iterable[int] | None = None) -> keras.Model:
    """One Keras ``Dense`` MLP per tower, outputs concatenated, with ``towers``' weights.

    ``towers_to_build`` selects towers (default all): Keras takes minutes to
    trace thousands of tiny layers, so benchmarks time a subset.
    """
    inputs = keras.Input((input_dim,))
    outputs = []
    for t in range(towers.n_towers) if towers_to_build is None else towers_to_build:
        x = inputs
        weights = towers.tower_weights(t)
        for k, width in enumerate(towers.widths):
            last = k == len(towers.widths) - 1
            dense = keras.layers.Dense(
                width, activation=towers.output_activation if last else towers.activation, use_bias=towers.use_bias
            )
            x = dense(x)
            step = 2 if towers.use_bias else 1
            dense.set_weights(weights[k * step : (k + 1) * step])
        outputs.append(x)
    merged = outputs[0] if len(outputs) == 1 else keras.layers.Concatenate()(outputs)
    return keras.Model(inputs, merged, name="dense_towers")
