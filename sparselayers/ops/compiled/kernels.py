"""Kernels on the compiled ops, each with a pure-TF twin for every other context."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tensorflow.python.saved_model import save_context

from sparselayers.ops.base import Kernel, constant
from sparselayers.ops.compiled import build
from sparselayers.ops.context import kernel_context
from sparselayers.structure import block_shape, detect_blocks

#: The dtypes the compiled ops take; narrower floats are computed in float32.
OP_DTYPES = (tf.float32, tf.float64)
#: Density below which ``compiled_csr`` replaces the static rule's choice,
#: the dense kernel included (``benchmarks/crossovers.py compiled``, AMD
#: EPYC, training step, 4096 x 4096, batch 256, compiled_csr vs dense: 10%
#: 62.4 vs 163.4 ms, 20% 119.7 vs 168.0, 30% 181.6 vs 170.7).
COMPILED_CSR_MAX_DENSITY = 0.25
#: Blocks for which ``compiled_block`` replaces the block kernel: at least
#: ``COMPILED_BLOCK_MIN_SIDE`` rows and columns on average (its register
#: tile is 8 rows by 32 floats), at most ``COMPILED_BLOCK_MAX_AREA`` entries
#: on average. Same run, block diagonal over 4096 rows, compiled_block vs
#: block: 8x8 blocks 12.9 vs 6.4 ms, 16x16 12.6 vs 6.1, 32x32 4.8 vs 5.7,
#: 64x64 5.9 vs 6.4, 128x128 8.4 vs 8.6 (a tie), 256x256 13.2 vs 12.9,
#: 1024x1024 65.7 vs 35.5 (oneDNN's cache-blocked GEMM wins); thin blocks
#: (32 of them, CPU shared) 128x8 11.3 vs 3.6, 8x128 6.0 vs 2.6.
#: Rows of ``x`` from which ``compiled_csr`` multiplies tile by tile (the
#: direct convolution's ops on a 1x1 window, ``sparselayers.ops.conv``)
#: instead of on whole transposed operands, for layers of at most
#: ``TILED_MAX_WIDTH`` inputs and units (the tile buffer holds a row per
#: input). Training step, 2-core Intel Xeon (quiet), compiled_csr whole vs
#: tiled ms: 256 x 256 at 10%, batch 1024 1.51 vs 1.12, batch 8192 10.6 vs
#: 5.4; 1024 x 1024 at 1%, batch 1024 3.59 vs 2.27, at 10% 10.6 vs 8.2;
#: 4096 x 4096 at 1%, batch 1024 31.9 vs 21.3; batch 256 is a draw (0.83-1.5x).
TILED_MIN_BATCH = 1024
TILED_MAX_WIDTH = 4096
COMPILED_BLOCK_MIN_SIDE = 32
COMPILED_BLOCK_MAX_AREA = 128 * 128

#: The compiled kernel ``kernel="auto"`` may take, when built, in place of
#: the static rule's pure-TF choice; it does where its ``accelerates`` says
#: so for the pattern (see ``docs/kernels.md`` for the figures).
ACCELERATES = {
    "csr": "compiled_csr", "csr_dense_grad": "compiled_csr", "banded": "compiled_csr", "dense": "compiled_csr",
    "block": "compiled_block",
}


def accelerated(name: str, pattern) -> str:
    """``name``, or the compiled kernel that replaces it on ``pattern`` when the library is built (building it if needed).

    >>> import sparselayers as sl
    >>> accelerated("gather", sl.patterns.random((100, 100), density=0.01, seed=0))
    'gather'
    """
    target = ACCELERATES.get(name)
    if target is None or not COMPILED[target].accelerates(pattern) or not (build.enabled() and build.available()):
        return name
    return target


def compiled_allowed() -> bool:
    """Whether the call being traced or run may contain the compiled ops.

    Only in the default context: XLA cannot compile them, and no SavedModel,
    LiteRT or ONNX artifact may need them, since the program serving it
    loads no sparselayers library (``tf.saved_model.save`` traces inside a
    save context, Keras' ``model.export`` in the export context).
    """
    return kernel_context() == "default" and not save_context.in_save_context()


class CompiledKernel(Kernel):
    """A kernel on the compiled ops that computes with its pure-TF twin wherever they may not run.

    Where the compiled ops may not appear (XLA, export, a SavedModel being
    written, see :func:`compiled_allowed`), could not be built, or do not
    apply to the pattern (:meth:`fused`), it computes with its pure-TF twin
    (:meth:`twin_for`) on the same ``values``. Float16 and bfloat16 are
    computed in float32.
    """

    supports_jit = False

    @staticmethod
    def twin_for(pattern) -> str:
        """The pure-TF kernel computing the same product where the ops are not allowed."""
        raise NotImplementedError

    @staticmethod
    def accepts(pattern) -> bool:
        """Whether the compiled ops compute ``pattern`` (else the twin does, always)."""
        return True

    @classmethod
    def accelerates(cls, pattern) -> bool:
        """Whether ``kernel="auto"`` takes this kernel for ``pattern`` in place of the static rule's choice."""
        return cls.accepts(pattern)

    @property
    def available(self) -> bool:
        """Whether the compiled ops run here (the library is built and loaded)."""
        return build.available()

    @property
    def fused(self) -> bool:
        """Whether a call in the default context runs the compiled ops."""
        return self.available and self.accepts(self.pattern)

    def _twin(self) -> Kernel:
        from sparselayers.ops import get_kernel

        return get_kernel(self.twin_for(self.pattern), self.pattern)

    def resolved(self) -> Kernel:
        """Its pure-TF twin where the compiled ops would not run (so ``kernel_name`` tells the truth)."""
        return self if compiled_allowed() and self.fused else self._twin()

    def __call__(self, x, values):
        if not compiled_allowed() or not self.fused:
            return self._twin()(x, values)
        dtype = x.dtype
        if dtype not in OP_DTYPES:
            x, values = tf.cast(x, tf.float32), tf.cast(values, tf.float32)
        return tf.cast(self._product(build.library(), x, values), dtype)

    def _product(self, ops, x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        """``x @ W`` on the compiled ``ops``, ``x`` and ``values`` in float32 or float64."""
        raise NotImplementedError


class CompiledCSRKernel(CompiledKernel):
    """Fused C++ products on the CSR and CSC orders of the pattern.

    The forward pass computes ``(x @ W).T`` one output unit at a time: the
    unit's entries (CSC order) scale and add rows of ``x.T``, all in one
    ``batch``-long accumulator. The input gradient does the same for
    ``dy @ W.T`` in CSR order. The values gradient, ``sum_b x[b, i] *
    dy[b, j]`` per entry, reads each row of ``x.T`` once and dots it with the
    rows of ``dy.T`` of its row's entries (CSR order, which is the canonical
    order): no gathered copy of either operand is ever written, unlike any
    pure-TF formulation. Loops run over the batch, vectorised, rows split
    over TensorFlow's intra-op threads.

    From :data:`TILED_MIN_BATCH` rows of ``x`` (a static batch; 1x1
    convolutions flatten every position into it) the same three products
    run tile by tile instead: the direct convolution's ops on a 1x1 window
    transpose a few hundred rows of ``x`` at a time in cache, never all of
    it, and read the pattern a block of inputs at a time
    (:class:`sparselayers.ops.conv.DirectConv`).

    Holds int32 row indices for the CSC order and their canonical places
    (8 bytes per entry) besides the pattern's own arrays. Its twin is
    ``"csr"``, or ``"banded"`` for the bands the static rule gives it.
    """

    name = "compiled_csr"

    @classmethod
    def accelerates(cls, pattern) -> bool:
        return pattern.density < COMPILED_CSR_MAX_DENSITY

    def __init__(self, pattern):
        super().__init__(pattern)
        self._tensors: tuple[tf.Tensor, ...] | None = None
        self._direct = None

    @staticmethod
    def twin_for(pattern) -> str:
        """The pure-TF kernel computing the same product where the ops are not allowed:
        ``"banded"`` for the bands the static rule gives it, else ``"csr"``."""
        from sparselayers.ops.choose import choose_kernel

        return "banded" if choose_kernel(pattern) == "banded" else "csr"

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

    def _product(self, ops, x, values):
        if x.shape[0] is not None and x.shape[0] >= TILED_MIN_BATCH and max(self.pattern.shape) <= TILED_MAX_WIDTH:
            return self._tiled(x, values)
        row_pointers, cols, col_pointers, col_rows, col_order = self._pattern_tensors()
        no_order = tf.zeros([0], tf.int32)

        # Three products on transposed operands, each the gradient of the
        # others, so that gradients of any order stay on the compiled ops:
        # by_column(a, v) = (W.T a) (the forward pass), by_row(b, v) = W b
        # (the input gradient), sampled(a, b)[s] = dot(a[i_s], b[j_s]).
        @tf.custom_gradient
        def by_column(a_t, v):
            def grad(g):
                return by_row(g, v), sampled(a_t, g)

            return ops.sparselayers_row_axpy(a_t, v, col_pointers, col_rows, col_order), grad

        @tf.custom_gradient
        def by_row(b_t, v):
            def grad(g):
                return by_column(g, v), sampled(g, b_t)

            return ops.sparselayers_row_axpy(b_t, v, row_pointers, cols, no_order), grad

        @tf.custom_gradient
        def sampled(a_t, b_t):
            def grad(g):
                return by_row(b_t, g), by_column(a_t, g)

            return ops.sparselayers_sampled_dot(a_t, b_t, row_pointers, cols), grad

        return tf.transpose(by_column(tf.transpose(x), values))

    def _tiled(self, x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        """``x @ W`` as a 1x1 direct convolution over ``x``'s rows: tiles of rows transposed in cache, not all of ``x``."""
        from sparselayers.ops.conv import ConvGeometry, DirectConv

        if self._direct is None:
            self._direct = DirectConv(self.pattern, ConvGeometry((1, 1), (1, 1), (1, 1), "valid"), (1, 1))
        y = self._direct(tf.reshape(x, [-1, 1, 1, self.pattern.shape[0]]), values)
        return tf.reshape(y, [-1, self.pattern.shape[1]])


class CompiledBlockKernel(CompiledKernel):
    """Fused C++ products on the dense blocks of a block-diagonal pattern.

    Each block ``W_j`` (rows ``r``, columns ``c`` of the pattern) is
    multiplied where it lies: ``y[:, c] = x[:, r] @ W_j``, and in one
    backward op ``dx[:, r] = dy[:, c] @ W_j.T`` and ``dW_j = x[:, r].T @
    dy[:, c]``, by a register-tiled micro kernel reading ``x``, ``dy`` and
    the values in place. The pure-TF block kernel needs a transposed copy
    of ``x``, ``y``, ``dy`` and ``dx`` for its batched matmul; this one
    needs none. Blocks, split further when there are fewer than the
    threads, run over TensorFlow's intra-op threads.

    It applies to patterns of dense blocks that share no row or column
    (:meth:`accepts`: block diagonal, in any order, with empty rows or
    columns between blocks); any other pattern, and every context where the
    ops may not run, computes with its twin, the ``"block"`` kernel.
    """

    name = "compiled_block"

    def __init__(self, pattern):
        super().__init__(pattern)
        self._table: tf.Tensor | None = None
        self._accepted: bool | None = None

    @staticmethod
    def twin_for(pattern) -> str:
        return "block"

    @staticmethod
    def accepts(pattern) -> bool:
        return pattern.nnz > 0 and (blocks := detect_blocks(pattern)) is not None and blocks.is_diagonal

    @classmethod
    def accelerates(cls, pattern) -> bool:
        shape = block_shape(pattern)
        if not (shape.mean_rows >= COMPILED_BLOCK_MIN_SIDE and shape.mean_area <= COMPILED_BLOCK_MAX_AREA):
            return False
        blocks = detect_blocks(pattern)
        return float(np.mean(blocks.n_cols)) >= COMPILED_BLOCK_MIN_SIDE and blocks.is_diagonal

    @property
    def fused(self) -> bool:
        if self._accepted is None:
            self._accepted = self.accepts(self.pattern)
        return self._accepted and self.available

    def _blocks(self) -> tf.Tensor:
        """The ``(k, 5)`` table: first row, first column, rows, columns, first value of each block."""
        if self._table is None:
            p = self.pattern
            blocks = detect_blocks(p)
            first_value = np.asarray(p.row_pointers)[blocks.row_start] + blocks.row_offset
            table = np.stack([blocks.row_start, blocks.col_start, blocks.n_rows, blocks.n_cols, first_value], 1)
            self._table = constant(table.astype(np.int64))
        return self._table

    def _product(self, ops, x, values):
        # Differentiated through the gradients registered below, to any order.
        return ops.sparselayers_block_matmul(x, values, self._blocks(), units=self.pattern.shape[1])


@tf.RegisterGradient("SparselayersBlockMatmul")
def _block_matmul_grad(op, dy):
    x, values, table = op.inputs
    dx, dvalues = build.library().sparselayers_block_grad(x, dy, values, table)
    return dx, dvalues, None


@tf.RegisterGradient("SparselayersBlockGrad")
def _block_grad_grad(op, ddx, ddvalues):
    # dx = dy @ W.T and dW = x.T @ dy per block, both linear: their
    # gradients are the same block products on the upstream gradients.
    x, dy, values, table = op.inputs
    ops = build.library()
    ddx = tf.zeros_like(x) if ddx is None else ddx
    ddvalues = tf.zeros_like(values) if ddvalues is None else ddvalues
    units = int(dy.shape[-1])  # static: the forward op's shape function sets it
    d_x, d_values = ops.sparselayers_block_grad(ddx, dy, ddvalues, table)
    d_dy = ops.sparselayers_block_matmul(ddx, values, table, units=units) + ops.sparselayers_block_matmul(
        x, ddvalues, table, units=units
    )
    return d_x, d_dy, d_values, None


#: The compiled kernels by name.
COMPILED: dict[str, type[CompiledKernel]] = {k.name: k for k in (CompiledCSRKernel, CompiledBlockKernel)}


def pure_tf_kernel(name: str, pattern) -> str:
    """``name``, or for a compiled kernel its pure-TF twin on ``pattern``: what XLA and export start from."""
    return COMPILED[name].twin_for(pattern) if name in COMPILED else name
