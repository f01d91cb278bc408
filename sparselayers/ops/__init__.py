"""Pure-TensorFlow matmul kernels on ``(x, pattern, values)``; no Keras.

Every kernel computes ``x @ W`` where the ``(input_dim, units)`` matrix ``W``
holds ``values[k]`` at ``pattern.indices[k]`` and zeros elsewhere, and every
kernel reads the same 1-D ``values`` in canonical order, so a layer can
switch kernels without touching its variable.

>>> import numpy as np, sparselayers as sl
>>> p = sl.patterns.banded((4, 4), lower=1, upper=1)
>>> v = np.arange(1, p.nnz + 1, dtype="float32")
>>> x = np.eye(4, dtype="float32")
>>> bool(np.allclose(sl.ops.sparse_matmul(x, p, v, kernel="banded"), p.to_dense(v)))
True
"""

from __future__ import annotations

import functools
from typing import Any

import tensorflow as tf

from sparselayers.ops.banded import BandedKernel
from sparselayers.ops.base import Kernel
from sparselayers.ops.block import BlockKernel
from sparselayers.ops.choose import (
    DENSE_HARD_LIMIT,
    DENSE_PRODUCT_KERNELS,
    choose_export_kernel,
    choose_jit_kernel,
    choose_kernel,
)
from sparselayers.ops.compiled import CompiledBlockKernel, CompiledCSRKernel, accelerated
from sparselayers.ops.csr import CSRDenseGradKernel, CSRGatherKernel, CSRKernel
from sparselayers.ops.dense import DenseKernel
from sparselayers.ops.gather import GatherKernel
from sparselayers.ops.sparse_tensor import SparseTensorKernel
from sparselayers.sparsity_pattern import SparsityPattern

#: Every kernel by name; ``kernel=`` arguments take these names or "auto".
KERNELS: dict[str, type[Kernel]] = {
    k.name: k
    for k in (
        SparseTensorKernel, CSRKernel, CSRGatherKernel, CSRDenseGradKernel, BlockKernel, BandedKernel, DenseKernel,
        GatherKernel, CompiledCSRKernel, CompiledBlockKernel,
    )
}

__all__ = [
    "KERNELS",
    "Kernel",
    "BandedKernel",
    "BlockKernel",
    "CompiledBlockKernel",
    "CompiledCSRKernel",
    "CSRDenseGradKernel",
    "CSRGatherKernel",
    "CSRKernel",
    "DenseKernel",
    "GatherKernel",
    "SparseTensorKernel",
    "choose_export_kernel",
    "choose_jit_kernel",
    "choose_kernel",
    "get_kernel",
    "sparse_matmul",
]


def check_kernel_name(kernel: object, pattern: SparsityPattern) -> str:
    """Resolves ``"auto"`` (the static rule, then a compiled kernel if built) and checks that a forced kernel fits ``pattern``."""
    if kernel == "auto":
        return accelerated(choose_kernel(pattern), pattern)
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(
            f"`kernel` must be 'auto' or one of {sorted(KERNELS)}. Received: kernel={kernel!r}"
        )
    if kernel in DENSE_PRODUCT_KERNELS:
        cells = pattern.shape[0] * pattern.shape[1]
        if cells > DENSE_HARD_LIMIT:
            raise ValueError(
                f"`kernel={kernel!r}` materialises a dense {pattern.shape[0]} x {pattern.shape[1]} matrix "
                f"({cells * 4 / 2**30:.1f} GiB in float32), over the limit of {DENSE_HARD_LIMIT:,} entries; "
                f"use 'csr' or 'csr_gather'. Received: kernel={kernel!r} with {pattern!r}"
            )
    if kernel == "banded":
        from sparselayers.structure import detect_band

        if detect_band(pattern) is None:
            raise ValueError(
                "`kernel='banded'` needs a pattern that fills a diagonal band exactly. "
                f"Received: kernel='banded' with {pattern!r}"
            )
    return kernel


@functools.lru_cache(maxsize=16)
def get_kernel(name: str, pattern: SparsityPattern) -> Kernel:
    """The kernel ``name`` (or ``"auto"``) prepared for ``pattern``; cached."""
    return KERNELS[check_kernel_name(name, pattern)](pattern)


def sparse_matmul(x: Any, pattern: SparsityPattern, values: Any, kernel: str = "auto") -> tf.Tensor:
    """``x @ W`` with ``W`` given by ``pattern`` and ``values``, over the last axis of ``x``.

    Args:
        x: floating tensor ``(..., input_dim)``; float16, bfloat16, float32 or float64.
        pattern: the :class:`SparsityPattern` of ``W``.
        values: ``(nnz,)`` entries of ``W`` in ``pattern``'s order; cast to ``x.dtype``.
        kernel: ``"auto"`` or a name in :data:`KERNELS`.

    Returns:
        A tensor ``(..., units)`` of ``x``'s dtype.

    Raises:
        TypeError: ``x`` is not floating point, or ``pattern`` is no SparsityPattern.
        ValueError: ``x``'s last axis is not ``input_dim``, or ``values`` is not ``(nnz,)``.
    """
    if not isinstance(pattern, SparsityPattern):
        raise TypeError(f"`pattern` must be a SparsityPattern. Received: pattern of type {type(pattern).__name__}")
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        raise TypeError(
            "`x` must be a floating-point tensor (cast integers first, as a layer does). "
            f"Received: x of dtype {x.dtype.name}"
        )
    input_dim, units = pattern.shape
    if x.shape.rank is not None and (x.shape.rank < 1 or x.shape[-1] not in (None, input_dim)):
        raise ValueError(
            f"The last axis of `x` must equal the pattern's input_dim={input_dim}. Received: x with shape {x.shape}"
        )
    values = tf.convert_to_tensor(values)
    if values.shape.rank is not None and values.shape.as_list() != [pattern.nnz]:
        raise ValueError(f"`values` must have shape ({pattern.nnz},). Received: values with shape {values.shape}")
    values = tf.cast(values, x.dtype)
    flat = tf.reshape(x, [-1, input_dim])
    y = get_kernel(kernel, pattern)(flat, values)
    if x.shape.rank == 2:
        return y
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [units]], axis=0))
