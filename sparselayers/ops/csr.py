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

    The pattern is held once, as the coordinates of ``W.T`` in its row-major
    order (int64: the only type TF's CSR constructor takes) and the
    permutations between that order and the canonical one (int32 where it
    fits): 24 bytes per entry, and no larger transient than the CSR matrix.
    Each call builds the CSR form of ``W.T`` and multiplies by it,
    row-parallel over output units; the input gradient multiplies by its
    transpose; the values gradient is a sampled dense-dense product
    ``sum_b x[b, i] * dy[b, j]`` evaluated in chunks of
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
        self._index_dtype = index_dtype(max(n, m, pattern.nnz))
        order = np.lexsort((pattern.rows, pattern.cols))
        self._indices_t = constant(pattern.indices[order][:, ::-1], tf.int64)
        self._order = constant(order, self._index_dtype)
        self._inverse = constant(np.argsort(order), self._index_dtype)
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
        def matmul(x, values, indices_t, order, inverse):
            def w_t():
                return csr_ops.sparse_tensor_to_csr_sparse_matrix(indices_t, tf.gather(values, order), shape_t)

            # (W.T @ x.T).T = x @ W
            y = csr_ops.sparse_matrix_mat_mul(w_t(), x, transpose_b=True, transpose_output=True)

            def grad(dy):
                # (W @ dy.T).T = dy @ W.T; an explicit transpose measured
                # faster than the product's transpose_a. The matrix is built
                # again: a SavedModel cannot save a gradient that captures
                # the forward's intermediate tensors.
                matrix = csr_ops.sparse_matrix_transpose(w_t(), type=x.dtype)
                dx = csr_ops.sparse_matrix_mat_mul(matrix, dy, transpose_b=True, transpose_output=True)
                x_t, dy_t = tf.transpose(x), tf.transpose(dy)
                # The chunks start once dx is done, so that the CSR matrices
                # are freed before their transients pile up.
                parts = [dx]
                for start in range(0, nnz, chunk):
                    # At most IN_FLIGHT chunks at a time: enough to keep the
                    # cores busy, few enough to keep the memory bound.
                    with tf.control_dependencies([parts[-IN_FLIGHT]] if len(parts) >= IN_FLIGHT else [dx]):
                        cols, rows = tf.unstack(tf.cast(indices_t[start : start + chunk], self._index_dtype), axis=1)
                        parts.append(tf.reduce_sum(tf.gather(x_t, rows) * tf.gather(dy_t, cols), axis=1))
                # From W.T's order back to the canonical order of `values`.
                dvalues = tf.gather(tf.concat(parts[1:], 0), inverse) if nnz else tf.zeros_like(values)
                return dx, dvalues, None, None, None

            return y, grad

        return matmul(x, values, self._indices_t, self._order, self._inverse)
