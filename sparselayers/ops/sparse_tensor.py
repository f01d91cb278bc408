"""The reference mechanism: ``tf.sparse.sparse_dense_matmul``."""

from __future__ import annotations

import tensorflow as tf

from sparselayers.ops.base import INT32_LIMIT, Kernel, accumulation_cast, constant


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

    def check_batch(self, batch):
        # TF's GPU kernel refuses outputs with batch * nnz above 2^31 at run time.
        if batch * self.pattern.nnz > INT32_LIMIT and tf.config.list_logical_devices("GPU"):
            raise ValueError(
                f"tf.sparse.sparse_dense_matmul on GPU cannot handle batch * nnz = {batch} * {self.pattern.nnz} "
                "above 2^31. Use smaller batches or kernel='csr'. "
                f"Received: batch={batch}"
            )

    def __call__(self, x, values):
        # float16 inputs are multiplied in float32: TF's kernel accumulates
        # in its input dtype.
        weights = tf.SparseTensor(self._indices, accumulation_cast(values), self.pattern.shape)
        return tf.cast(tf.sparse.sparse_dense_matmul(accumulation_cast(x), weights), x.dtype)
