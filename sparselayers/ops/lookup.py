"""Row lookups of a sparse table: ``onehot(ids) @ W`` without forming either operand.

An embedding's product is the one-hot matrix of its ids, ``(n, input_dim)``,
times the sparse table ``W``; row ``i`` of the result is row ``ids[i]`` of
``W``. The layer hands the one-hot as a ``tf.SparseTensor`` (so tools that
record a layer's operand, such as RigL's dense gradient ``x.T @ dy``, read
it like any other), and these kernels read its ids back. Both read the same
``values`` in the pattern's canonical (row-major) order; gradients reach
only the entries looked up.

>>> import numpy as np, tensorflow as tf, sparselayers as sl
>>> from sparselayers.ops.lookup import RaggedLookup, PaddedLookup, one_hot
>>> p = sl.patterns.random((6, 4), density=0.5, seed=0)
>>> v = np.arange(1, p.nnz + 1, dtype="float32")
>>> x = one_hot(tf.constant([5, 0, 5]), 6, tf.float32)
>>> table = p.to_dense(v)
>>> all(np.array_equal(k(p)(x, v), table[[5, 0, 5]]) for k in (RaggedLookup, PaddedLookup))
True
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from sparselayers.ops.base import Kernel, constant, index_dtype
from sparselayers.ops.context import export_densified
from sparselayers.ops.export_kernels import DenseExportKernel, ExportKernel
from sparselayers.ops.sparse_storage import request_sparse_storage
from sparselayers.sparsity_pattern import SparsityPattern


def one_hot(ids: tf.Tensor, depth: int, dtype: tf.DType) -> tf.SparseTensor:
    """The ``(n, depth)`` one-hot matrix of the 1-D ``ids`` as a SparseTensor (row ``i`` holds ``ids[i]``)."""
    ids = tf.cast(ids, tf.int64)
    n = tf.shape(ids, out_type=tf.int64)[0]
    indices = tf.stack([tf.range(n), ids], axis=1)
    return tf.SparseTensor(indices, tf.ones(tf.reshape(n, [1]), dtype), tf.stack([n, depth]))


def _ids(x: tf.SparseTensor) -> tf.Tensor:
    # One entry per row, in row order: the column of each is the row's id.
    return x.indices[:, 1]


class RaggedLookup(Kernel):
    """Gathers each id's CSR row (its positions in ``values`` and its columns) and scatters it into the output.

    Work and memory follow the entries looked up, never ``input_dim`` or
    the table's size; ``values`` gets an ``IndexedSlices`` gradient over
    those entries.
    """

    name = "ragged_lookup"
    supports_jit = False  # the number of entries gathered depends on the ids

    def __init__(self, pattern: SparsityPattern):
        super().__init__(pattern)
        dtype = index_dtype(max(pattern.nnz, pattern.shape[1]))
        self._row_splits = constant(pattern.row_pointers, dtype)
        self._cols = constant(pattern.cols, dtype)

    def __call__(self, x: tf.SparseTensor, values: tf.Tensor) -> tf.Tensor:
        ids = tf.cast(_ids(x), self._row_splits.dtype)
        starts = tf.gather(self._row_splits, ids)
        positions = tf.ragged.range(starts, tf.gather(self._row_splits, ids + 1))
        flat = positions.flat_values
        where = tf.stack([tf.cast(positions.value_rowids(), flat.dtype), tf.gather(self._cols, flat)], axis=1)
        shape = tf.stack([tf.cast(tf.shape(ids)[0], flat.dtype), self.pattern.shape[1]])
        return tf.scatter_nd(where, tf.gather(values, flat), shape)


class PaddedLookup(ExportKernel):
    """Each row's entries padded to the fullest row: gathers of fixed shape, then a one-hot sum.

    Shapes do not depend on the ids, so XLA compiles it, and it uses only
    gather, one-hot, multiply and sum, which LiteRT and ONNX express; its
    index tables are built inside the trace (constants of the artifact).
    It holds ``input_dim x`` (the fullest row's count) positions and forms
    an ``(n, that count, output_dim)`` product: for tables whose rows are
    not too uneven.
    """

    name = "padded_lookup"

    def __init__(self, pattern: SparsityPattern):
        super().__init__(pattern)
        counts = pattern.fan_out
        width = max(int(counts.max(initial=0)), 1)
        slot = np.arange(width)
        starts = pattern.row_pointers[:-1, None]
        # Padding points at position nnz: an appended zero value in column 0.
        self._table = np.where(slot < counts[:, None], starts + slot, pattern.nnz)
        self._cols = np.append(pattern.cols, 0)
        self._dtype = index_dtype(max(pattern.nnz, pattern.shape[1]))

    def compute(self, x: tf.SparseTensor, values: tf.Tensor) -> tf.Tensor:
        return self.lookup(_ids(x), values)

    def lookup(self, ids: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        """The rows of the 1-D ``ids``, read from the ids themselves (no one-hot)."""
        ids = tf.cast(ids, self._dtype)
        positions = tf.gather(tf.constant(self._table, self._dtype), ids)
        padded = tf.concat([values, tf.zeros([1], values.dtype)], axis=0)
        columns = tf.gather(tf.constant(self._cols, self._dtype), positions)
        spread = tf.one_hot(columns, self.pattern.shape[1], dtype=values.dtype)
        return tf.reduce_sum(spread * tf.gather(padded, positions)[..., None], axis=1)


class TableLookup(ExportKernel):
    """The table with exact zeros outside the pattern, then one gather: what LiteRT and ONNX exports run.

    The converters fold the table into a constant, and by default store it
    sparse (:mod:`sparselayers.ops.sparse_storage`: LiteRT expands it with
    ``DENSIFY`` once at load, onnxruntime with constant-folded ops), so the
    artifact holds about the entries and looks up as fast as a dense
    ``Embedding``. Inside :func:`sparselayers.export.densified` the table
    stays dense.
    """

    name = "table_lookup"

    def __init__(self, pattern: SparsityPattern):
        super().__init__(pattern)
        self._table = DenseExportKernel(pattern)

    def compute(self, x: tf.SparseTensor, values: tf.Tensor) -> tf.Tensor:
        return self.lookup(_ids(x), values)

    def lookup(self, ids: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        """The rows of the 1-D ``ids``: one gather from the table."""
        if not export_densified():
            request_sparse_storage()
        return tf.gather(self._table.weights(values), ids)


@functools.lru_cache(maxsize=16)
def lookup_kernel(name: str, pattern: SparsityPattern) -> Kernel:
    """The lookup ``name`` (``"ragged_lookup"``, ``"padded_lookup"`` or ``"table_lookup"``) for ``pattern``, cached."""
    return {"ragged_lookup": RaggedLookup, "padded_lookup": PaddedLookup, "table_lookup": TableLookup}[name](pattern)
