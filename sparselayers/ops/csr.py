"""TensorFlow's CSR sparse-matrix kernels with a memory-bounded gradient."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as csr_ops

from sparselayers.ops.base import Kernel, constant

#: Entries per step of the values gradient: bounds its ``(chunk, batch)``
#: intermediates (64 MiB at batch 256 in float32).
GRADIENT_CHUNK = 65536

_CSR_DTYPES = (tf.float32, tf.float64)


class CSRKernel(Kernel):
    """``SparseMatrixMatMul`` on CSR forms of ``W`` and ``W.T``.

    The forward pass multiplies by ``W.T`` in CSR (so the product is
    row-parallel over output units); the input gradient multiplies by ``W``;
    the values gradient is a sampled dense-dense product
    ``sum_b x[b, i] * dy[b, j]`` evaluated in chunks of
    :data:`GRADIENT_CHUNK` entries. TF's own CSR gradient is far slower.
    Float16 and bfloat16 inputs are computed in float32. No XLA kernel.
    """

    name = "csr"
    supports_jit = False

    def __init__(self, pattern, *, chunk: int = GRADIENT_CHUNK):
        super().__init__(pattern)
        n, m = pattern.shape
        transposed = np.lexsort((pattern.rows, pattern.cols))
        self._transposed_order = constant(transposed, tf.int64)
        self._indices = constant(pattern.indices, tf.int64)
        self._indices_t = constant(pattern.indices[transposed][:, ::-1], tf.int64)
        self._chunks = [
            (constant(pattern.rows[s : s + chunk], tf.int64), constant(pattern.cols[s : s + chunk], tf.int64))
            for s in range(0, pattern.nnz, chunk)
        ]
        self._shape = np.array([n, m], np.int64)

    def _product(self, indices, values, shape, dense):
        """``(A @ dense.T).T`` for the sparse ``A`` given in canonical COO."""
        matrix = csr_ops.sparse_tensor_to_csr_sparse_matrix(indices, values, shape)
        return csr_ops.sparse_matrix_mat_mul(matrix, dense, transpose_b=True, transpose_output=True)

    def __call__(self, x, values):
        dtype = x.dtype
        if dtype not in _CSR_DTYPES:
            x, values = tf.cast(x, tf.float32), tf.cast(values, tf.float32)
        y = self._matmul(x, values)
        return tf.cast(y, dtype)

    def _matmul(self, x, values):
        shape_t = self._shape[::-1].copy()

        @tf.custom_gradient
        def matmul(x, values):
            y = self._product(self._indices_t, tf.gather(values, self._transposed_order), shape_t, x)

            def grad(dy):
                dx = self._product(self._indices, values, self._shape, dy)
                x_t, dy_t = tf.transpose(x), tf.transpose(dy)
                dvalues = [
                    tf.reduce_sum(tf.gather(x_t, rows) * tf.gather(dy_t, cols), axis=1)
                    for rows, cols in self._chunks
                ]
                dvalues = tf.concat(dvalues, 0) if dvalues else tf.zeros_like(values)
                return dx, dvalues

            return y, grad

        return matmul(x, values)
