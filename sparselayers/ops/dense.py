"""Densify ``values`` into the full kernel, then one matmul: for high densities."""

from __future__ import annotations

import tensorflow as tf

from sparselayers.ops.base import Kernel, constant


class DenseKernel(Kernel):
    """Scatters ``values`` into an ``(input_dim, units)`` kernel and multiplies.

    Memory and FLOPs are those of a dense layer, but only ``values`` is a
    variable, so gradients and optimizer state stay ``nnz``-sized. XLA
    compiles it.
    """

    name = "dense"
    supports_jit = True

    def __init__(self, pattern):
        super().__init__(pattern)
        self._indices = constant(pattern.indices, tf.int64)

    def __call__(self, x, values):
        # SparseToDense without validation measured faster than scatter_nd.
        weights = tf.sparse.to_dense(
            tf.SparseTensor(self._indices, values, self.pattern.shape), validate_indices=False
        )
        return tf.matmul(x, weights)
