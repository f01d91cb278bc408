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

import tensorflow as tf

from sparselayers.ops.banded import BandedKernel
from sparselayers.ops.base import Kernel
from sparselayers.ops.block import BlockKernel
from sparselayers.ops.choose import choose_jit_kernel, choose_kernel
from sparselayers.ops.csr import CSRKernel
from sparselayers.ops.dense import DenseKernel
from sparselayers.ops.gather import GatherKernel
from sparselayers.ops.sparse_tensor import SparseTensorKernel
from sparselayers.sparsity_pattern import SparsityPattern

#: Every kernel by name; ``kernel=`` arguments take these names or "auto".
KERNELS: dict[str, type[Kernel]] = {
    k.name: k
    for k in (SparseTensorKernel, CSRKernel, BlockKernel, BandedKernel, DenseKernel, GatherKernel)
}

__all__ = [
    "KERNELS",
    "Kernel",
    "BandedKernel",
    "BlockKernel",
    "CSRKernel",
    "DenseKernel",
    "GatherKernel",
    "SparseTensorKernel",
    "choose_jit_kernel",
    "choose_kernel",
    "get_kernel",
    "sparse_matmul",
]


def check_kernel_name(kernel: object, pattern: SparsityPattern) -> str:
    """Resolves ``"auto"`` and checks that a forced kernel fits ``pattern``."""
    if kernel == "auto":
        return choose_kernel(pattern)
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(
            f"`kernel` must be 'auto' or one of {sorted(KERNELS)}. Received: kernel={kernel!r}"
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


def sparse_matmul(x, pattern: SparsityPattern, values, kernel: str = "auto") -> tf.Tensor:
    """``x @ W`` for a 2-D ``x``, with ``W`` given by ``pattern`` and ``values``."""
    x = tf.convert_to_tensor(x)
    values = tf.convert_to_tensor(values, dtype=x.dtype)
    return get_kernel(kernel, pattern)(x, values)
