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


def masked_towers(towers: Towers) -> keras.Sequential:
    """The masked-dense equivalent of a built ``towers``, with its weights."""
    layers = []
    for layer in towers.tower_layers:
        masked = MaskedDense(layer.pattern, activation=layer.activation, use_bias=layer.use_bias)
        masked.build((None, layer.input_dim))
        masked.kernel.assign(layer.to_dense().astype("float32"))
        if layer.bias is not None:
            masked.bias.assign(layer.bias)
        layers.append(masked)
    return keras.Sequential(layers, name="masked_towers")


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
