"""The reference mechanism: ``tf.sparse.sparse_dense_matmul``."""

from __future__ import annotations

import tensorflow as tf

from sparselayers.ops.base import Kernel, constant


class SparseTensorKernel(Kernel):
    """Builds a ``tf.SparseTensor`` from constant indices and ``values``.

    Always available and the definition every other kernel is checked
    against; single-threaded on CPU and without an XLA kernel.
    """

    name = "sparse_dense_matmul"
    supports_jit = False

    def __init__(self, pattern):
        super().__init__(pattern)
        self._indices = constant(pattern.indices, tf.int64)

    def __call__(self, x, values):
        weights = tf.SparseTensor(self._indices, values, self.pattern.shape)
        return tf.sparse.sparse_dense_matmul(x, weights)
