"""`SparseDense`: a Dense layer whose only kernel weights are a pattern's entries."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers import seams
from sparselayers.ops.sparse_input import SPARSE_INPUT, sparse_input_matmul
from sparselayers.sparse_kernel import SparseKernelLayer, as_pattern, register_twin
from sparselayers.sparsity_pattern import SparsityPattern

__all__ = ["SparseDense", "as_pattern", "sparse_dense_layers"]


def sparse_dense_layers(model: keras.layers.Layer) -> list[SparseDense]:
    """Every `SparseDense` inside ``model``, nested models and ``Towers`` included.

    Args:
        model: a Keras model or layer (itself included if a SparseDense).

    Returns:
        The layers in a fixed traversal order (equal for equal architectures).

    Example:

    >>> import sparselayers as sl
    >>> towers = sl.Towers(2, hidden_units=[3])
    >>> towers.build((None, 4))
    >>> sorted(layer.name for layer in sl.callbacks.sparse_dense_layers(towers))
    ['tower_layer_0', 'tower_layer_1']
    """
    found = model._flatten_layers(include_self=True, recursive=True)
    return [layer for layer in found if isinstance(layer, SparseDense)]


@register_twin(keras.layers.Dense)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseDense(SparseKernelLayer):
    """Densely-connected layer restricted to a fixed sparsity pattern.

    Computes ``activation(x @ W + bias)`` where the ``(input_dim, units)``
    kernel ``W`` is zero outside ``pattern``. The only kernel weight is
    ``values``, a 1-D variable of ``pattern.nnz`` entries in canonical order:
    ``values[k]`` sits at ``pattern.indices[k]``. Gradients reach ``values``,
    ``bias`` and the input, never the positions outside the pattern.
    A 2-D ``tf.SparseTensor`` input (and scipy sparse data in ``fit``) is
    read from its nonzeros, never densified (see ``docs/sparse-inputs.md``).

    Args:
        pattern: a :class:`SparsityPattern`, a scipy.sparse matrix or array
            (its stored entries), or a 2-D 0/1 mask.
        activation: Keras activation, default none.
        use_bias: whether to add a bias of ``units`` entries.
        values_initializer: default :class:`SparseGlorotUniform`, which uses
            each entry's real fan-in and fan-out; any Keras initializer works.
        bias_initializer: default ``"zeros"``.
        values_regularizer: Keras regularizer of ``values``.
        bias_regularizer: Keras regularizer of the bias.
        activity_regularizer: Keras regularizer of the output.
        values_constraint: Keras constraint on ``values``.
        bias_constraint: Keras constraint on the bias.
        kernel: ``"auto"`` or a name from :data:`sparselayers.ops.KERNELS`:
            the implementation of the product (see ``docs/kernels.md``).
        **kwargs: Keras ``Layer`` arguments (``name``, ``dtype``, ...).

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> layer = sl.SparseDense(sl.patterns.block_diagonal([(4, 2)] * 3))
    >>> layer(np.ones((5, 12), "float32")).shape
    TensorShape([5, 6])
    >>> tuple(layer.values.shape), layer.count_params()
    ((24,), 30)
    """

    def __init__(
        self,
        pattern: Any,
        activation: Any = None,
        use_bias: bool = True,
        values_initializer: Any = None,
        bias_initializer: Any = "zeros",
        values_regularizer: Any = None,
        bias_regularizer: Any = None,
        activity_regularizer: Any = None,
        values_constraint: Any = None,
        bias_constraint: Any = None,
        kernel: str = "auto",
        **kwargs: Any,
    ):
        super().__init__(
            pattern,
            activation=activation,
            use_bias=use_bias,
            values_initializer=values_initializer,
            bias_initializer=bias_initializer,
            values_regularizer=values_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            values_constraint=values_constraint,
            bias_constraint=bias_constraint,
            kernel=kernel,
            **kwargs,
        )
        self.input_dim = self.pattern.shape[0]
        self.supports_masking = True
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: self.input_dim})

    @classmethod
    def check_dense_layer(cls, layer: keras.layers.Layer) -> str | None:
        rank = len(layer.kernel.shape)
        if rank != 2:
            return f"its kernel has rank {rank}; SparseDense needs a 2-D (input_dim, units) kernel"
        return super().check_dense_layer(layer)

    @classmethod
    def from_scipy(cls, matrix: Any, **kwargs: Any) -> SparseDense:
        """A built layer whose pattern and initial values are ``matrix``'s stored entries.

        >>> import scipy.sparse, sparselayers as sl
        >>> m = scipy.sparse.random_array((6, 4), density=0.5, random_state=0)
        >>> layer = sl.SparseDense.from_scipy(m, use_bias=False)
        >>> bool(abs(layer.to_scipy() - m).max() < 1e-6)
        True
        """
        pattern, data = SparsityPattern._from_scipy_with_data(matrix)
        layer = cls(pattern, **kwargs)
        layer.build((None, pattern.shape[0]))
        layer.values.assign(np.asarray(data, dtype=layer.values.dtype))
        return layer

    def build(self, input_shape: Any) -> None:
        last = input_shape[-1] if len(input_shape) else None
        if last != self.input_dim:
            raise ValueError(
                f"The last dimension of the input must equal the pattern's input_dim={self.input_dim}. "
                f"Received: input_shape={tuple(input_shape)} (last dimension {last})"
            )
        self.build_sparse()

    def call(self, inputs):
        y = self._finish(self._flat_product(inputs))
        if not isinstance(inputs, tf.SparseTensor) and len(inputs.shape) != 2:
            y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [self.units]], axis=0))
        return y

    def _flat_product(self, inputs: Any) -> tf.Tensor:
        """``inputs @ W`` over every leading axis, ``(n, units)``: before the bias and activation."""
        if isinstance(inputs, tf.SparseTensor):  # read from its nonzeros, never densified
            self._kernel_in_use = SPARSE_INPUT
            return sparse_input_matmul(inputs, self.pattern, self.values, self.compute_dtype)
        x = inputs
        if x.dtype == tf.string or x.dtype == tf.bool:
            raise TypeError(f"SparseDense needs numeric inputs. Received: inputs of dtype {x.dtype.name}")
        if not x.dtype.is_floating:
            x = tf.cast(x, self.compute_dtype)
        return self._sparse_product(tf.reshape(x, [-1, self.input_dim]))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return tuple(input_shape[:-1]) + (self.units,)

    def to_frame(self) -> Any:
        """Every entry as a pandas DataFrame ``input, output, weight``: names when the pattern has them.

        See :func:`sparselayers.knowledge.layer_frame`; needs pandas.
        """
        return seams.frame(self)

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask  # as Dense: a mask over the leading axes passes through
