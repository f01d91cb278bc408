"""The kernel interface shared by every matmul implementation."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow as tf

from sparselayers.sparsity_pattern import SparsityPattern


#: Largest element count of one int32-indexed intermediate.
INT32_LIMIT = 2**31 - 1


def constant(array: np.ndarray, dtype: tf.DType | None = None) -> tf.Tensor:
    """An eager constant, created once and captured (not copied) by traces."""
    with tf.init_scope():
        return tf.constant(array, dtype=dtype)


def index_dtype(largest: int) -> tf.DType:
    """int32 if every index (and count) up to ``largest`` fits, else int64: half the memory."""
    return tf.int32 if largest <= INT32_LIMIT else tf.int64


def accumulation_cast(t: tf.Tensor) -> tf.Tensor:
    """``t`` in float32 if its dtype is narrower: the dtype sums are formed in.

    A matmul accumulates float16 and bfloat16 products in float32; kernels
    that add partial sums themselves must do the same to match its error.
    """
    return tf.cast(t, tf.float32) if t.dtype in (tf.float16, tf.bfloat16) else t


class Kernel:
    """Computes ``x @ W`` where ``W`` holds ``values`` at ``pattern.indices``.

    Subclasses precompute their index tensors from the pattern once, in
    ``__init__``; ``__call__`` is the hot path and trusts its inputs:
    ``x`` has shape ``(batch, input_dim)`` and ``values`` shape ``(nnz,)``,
    both of one floating dtype.
    """

    name: ClassVar[str]
    supports_jit: ClassVar[bool]

    def __init__(self, pattern: SparsityPattern):
        self.pattern = pattern

    def __call__(self, x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def check_batch(self, batch: int) -> None:
        """Raises ValueError, before any op runs, if ``batch`` rows exceed a limit of the kernel."""

    def resolved(self) -> Kernel:
        """The kernel that a call here actually runs: itself, or another it hands the call to."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pattern!r})"


def matmul(x: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """``x @ w`` for 2-D operands, its input gradient computed as an einsum.

    TensorFlow differentiates ``tf.matmul`` into ``dy @ w.T`` as a MatMul
    with ``transpose_b``, which ran at half the GEMM rate on the 2-core AMD
    EPYC (Zen 4) where the same product as ``einsum("bj,ij->bi")`` ran at
    the full rate: 21.3 vs 11.1 ms for ``(256, 16384) @ (16384, 256)`` (the
    input gradient of ``Towers``' first layer), 62.5 vs 41.0 ms for
    ``(256, 4096) @ (4096, 4096)``. The forward product and the weight
    gradient ``x.T @ dy`` ran at the full rate either way.
    """

    @tf.custom_gradient
    def product(x, w):
        def grad(dy):
            return tf.einsum("bj,ij->bi", dy, w), tf.matmul(x, dy, transpose_a=True)

        return tf.matmul(x, w), grad

    return product(x, w)


def empty_product(x: tf.Tensor, values: tf.Tensor, units: int) -> tf.Tensor:
    """``x @ W`` for a ``W`` without entries, or for an empty batch: zeros ``(batch, units)``.

    Still connected to ``x`` and ``values`` so that both get (zero) gradients
    rather than None, but through no op on a zero-sized axis: oneDNN aborts
    the process on a matmul with a zero inner dimension fused with a bias
    add, and the gradients of broadcasts over an empty axis divide by zero.
    """

    @tf.custom_gradient
    def product(x, values):
        def grad(dy):
            return tf.zeros_like(x), tf.zeros_like(values)

        return tf.zeros(tf.stack([tf.shape(x)[0], units]), x.dtype), grad

    return product(x, values)
