"""`Towers`: one small MLP per output, as a chain of block-diagonal layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers import initializers as sparse_initializers
from sparselayers import patterns
from sparselayers._validation import _short, check_int
from sparselayers.ops import tower_tail
from sparselayers.ops.context import layers_observed
from sparselayers.pattern_state import identical
from sparselayers.sparse_dense import SparseDense, as_pattern
from sparselayers.sparsity_pattern import SparsityPattern


def _default_initializer() -> sparse_initializers.SparseVarianceScaling:
    # LeCun normal with each tower's own fan-in: every tower starts as an
    # independent MLP would, whatever the number of towers.
    return sparse_initializers.SparseVarianceScaling(1.0, "fan_in", "truncated_normal")


@keras.saving.register_keras_serializable(package="sparselayers")
class Towers(keras.layers.Layer):
    """``n_towers`` independent MLPs over one shared input, in a few sparse layers.

    Tower ``t`` maps the shared input through ``hidden_units`` to
    ``output_units`` outputs, seen at output columns
    ``t * output_units .. (t + 1) * output_units``. The first layer connects
    the input to every tower's first hidden layer (a dense pattern); every
    further layer is a block-diagonal :class:`SparseDense`, so no tower sees
    another's hidden units and the parameter count is exactly that of
    ``n_towers`` separate MLPs.

    Args:
        n_towers: number of towers (outputs groups).
        hidden_units: widths of each tower's hidden layers; may be empty.
        output_units: outputs per tower.
        activation: activation of the hidden layers.
        output_activation: activation of the outputs, default none.
        use_bias: biases in every layer.
        values_initializer: default LeCun normal with each entry's own fan-in,
            not the :class:`SparseGlorotUniform` of ``SparseDense``: Glorot
            also divides by fan-out, and an input feeds every tower, so its
            fan-out grows with ``n_towers``; with fan-in alone each tower
            starts at the scale of an independent MLP, whatever the number
            of towers.
        kernel: kernel of every SparseDense (see ``SparseDense``).
        layer_patterns: the pattern of each tower layer, one per layer (a
            :class:`SparsityPattern`, its config, or None for the built-in
            dense and block-diagonal ones). ``get_config`` fills it once a
            pattern has changed (``set_pattern``, SET, RigL), so that a model
            rebuilt from the config holds the current connections.
        **kwargs: Keras ``Layer`` arguments.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> towers = sl.Towers(100, hidden_units=[8, 8], output_units=2)
    >>> towers(np.zeros((4, 32), "float32")).shape
    TensorShape([4, 200])
    >>> towers.count_params() == 100 * (32 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2)
    True
    """

    def __init__(
        self,
        n_towers: int,
        hidden_units: Sequence[int] = (32, 32),
        output_units: int = 1,
        activation: Any = "relu",
        output_activation: Any = None,
        use_bias: bool = True,
        values_initializer: Any = None,
        kernel: str = "auto",
        layer_patterns: Sequence[Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.n_towers = check_int(n_towers, "n_towers", minimum=1)
        if isinstance(hidden_units, (str, bytes)) or not isinstance(hidden_units, Sequence):
            raise TypeError(
                f"`hidden_units` must be a list of positive integers. Received: hidden_units={_short(hidden_units)}"
            )
        self.hidden_units = [check_int(h, "hidden_units", minimum=1) for h in hidden_units]
        self.output_units = check_int(output_units, "output_units", minimum=1)
        self.activation = keras.activations.get(activation)
        self.output_activation = keras.activations.get(output_activation)
        self.use_bias = use_bias
        self.values_initializer = (
            _default_initializer() if values_initializer is None else sparse_initializers.get(values_initializer)
        )
        self.kernel = kernel
        if layer_patterns is not None:
            if isinstance(layer_patterns, (str, bytes, dict)) or not isinstance(layer_patterns, Sequence):
                raise TypeError(
                    "`layer_patterns` must be a list with one pattern (or None) per tower layer. "
                    f"Received: layer_patterns={_short(layer_patterns)}"
                )
            if len(layer_patterns) != len(self.widths):
                raise ValueError(
                    f"`layer_patterns` must hold one entry per tower layer ({len(self.widths)}). "
                    f"Received: {len(layer_patterns)} entries"
                )
            layer_patterns = [None if p is None else as_pattern(p) for p in layer_patterns]
        self._layer_patterns = layer_patterns
        self.tower_layers: list[SparseDense] = []
        self.supports_masking = True

    @property
    def widths(self) -> list[int]:
        """Per-tower widths of every layer's output: ``hidden_units + [output_units]``."""
        return [*self.hidden_units, self.output_units]

    def build(self, input_shape: Any) -> None:
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(f"Towers needs a known last input dimension. Received: input_shape={input_shape}")
        n = self.n_towers
        widths = self.widths
        layer_patterns = [patterns.dense((input_dim, n * widths[0]))]
        layer_patterns += [patterns.block_diagonal([(a, b)] * n) for a, b in zip(widths[:-1], widths[1:])]
        self.tower_layers = []
        for k, built_in in enumerate(layer_patterns):
            pattern = self._layer_pattern(k, built_in)
            last = k == len(layer_patterns) - 1
            layer = SparseDense(
                pattern,
                activation=self.output_activation if last else self.activation,
                use_bias=self.use_bias,
                values_initializer=self.values_initializer,
                kernel=self.kernel,
                dtype=self.dtype_policy,
                name=f"tower_layer_{k}",
            )
            layer.build((None, pattern.shape[0]))
            if k > 0 and self.kernel == "auto" and pattern is built_in:
                # In the (tower, batch, unit) layout of call(), the block
                # product needs no transposes, whatever the block size.
                layer.set_kernel("block")
            self.tower_layers.append(layer)
        self._built_patterns = layer_patterns

    def _layer_pattern(self, k: int, built_in: SparsityPattern) -> SparsityPattern:
        """Layer ``k``'s pattern: the one given in ``layer_patterns``, else ``built_in``."""
        given = None if self._layer_patterns is None else self._layer_patterns[k]
        if given is None or identical(given, built_in):
            return built_in
        if given.shape != built_in.shape:
            raise ValueError(
                f"`layer_patterns[{k}]` must have the tower layer's shape {built_in.shape}. "
                f"Received: a pattern of shape {given.shape}"
            )
        return given

    def _trackable_children(self, save_type: str = "checkpoint", **kwargs: Any) -> dict[str, Any]:
        # Keras keeps `tower_layers` in a list that tf.train.Checkpoint does
        # not follow; name each layer so checkpoints hold their values and
        # patterns.
        children = super()._trackable_children(save_type, **kwargs)
        children.update({layer.name: layer for layer in self.tower_layers})
        return children

    def call(self, inputs):
        if not self._in_tower_layout():
            x = inputs
            for layer in self.tower_layers:
                x = layer(x)
            return x
        fused = self._fused_tail(inputs)
        if fused is not None:
            return fused
        # Activations kept as (tower, batch, unit) from the first block layer
        # to the last: each layer is one batched matmul, with no transposes
        # in between (and none in the gradients).
        first, *rest = self.tower_layers
        h = first(inputs)
        h = tf.transpose(tf.reshape(h, [-1, self.n_towers, self.widths[0]]), [1, 0, 2])
        for layer, (a, b) in zip(rest, zip(self.widths[:-1], self.widths[1:])):
            weights = tf.reshape(tf.cast(layer.values, h.dtype), [self.n_towers, a, b])
            h = tf.matmul(h, weights)
            if layer.bias is not None:
                h = h + tf.reshape(tf.cast(layer.bias, h.dtype), [self.n_towers, 1, b])
            if layer.activation is not None:
                h = layer.activation(h)
            h = layer._state.guard(h, layer.name)  # last: see SparseDense.call
        y = tf.reshape(tf.transpose(h, [1, 0, 2]), [-1, self.n_towers * self.output_units])
        if len(inputs.shape) == 2:
            return y
        return tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [self.n_towers * self.output_units]], axis=0))

    def _fused_tail(self, inputs: Any) -> tf.Tensor | None:
        """The towers on the compiled tower ops (:mod:`sparselayers.ops.tower_tail`), or None where they do not run.

        They run in the tower layout, for ReLU or linear hidden layers, in
        float32 and float64, where compiled ops may run: the first layer
        computes its product alone, and the ops add its bias and activation
        and run every block layer, reading and writing the first layer's
        16 MiB (at 1024 towers of 16 units, batch 256) once each way.
        """
        first, *rest = self.tower_layers
        name = getattr(self.activation, "__name__", None)
        if name not in ("relu", "linear") or not tower_tail.fused_available(tf.as_dtype(self.compute_dtype)):
            return None
        h = first._state.guard(first._flat_product(inputs), first.name)
        none = tf.zeros([0], h.dtype)

        def bias(layer: SparseDense) -> tf.Tensor:
            return none if layer.bias is None else tf.cast(layer.bias, h.dtype)

        y = tower_tail.tower_tail(
            h, bias(first), [tf.cast(layer.values, h.dtype) for layer in rest], [bias(layer) for layer in rest],
            self.widths, self.n_towers, relu=name == "relu",
        )
        if self.output_activation is not None:
            y = self.output_activation(y)
        for layer in rest:
            y = layer._state.guard(y, layer.name)
        if isinstance(inputs, tf.SparseTensor) or len(inputs.shape) == 2:
            return y
        return tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [self.n_towers * self.output_units]], axis=0))

    def _in_tower_layout(self) -> bool:
        """True while every layer after the first still has its block-diagonal
        pattern (``set_pattern`` may replace it) and the block kernel."""
        return len(self.tower_layers) > 1 and not layers_observed() and all(
            layer.pattern is pattern and layer._kernel_choice == "block"
            for layer, pattern in zip(self.tower_layers[1:], self._built_patterns[1:])
        )

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[:-1]) + (self.n_towers * self.output_units,)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask  # as Dense: a mask over the leading axes passes through

    # Per-tower views -------------------------------------------------------

    def output_layout(self) -> np.ndarray:
        """Tower index of every output column, shape ``(n_towers * output_units,)``."""
        return np.repeat(np.arange(self.n_towers), self.output_units)

    def output_columns(self, tower: int) -> np.ndarray:
        """Output columns that belong to ``tower``."""
        tower = check_int(tower, "tower", minimum=0, maximum=self.n_towers - 1)
        return np.arange(tower * self.output_units, (tower + 1) * self.output_units)

    def tower_weights(self, tower: int) -> list[np.ndarray]:
        """Tower ``tower`` as plain arrays ``[kernel_0, bias_0, kernel_1, ...]``.

        Each kernel is dense ``(in, out)`` for that tower alone, in the order
        ``keras.layers.Dense.set_weights`` expects for a stack of Dense layers.
        """
        tower = check_int(tower, "tower", minimum=0, maximum=self.n_towers - 1)
        weights = []
        widths_in = [self.tower_layers[0].input_dim, *self.widths[:-1]]
        for k, layer in enumerate(self.tower_layers):
            w_in, w_out = widths_in[k], self.widths[k]
            rows = slice(0, w_in) if k == 0 else slice(tower * w_in, (tower + 1) * w_in)
            cols = slice(tower * w_out, (tower + 1) * w_out)
            weights.append(layer.to_scipy()[rows, cols].toarray())
            if layer.bias is not None:
                weights.append(keras.ops.convert_to_numpy(layer.bias)[cols])
        return weights

    def get_config(self) -> dict[str, Any]:
        base_config = super().get_config()
        config = {
            "n_towers": self.n_towers,
            "hidden_units": list(self.hidden_units),
            "output_units": self.output_units,
            "activation": keras.activations.serialize(self.activation),
            "output_activation": keras.activations.serialize(self.output_activation),
            "use_bias": self.use_bias,
            "values_initializer": keras.initializers.serialize(self.values_initializer),
            "kernel": self.kernel,
        }
        if self.tower_layers:
            current = [
                None if layer.pattern is built_in else layer.pattern.get_config()
                for layer, built_in in zip(self.tower_layers, self._built_patterns)
            ]
            if any(p is not None for p in current):
                config["layer_patterns"] = current
        elif self._layer_patterns is not None:
            config["layer_patterns"] = [None if p is None else p.get_config() for p in self._layer_patterns]
        return {**base_config, **config}
