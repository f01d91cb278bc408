"""TensorFlow's CSR sparse-matrix kernels with a memory-bounded gradient."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as csr_ops

from sparselayers.ops.base import Kernel, constant, index_dtype

#: Entries per step of the values gradient. Small chunks keep the two
#: ``(chunk, batch)`` gathers in cache: on the 2-core benchmark machine
#: (4096 x 4096 at 1%, batch 256) a training step took 15.5 ms with chunks of
#: 4096 entries, 25 ms with 32768 and 29 ms with 65536.
GRADIENT_CHUNK = 4096
#: At most this many chunks per pattern (larger patterns get larger chunks),
#: so that graphs stay small.
MAX_CHUNKS = 256
#: Chunks of the values gradient computed concurrently: keeps both cores
#: busy while the memory stays bounded.
IN_FLIGHT = 2

_CSR_DTYPES = (tf.float32, tf.float64)


class CSRKernel(Kernel):
    """``SparseMatrixMatMul`` on the CSR form of ``W.T``.

    The pattern is held once, as its coordinates in canonical order and the
    permutation to ``W.T``'s row-major order, in int32 where they fit: 12
    bytes per entry. Each call builds the CSR form of ``W.T`` (TF's
    constructor takes int64 coordinates, cast for the call only) and
    multiplies by it, row-parallel over output units; the input gradient
    multiplies by its transpose; the values gradient is a sampled
    dense-dense product ``sum_b x[b, i] * dy[b, j]`` evaluated in chunks of
    :data:`GRADIENT_CHUNK` entries, each slicing its coordinates from the one
    index array. TF's own CSR gradient is far slower. Float16 and bfloat16
    inputs are computed in float32. No XLA kernel.
    """

    name = "csr"
    supports_jit = False

    def __init__(self, pattern, *, chunk: int | None = None):
        super().__init__(pattern)
        self._chunk = chunk or max(GRADIENT_CHUNK, -(-pattern.nnz // MAX_CHUNKS))
        n, m = pattern.shape
        dtype = index_dtype(max(n, m, pattern.nnz))
        self._indices = constant(pattern.indices, dtype)
        self._order = constant(np.lexsort((pattern.rows, pattern.cols)), dtype)
        self._shape_t = np.array([m, n], np.int64)

    def __call__(self, x, values):
        dtype = x.dtype
        if dtype not in _CSR_DTYPES:
            x, values = tf.cast(x, tf.float32), tf.cast(values, tf.float32)
        y = self._matmul(x, values)
        return tf.cast(y, dtype)

    def _matmul(self, x, values):
        nnz, chunk, shape_t = self.pattern.nnz, self._chunk, self._shape_t

        # The index tensors are explicit inputs, not closures, so that a
        # SavedModel captures them with the forward function and can save
        # this custom gradient.
        @tf.custom_gradient
        def matmul(x, values, indices, order):
            indices_t = tf.cast(tf.reverse(tf.gather(indices, order), axis=[1]), tf.int64)
            matrix_t = csr_ops.sparse_tensor_to_csr_sparse_matrix(indices_t, tf.gather(values, order), shape_t)
            # (W.T @ x.T).T = x @ W
            y = csr_ops.sparse_matrix_mat_mul(matrix_t, x, transpose_b=True, transpose_output=True)

            def grad(dy):
                # (W @ dy.T).T = dy @ W.T; an explicit transpose measured
                # faster than the product's transpose_a.
                matrix = csr_ops.sparse_matrix_transpose(matrix_t, type=x.dtype)
                dx = csr_ops.sparse_matrix_mat_mul(matrix, dy, transpose_b=True, transpose_output=True)
                x_t, dy_t = tf.transpose(x), tf.transpose(dy)
                # The chunks start once dx is done, so that the CSR matrices
                # are freed before their transients pile up.
                parts = [dx]
                for start in range(0, nnz, chunk):
                    # At most IN_FLIGHT chunks at a time: enough to keep the
                    # cores busy, few enough to keep the memory bound.
                    with tf.control_dependencies([parts[-IN_FLIGHT]] if len(parts) >= IN_FLIGHT else [dx]):
                        rows, cols = tf.unstack(indices[start : start + chunk], axis=1)
                        parts.append(tf.reduce_sum(tf.gather(x_t, rows) * tf.gather(dy_t, cols), axis=1))
                dvalues = tf.concat(parts[1:], 0) if nnz else tf.zeros_like(values)
                return dx, dvalues, None, None

            return y, grad

        return matmul(x, values, self._indices, self._order)
