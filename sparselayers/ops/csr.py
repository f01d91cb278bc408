"""TensorFlow's CSR sparse-matrix kernels with a memory-bounded gradient."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as csr_ops

from sparselayers.ops.base import Kernel, constant, index_dtype
from sparselayers.ops.sampled import STRATEGIES

_CSR_DTYPES = (tf.float32, tf.float64)


class CSRKernel(Kernel):
    """``SparseMatrixMatMul`` on the CSR form of ``W.T``.

    The pattern is held as the coordinates of ``W.T`` in its row-major
    order (int64: the only type TF's CSR constructor takes) and the
    permutation from the canonical order to that one (int32 where it fits),
    20 bytes per entry, and the values gradient's indices, about 12.
    Each call builds the CSR form of ``W.T`` and multiplies by it,
    row-parallel over output units; the input gradient multiplies by its
    transpose; the values gradient is a sampled dense-dense product
    ``sum_b x[b, i] * dy[b, j]``, computed by
    :class:`~sparselayers.ops.sampled.GroupedSampledProduct` in small
    matmuls over groups of output columns (``options`` go to it). TF's own
    CSR gradient is far slower. The subclasses below use the other
    strategies for the values gradient; ``sl.autotune`` times them all. Float16 and bfloat16 inputs are computed in float32. No XLA
    kernel.
    """

    name = "csr"
    supports_jit = False
    #: The values-gradient strategy (:data:`sparselayers.ops.sampled.STRATEGIES`).
    values_gradient = "grouped"

    def __init__(self, pattern, **options):
        super().__init__(pattern)
        self._sampled = STRATEGIES[self.values_gradient](pattern, **options)
        n, m = pattern.shape
        self._index_dtype = index_dtype(max(n, m, pattern.nnz))
        order = np.lexsort((pattern.rows, pattern.cols))
        self._indices_t = constant(pattern.indices[order][:, ::-1], tf.int64)
        self._order = constant(order, self._index_dtype)
        self._shape_t = np.array([m, n], np.int64)

    def __call__(self, x, values):
        dtype = x.dtype
        if dtype not in _CSR_DTYPES:
            x, values = tf.cast(x, tf.float32), tf.cast(values, tf.float32)
        y = self._matmul(x, values)
        return tf.cast(y, dtype)

    def _matmul(self, x, values):
        shape_t = self._shape_t

        # The index tensors are explicit inputs, not closures, so that a
        # SavedModel captures them with the forward function and can save
        # this custom gradient.
        @tf.custom_gradient
        def matmul(x, values, indices_t, order, *sampled):
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
                # The values gradient starts once dx is done, so that the
                # CSR matrices are freed before its temporaries pile up.
                with tf.control_dependencies([dx]):
                    dvalues = self._sampled(x, dy, sampled)
                return (dx, dvalues) + (None,) * (2 + len(sampled))

            return y, grad

        return matmul(x, values, self._indices_t, self._order, *self._sampled.tensors)


class CSRGatherKernel(CSRKernel):
    """:class:`CSRKernel` whose values gradient gathers both operands per entry
    (:class:`~sparselayers.ops.sampled.GatheredSampledProduct`)."""

    name = "csr_gather"
    values_gradient = "gather"


class CSRDenseGradKernel(CSRKernel):
    """:class:`CSRKernel` whose values gradient is read from the dense ``x.T @ dy``
    (:class:`~sparselayers.ops.sampled.DenseSampledProduct`): a GEMM, for
    devices where it beats gathers. Needs the dense kernel's memory."""

    name = "csr_dense_grad"
    values_gradient = "dense"
