"""TensorFlow's CSR sparse-matrix kernels with a memory-bounded gradient."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as csr_ops

from sparselayers.ops.base import Kernel, constant

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

    def __init__(self, pattern, *, chunk: int | None = None):
        super().__init__(pattern)
        chunk = chunk or max(GRADIENT_CHUNK, -(-pattern.nnz // MAX_CHUNKS))
        n, m = pattern.shape
        transposed = np.lexsort((pattern.rows, pattern.cols))
        self._transposed_order = constant(transposed, tf.int64)
        self._indices = constant(pattern.indices, tf.int64)
        self._indices_t = constant(pattern.indices[transposed][:, ::-1], tf.int64)
        # Flat (rows, cols, rows, cols, ...) per chunk: the custom gradient
        # takes them as positional inputs.
        self._chunks = [
            constant(array[s : s + chunk], tf.int64)
            for s in range(0, pattern.nnz, chunk)
            for array in (pattern.rows, pattern.cols)
        ]
        self._shape = np.array([n, m], np.int64)
        self._shape_t = np.array([m, n], np.int64)

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
        # The index tensors are explicit inputs, not closures, so that a
        # SavedModel captures them with the forward function and can save
        # this custom gradient.
        @tf.custom_gradient
        def matmul(x, values, indices, indices_t, order, *chunks):
            y = self._product(indices_t, tf.gather(values, order), self._shape_t, x)

            def grad(dy):
                dx = self._product(indices, values, self._shape, dy)
                x_t, dy_t = tf.transpose(x), tf.transpose(dy)
                dvalues = []
                for rows, cols in zip(chunks[::2], chunks[1::2]):
                    # At most IN_FLIGHT chunks at a time: enough to keep the
                    # cores busy, few enough to keep the memory bound.
                    waits_for = [dvalues[-IN_FLIGHT]] if len(dvalues) >= IN_FLIGHT else []
                    with tf.control_dependencies(waits_for):
                        dvalues.append(tf.reduce_sum(tf.gather(x_t, rows) * tf.gather(dy_t, cols), axis=1))
                dvalues = tf.concat(dvalues, 0) if dvalues else tf.zeros_like(values)
                return (dx, dvalues, None, None, None, *[None] * len(chunks))

            return y, grad

        return matmul(x, values, self._indices, self._indices_t, self._transposed_order, *self._chunks)
