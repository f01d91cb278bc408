"""`SparseEmbedding`: an embedding table that stores only a pattern's entries.

The table is the kernel, ``(input_dim, output_dim)``, and is its own 2-D
view. A lookup is the product of the ids' one-hot rows with the table,
computed by a lookup kernel (:mod:`sparselayers.ops.lookup`) that reads
each id's row of the sparse table and never forms the dense one.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers.ops.choose import fits_dense
from sparselayers.ops.context import export_format, export_gather_graph, kernel_context
from sparselayers.ops.lookup import lookup_kernel, one_hot
from sparselayers.sparse_kernel import (
    _ELEMENTWISE_CONSTRAINTS,
    _ELEMENTWISE_REGULARIZERS,
    SparseKernelLayer,
    register_twin,
)

#: Config keys of the base layer that an embedding does not take.
_NOT_EMBEDDING = ("activation", "use_bias", "bias_initializer", "bias_regularizer", "bias_constraint", "kernel")


@register_twin(keras.layers.Embedding)
@keras.saving.register_keras_serializable(package="sparselayers")
class SparseEmbedding(SparseKernelLayer):
    """``keras.layers.Embedding`` whose table is restricted to a fixed sparsity pattern.

    Looks up what ``keras.layers.Embedding(input_dim, output_dim)`` looks up
    with the table zero outside ``pattern``: id ``i`` maps to row ``i`` of
    the ``(input_dim, output_dim)`` table, whose only weights are
    ``values`` (``values[k]`` sits at ``pattern.indices[k]``). Gradients
    reach only the entries of the rows looked up. Memory and work follow
    the pattern's entries, never ``input_dim * output_dim``.

    Args:
        pattern: a :class:`~sparselayers.SparsityPattern`, scipy.sparse
            matrix or 0/1 mask of shape ``(input_dim, output_dim)``.
        mask_zero: whether id 0 is padding, masked out downstream, as for
            ``Embedding`` (the table keeps its row 0).
        values_initializer: default ``"uniform"``, as ``Embedding``'s table.
        values_regularizer: Keras regularizer of ``values``.
        activity_regularizer: Keras regularizer of the output.
        values_constraint: Keras constraint on ``values``.
        **kwargs: Keras ``Layer`` arguments (``name``, ``dtype``, ...).

    Raises:
        TypeError: ``mask_zero`` not a bool, or (at call) ids that are not
            integers.

    Example:

    >>> import numpy as np, sparselayers as sl
    >>> layer = sl.SparseEmbedding(sl.patterns.random((1000, 16), density=0.1, seed=0), mask_zero=True)
    >>> ids = np.array([[3, 999, 0]])
    >>> layer(ids).shape, layer.compute_mask(ids).numpy().tolist()
    (TensorShape([1, 3, 16]), [[True, True, False]])
    >>> bool(np.array_equal(layer(ids)[0, 1], layer.to_dense()[999]))
    True
    """

    def __init__(
        self,
        pattern: Any,
        mask_zero: bool = False,
        values_initializer: Any = "uniform",
        values_regularizer: Any = None,
        activity_regularizer: Any = None,
        values_constraint: Any = None,
        **kwargs: Any,
    ):
        super().__init__(
            pattern,
            use_bias=False,
            values_initializer=values_initializer,
            values_regularizer=values_regularizer,
            activity_regularizer=activity_regularizer,
            values_constraint=values_constraint,
            **kwargs,
        )
        if not isinstance(mask_zero, (bool, np.bool_)):
            raise TypeError(f"`mask_zero` must be a bool. Received: mask_zero={mask_zero!r}")
        self.input_dim, self.output_dim = self.pattern.shape
        self.mask_zero = bool(mask_zero)
        self.supports_masking = self.mask_zero

    # The Keras layer this type replaces -------------------------------------------

    @classmethod
    def check_dense_layer(cls, layer: keras.layers.Layer) -> str | None:
        if getattr(layer, "lora_enabled", False):
            return "it has LoRA enabled (merge or drop the LoRA weights first)"
        return super().check_dense_layer(layer)

    @classmethod
    def dense_kernel_variable(cls, layer: keras.layers.Layer) -> Any:
        return layer.embeddings

    @classmethod
    def from_dense_layer(cls, layer: keras.layers.Layer, pattern: Any) -> SparseEmbedding:
        regularizer, constraint = layer.embeddings_regularizer, layer.embeddings_constraint
        return cls(
            pattern,
            mask_zero=layer.mask_zero,
            values_regularizer=regularizer if isinstance(regularizer, _ELEMENTWISE_REGULARIZERS) else None,
            activity_regularizer=layer.activity_regularizer,
            values_constraint=constraint if isinstance(constraint, _ELEMENTWISE_CONSTRAINTS) else None,
            name=layer.name,
            dtype=layer.dtype_policy,
            trainable=layer.trainable,
        )

    # Keras layer --------------------------------------------------------------------

    def build(self, input_shape: Any = None) -> None:
        self.build_sparse()

    def set_kernel(self, kernel: str) -> None:
        """Lookups have no kernel to choose: ``"auto"`` only (ragged; padded under XLA; a table gather in LiteRT, ONNX)."""
        if kernel != "auto":
            raise ValueError(f"`kernel` must be 'auto' for SparseEmbedding. Received: kernel={kernel!r}")
        self._kernel_choice, self._kernel_in_use, self._kernel_request = "ragged_lookup", None, kernel
        self.jit_kernel_name, self.supports_jit = "padded_lookup", True

    def _select_kernel(self, flat: tf.SparseTensor | None = None) -> Any:
        # The ragged lookup's shapes follow the ids: under XLA and SavedModel
        # export the padded form; LiteRT and ONNX gather from the table,
        # which their converters store sparse (gather_graph(): padded).
        context = kernel_context()
        if context == "default":
            name = "ragged_lookup"
        elif (context == "export" and export_format() in ("litert", "onnx") and not export_gather_graph()
              and fits_dense(self.pattern)):  # a table too large to fold keeps the padded form
            name = "table_lookup"
        else:
            name = "padded_lookup"
        kernel = lookup_kernel(name, self.pattern)
        self._kernel_in_use = kernel.name
        return kernel

    def call(self, inputs):
        ids = inputs
        if not ids.dtype.is_integer:
            if not ids.dtype.is_floating:
                raise TypeError(f"SparseEmbedding needs integer ids. Received: inputs of dtype {ids.dtype.name}")
            ids = tf.cast(ids, tf.int64)  # as Embedding, which casts float ids
        flat = tf.reshape(ids, [-1])
        if kernel_context() == "export":
            # Exports read the ids directly: no one-hot ops in the artifact.
            y = self._select_kernel().lookup(flat, tf.cast(self.values, self.compute_dtype))
        else:
            y = self._sparse_product(one_hot(flat, self.input_dim, self.compute_dtype))
        y = self._finish(y)
        return tf.reshape(y, tf.concat([tf.shape(ids), [self.output_dim]], axis=0))

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        if not self.mask_zero:
            return None
        return keras.ops.not_equal(inputs, 0)

    def compute_output_shape(self, input_shape: Any) -> tuple:
        return (*input_shape, self.output_dim)

    def get_config(self) -> dict[str, Any]:
        config = {key: value for key, value in super().get_config().items() if key not in _NOT_EMBEDDING}
        return {**config, "mask_zero": self.mask_zero}
