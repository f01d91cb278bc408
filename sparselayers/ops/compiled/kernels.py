"""Kernels on the compiled ops, each with a pure-TF twin for every other context."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.saved_model import save_context

from sparselayers.ops.base import Kernel, constant
from sparselayers.ops.compiled import build
from sparselayers.ops.context import kernel_context

_OP_DTYPES = (tf.float32, tf.float64)

#: The compiled kernel ``kernel="auto"`` takes, when built, in place of the
#: static rule's pure-TF choice (see ``docs/kernels.md`` for the figures).
ACCELERATES = {"csr": "compiled_csr", "csr_dense_grad": "compiled_csr", "banded": "compiled_csr"}


def accelerated(name: str) -> str:
    """``name``, or the compiled kernel that replaces it when the library is built (building it if needed).

    >>> accelerated("block")
    'block'
    """
    if name in ACCELERATES and build.enabled() and build.available():
        return ACCELERATES[name]
    return name


def compiled_allowed() -> bool:
    """Whether the call being traced or run may contain the compiled ops.

    Only in the default context: XLA cannot compile them, and no SavedModel,
    LiteRT or ONNX artifact may need them, since the program serving it
    loads no sparselayers library (``tf.saved_model.save`` traces inside a
    save context, Keras' ``model.export`` in the export context).
    """
    return kernel_context() == "default" and not save_context.in_save_context()


class CompiledCSRKernel(Kernel):
    """Fused C++ products on the CSR and CSC orders of the pattern.

    The forward pass computes ``(x @ W).T`` one output unit at a time: the
    unit's entries (CSC order) scale and add rows of ``x.T``, all in one
    ``batch``-long accumulator. The input gradient does the same for
    ``dy @ W.T`` in CSR order. The values gradient, ``sum_b x[b, i] *
    dy[b, j]`` per entry, reads each row of ``x.T`` once and dots it with the
    rows of ``dy.T`` of its row's entries (CSR order, which is the canonical
    order): no gathered copy of either operand is ever written, unlike any
    pure-TF formulation. Loops run over the batch, vectorised, rows split
    over TensorFlow's intra-op threads. Float16 and bfloat16 are computed
    in float32.

    Holds int32 row indices for the CSC order and their canonical places
    (8 bytes per entry) besides the pattern's own arrays.

    Where the compiled ops may not appear (XLA, export, a SavedModel being
    written, see :func:`compiled_allowed`) or could not be built, it
    computes with its pure-TF twin (:meth:`twin_for`) on the same ``values``.
    """

    name = "compiled_csr"
    supports_jit = False

    def __init__(self, pattern):
        super().__init__(pattern)
        self._tensors: tuple[tf.Tensor, ...] | None = None

    @staticmethod
    def twin_for(pattern) -> str:
        """The pure-TF kernel computing the same product where the ops are not allowed:
        ``"banded"`` for the bands the static rule gives it, else ``"csr"``."""
        from sparselayers.ops.choose import choose_kernel

        return "banded" if choose_kernel(pattern) == "banded" else "csr"

    @property
    def available(self) -> bool:
        """Whether the compiled ops run here (the library is built and loaded)."""
        return build.available()

    def _twin(self) -> Kernel:
        from sparselayers.ops import get_kernel

        return get_kernel(self.twin_for(self.pattern), self.pattern)

    def _pattern_tensors(self) -> tuple[tf.Tensor, ...]:
        if self._tensors is None:
            p = self.pattern
            rows, cols = p.indices[:, 0], p.indices[:, 1]
            by_column = np.argsort(cols, kind="stable").astype(np.int32)
            col_pointers = np.zeros(p.shape[1] + 1, np.int64)
            np.cumsum(np.bincount(cols, minlength=p.shape[1]), out=col_pointers[1:])
            self._tensors = (
                constant(np.asarray(p.row_pointers, np.int64)),
                constant(np.asarray(cols, np.int32)),
                constant(col_pointers),
                constant(rows[by_column].astype(np.int32)),
                constant(by_column),
            )
        return self._tensors

    def __call__(self, x, values):
        if not compiled_allowed() or not self.available:
            return self._twin()(x, values)
        ops = build.library()
        dtype = x.dtype
        if dtype not in _OP_DTYPES:
            x, values = tf.cast(x, tf.float32), tf.cast(values, tf.float32)
        row_pointers, cols, col_pointers, col_rows, col_order = self._pattern_tensors()
        no_order = tf.zeros([0], tf.int32)

        @tf.custom_gradient
        def product_t(x_t, values):
            y_t = ops.sparselayers_row_axpy(x_t, values, col_pointers, col_rows, col_order)

            def grad(dy_t):
                dx_t = ops.sparselayers_row_axpy(dy_t, values, row_pointers, cols, no_order)
                dvalues = ops.sparselayers_sampled_dot(x_t, dy_t, row_pointers, cols)
                return dx_t, dvalues

            return y_t, grad

        return tf.cast(tf.transpose(product_t(tf.transpose(x), values)), dtype)


#: The compiled kernels by name.
COMPILED: dict[str, type[CompiledCSRKernel]] = {CompiledCSRKernel.name: CompiledCSRKernel}


def pure_tf_kernel(name: str, pattern) -> str:
    """``name``, or for a compiled kernel its pure-TF twin on ``pattern``: what XLA and export start from."""
    return COMPILED[name].twin_for(pattern) if name in COMPILED else name
