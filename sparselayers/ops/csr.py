"""TensorFlow's CSR sparse-matrix kernels with a memory-bounded gradient."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as csr_ops

from sparselayers.ops.base import Kernel, constant, empty_product
from sparselayers.ops.sampled import STRATEGIES

#: Entries per CSR matrix. TF builds a CSR matrix from int64 coordinates
#: only, so a matrix costs its int64 coordinates (16 bytes per entry), its
#: own arrays (8) and, in the forward pass, its transpose (8) while it is
#: built. Larger patterns are split into bands of whole rows of this many
#: entries at most, multiplied one after the other.
BAND_ENTRIES = 2**22

#: Entries above which ``csr`` computes the values gradient by gathers
#: (:class:`~sparselayers.ops.sampled.GatheredSampledProduct`, reading the
#: kernel's own coordinates) instead of grouped matmuls, whose index
#: constants take about 12 bytes per entry more. Grouped matmuls win where
#: the gathered rows of ``x.T`` stay in cache (4096 x 4096 at 1%, batch 256,
#: Intel Xeon: values gradient 33 vs 61 ms); at 100,000 x 100,000 with 10^6
#: entries and batch 64 they gain nothing (202.7 vs 197.1 ms a step), and
#: at 10^7 entries the 12 bytes took the training peak from 74-78 to 88-92
#: bytes per entry.
GROUPED_MAX_ENTRIES = 2**22

_CSR_DTYPES = (tf.float32, tf.float64)


def row_bands(pattern, limit: int) -> list[tuple[int, int, int, int]]:
    """``(first entry, end entry, first row, end row)`` of consecutive bands of whole rows.

    Each band holds at most ``limit`` entries unless one row holds more; the
    bands cover every row, so their input gradients concatenate to ``dx``.
    """
    pointers = pattern.row_pointers
    bands, row = [], 0
    while row < pattern.shape[0]:
        # The last row whose band still fits, at least one row further.
        end = max(row + 1, int(np.searchsorted(pointers, pointers[row] + limit, side="right")) - 1)
        bands.append((int(pointers[row]), int(pointers[end]), row, end))
        row = end
    return bands


class CSRKernel(Kernel):
    """``SparseMatrixMatMul`` on the CSR form of ``W``, band of rows by band.

    The pattern is held once for the products, as its canonical int32
    coordinates (8 bytes per entry): canonical order is the CSR order of
    ``W``, so ``values`` need no permutation. Each call builds, band after
    band of :data:`BAND_ENTRIES` entries, the CSR form of the band's rows
    from its coordinates cast to int64 (the only type TF's CSR constructor
    takes), transposes it and multiplies: ``x @ W`` is the sum of the bands'
    products, row-parallel over output units. The input gradient multiplies
    ``dy`` by each band, giving that band's columns of ``dx``. The values
    gradient is a sampled dense-dense product ``sum_b x[b, i] * dy[b, j]``,
    computed by :class:`~sparselayers.ops.sampled.GroupedSampledProduct` in
    small matmuls over groups of output columns (``options`` go to it),
    with index constants of its own (about 12 bytes per entry); past
    :data:`GROUPED_MAX_ENTRIES` entries by
    :class:`~sparselayers.ops.sampled.GatheredSampledProduct`, which reads
    the kernel's coordinates. TF's own
    CSR gradient is far slower. The subclasses below use the other
    strategies for the values gradient; ``sl.autotune`` times them all.
    Float16 and bfloat16 inputs are computed in float32. No XLA kernel.
    """

    name = "csr"
    supports_jit = False
    #: The values-gradient strategy (:data:`sparselayers.ops.sampled.STRATEGIES`).
    values_gradient = "grouped"

    def __init__(self, pattern, *, band: int = BAND_ENTRIES, **options):
        super().__init__(pattern)
        self._bands = row_bands(pattern, band)
        # Every index is below 2**31 (SparsityPattern stores int32).
        self._indices = constant(pattern.indices, tf.int32)
        strategy = self.values_gradient
        if strategy == "grouped" and pattern.nnz > GROUPED_MAX_ENTRIES:
            strategy = "gather"
        if strategy == "gather":
            options.setdefault("indices", self._indices)  # shared: no second copy
        self._sampled = STRATEGIES[strategy](pattern, **options)

    def __call__(self, x, values):
        dtype = x.dtype
        if dtype not in _CSR_DTYPES:
            x, values = tf.cast(x, tf.float32), tf.cast(values, tf.float32)
        # oneDNN's SparseMatrixMatMul aborts on a dense operand without
        # columns (x.T of an empty batch): an empty batch gets zeros.
        batch, units = x.shape[0], self.pattern.shape[1]
        if batch == 0:
            y = empty_product(x, values, units)
        elif batch is None:
            y = tf.cond(
                tf.shape(x)[0] > 0, lambda: self._matmul(x, values), lambda: empty_product(x, values, units)
            )
        else:
            y = self._matmul(x, values)
        return tf.cast(y, dtype)

    def _matmul(self, x, values):
        bands, units = self._bands, self.pattern.shape[1]

        def band_matrix(indices, values, band):
            start, end, first, last = band
            coordinates = tf.cast(indices[start:end], tf.int64) - tf.constant([first, 0], tf.int64)
            return csr_ops.sparse_tensor_to_csr_sparse_matrix(
                coordinates, values[start:end], np.array([last - first, units], np.int64)
            )

        # The index tensors are explicit inputs, not closures, so that a
        # SavedModel captures them with the forward function and can save
        # this custom gradient. So is x.T: formed once, outside, it serves
        # the forward products and the values gradient, and dy.T serves the
        # input gradient and the values gradient; SparseMatrixMatMul's own
        # transpose flags would copy each operand again (4096 x 4096 at 1%,
        # batch 256, Intel Xeon: 4% to 8% of the training step). The price:
        # x.T, one input-sized tensor, lives until the backward pass.
        @tf.custom_gradient
        def matmul_t(x_t, values, indices, *sampled):
            # W.T @ x.T = (x @ W).T, summed over bands; each band waits for
            # the sum before it, so that one band's matrices exist at a time.
            y_t = None
            for band in bands:
                with tf.control_dependencies([] if y_t is None else [y_t]):
                    matrix = csr_ops.sparse_matrix_transpose(band_matrix(indices, values, band), type=x_t.dtype)
                    part = csr_ops.sparse_matrix_mat_mul(matrix, x_t[band[2] : band[3]])
                y_t = part if y_t is None else y_t + part

            def grad(dy_t):
                # W @ dy.T = (dy @ W.T).T, a band's rows of dx.T at a time.
                # The matrices are built again: a SavedModel cannot save a
                # gradient that captures the forward's intermediate tensors.
                dx_parts = []
                for band in bands:
                    with tf.control_dependencies(dx_parts[-1:]):
                        dx_parts.append(csr_ops.sparse_matrix_mat_mul(band_matrix(indices, values, band), dy_t))
                dx_t = dx_parts[0] if len(dx_parts) == 1 else tf.concat(dx_parts, axis=0)
                # The values gradient starts once dx is done, so that the
                # CSR matrices are freed before its temporaries pile up.
                with tf.control_dependencies([dx_t]):
                    dvalues = self._sampled.transposed(x_t, dy_t, sampled)
                return (dx_t, dvalues) + (None,) * (1 + len(sampled))

            return y_t, grad

        return tf.transpose(matmul_t(tf.transpose(x), values, self._indices, *self._sampled.tensors))


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
