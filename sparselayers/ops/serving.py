"""What a SavedModel export (TF Serving) multiplies with: small batches read each entry once.

A SavedModel holds pure TensorFlow ops (never the compiled kernels), and TF
Serving often runs it one request at a time. There TF's CSR ops and the
gather kernel spend most of their time on per-call setup: on the 2-core
Intel Xeon, a 1024 x 1024 layer at 10% density in a ``tf.function`` took
1920 us (``csr``) and 1190 us (``gather``) at batch 1, where
``tf.sparse.sparse_dense_matmul`` took 535 us and the dense matmul 558 us;
at batch 32, 2113, 5113, 5221 and 829 us. So a SavedModel multiplies
batches of at most :data:`SERVING_SMALL_BATCH` rows with
``sparse_dense_matmul``, and larger ones with the layer's own kernel (a
``tf.cond`` on the batch size, or the one branch where the batch is static).

>>> import numpy as np, tensorflow as tf, sparselayers as sl
>>> p = sl.patterns.random((8, 6), density=0.5, seed=0)
>>> kernel = SmallBatchServing(sl.ops.get_kernel("csr", p))
>>> v = np.arange(1, p.nnz + 1, dtype="float32")
>>> all(np.allclose(kernel(np.ones((n, 8), "float32"), v), np.ones((n, 8)) @ p.to_dense(v)) for n in (1, 9))
True
"""

from __future__ import annotations

import copy

import tensorflow as tf

from sparselayers.ops.base import Kernel

#: Largest batch that a SavedModel multiplies with ``sparse_dense_matmul``.
SERVING_SMALL_BATCH = 4
#: Kernels whose per-call setup dominates a small batch (the compiled ones export as these twins).
SWITCHED = ("csr", "csr_dense_grad", "csr_gather", "gather")


class SmallBatchServing(Kernel):
    """``kernel``, but ``sparse_dense_matmul`` on batches of at most :data:`SERVING_SMALL_BATCH` rows.

    Both branches read one int64 ``(nnz, 2)`` index constant, the
    ``sparse_dense_matmul`` kernel's: the CSR kernels' own int32 indices
    are swapped for it in a copy of the kernel,
    so the SavedModel stores the indices once, and no call casts them (the
    casts alone made batch 1 take 1.6 ms where 0.9 ms was reachable, MLP
    1024-1024-1024-10 at 10%). That costs 16 bytes per entry where training
    keeps 8.
    """

    supports_jit = False

    def __init__(self, kernel: Kernel):
        from sparselayers.ops import get_kernel

        super().__init__(kernel.pattern)
        self.small = get_kernel("sparse_dense_matmul", kernel.pattern)
        self._indices = self.small._indices  # int64 (nnz, 2)
        indices = getattr(kernel, "_indices", None)
        if isinstance(indices, tf.Tensor) and tuple(indices.shape) == (kernel.pattern.nnz, 2):
            kernel = copy.copy(kernel)
            kernel._indices = self._indices
            sampled = getattr(kernel, "_sampled", None)
            if sampled is not None and any(t is indices for t in sampled.tensors):
                # The gathered values gradient shares the indices: its copy reads the int64 ones.
                kernel._sampled = copy.copy(sampled)
                kernel._sampled.tensors = tuple(self._indices if t is indices else t for t in sampled.tensors)
        self.kernel = kernel
        self.name = kernel.name

    def __call__(self, x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        batch = x.shape[0]
        if batch is not None:
            return (self.small if batch <= SERVING_SMALL_BATCH else self.kernel)(x, values)
        return tf.cond(
            tf.shape(x)[0] <= SERVING_SMALL_BATCH, lambda: self.small(x, values), lambda: self.kernel(x, values)
        )

    def __repr__(self) -> str:
        return f"SmallBatchServing({self.kernel!r})"
