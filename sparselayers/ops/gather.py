"""Gather, multiply, segment-sum: an XLA-friendly kernel for any pattern."""

from __future__ import annotations

import tensorflow as tf

from sparselayers.ops.base import INT32_LIMIT, Kernel, accumulation_cast, constant, index_dtype


class GatherKernel(Kernel):
    """``y[:, j] = sum_k x[:, rows[k]] * values[k]`` over entries of column ``j``.

    Built from gather and ``unsorted_segment_sum`` only, so XLA compiles it;
    it holds a ``(batch, nnz)`` intermediate, so prefer it for sparse
    patterns when a compiled graph is required.
    """

    name = "gather"
    supports_jit = True

    def __init__(self, pattern):
        super().__init__(pattern)
        dtype = index_dtype(max(pattern.shape))
        self._rows = constant(pattern.rows, dtype)
        self._cols = constant(pattern.cols, dtype)

    def check_batch(self, batch):
        if batch * self.pattern.nnz > INT32_LIMIT:
            raise ValueError(
                f"The gather kernel would hold batch * nnz = {batch} * {self.pattern.nnz} products, above 2^31. "
                "Use smaller batches or another kernel (kernel='csr' or 'dense'). "
                f"Received: batch={batch}"
            )

    def __call__(self, x, values):
        # Products and sums in float32 for float16 inputs, as a matmul accumulates.
        products = tf.gather(tf.transpose(accumulation_cast(x)), self._rows) * accumulation_cast(values)[:, None]
        y = tf.math.unsorted_segment_sum(products, self._cols, self.pattern.shape[1])
        return tf.cast(tf.transpose(y), x.dtype)
