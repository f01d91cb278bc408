"""``x @ W`` for a sparse input ``x``: computed from the nonzeros of both.

Single-cell counts and genotype matrices are mostly zeros. Densifying a
batch of them costs ``batch * input_dim`` numbers (2048 x 200,000 float32:
1.6 GB with its gradient); reading only the nonzeros costs one product per
pair (nonzero ``x[b, i]``, entry ``W[i, j]``). Each nonzero meets the entries
of its row of ``W``: a ragged range over ``W``'s entries sorted by row.
The gradients (for ``values`` and for ``x.values``) follow from the
gathers and the segment sum, so they are formed from the nonzeros too.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from sparselayers.ops.base import accumulation_cast, constant
from sparselayers.sparsity_pattern import SparsityPattern

__all__ = ["SPARSE_INPUT", "SparseInputProduct", "sparse_input_matmul"]

#: The ``kernel_name`` of a layer whose last call read a sparse batch from its nonzeros.
SPARSE_INPUT = "sparse_input"


class SparseInputProduct:
    """``x @ W`` for a ``tf.SparseTensor`` ``x`` of shape ``(batch, input_dim)``.

    ``W`` holds ``values[k]`` at ``pattern.indices[k]``. The work and the
    memory are one product per pair of a nonzero of ``x`` and an entry in
    its row of ``W``, plus the ``(batch, units)`` output; neither ``x`` nor
    ``W`` is densified.
    """

    def __init__(self, pattern: SparsityPattern):
        self.pattern = pattern
        by_row = np.argsort(pattern.rows, kind="stable")
        splits = np.concatenate([[0], np.cumsum(np.bincount(pattern.rows, minlength=pattern.shape[0]))])
        self._entries = constant(by_row, tf.int64)
        self._cols = constant(pattern.cols[by_row], tf.int64)
        self._row_splits = constant(splits, tf.int64)

    def __call__(self, x: tf.SparseTensor, values: tf.Tensor) -> tf.Tensor:
        units = self.pattern.shape[1]
        samples, features = x.indices[:, 0], x.indices[:, 1]
        # One ragged row per nonzero of x: the positions of its row's entries of W.
        ranges = tf.ragged.range(tf.gather(self._row_splits, features), tf.gather(self._row_splits, features + 1))
        nonzero, slot = ranges.value_rowids(), ranges.flat_values
        products = tf.gather(accumulation_cast(x.values), nonzero) * tf.gather(
            accumulation_cast(values), tf.gather(self._entries, slot)
        )
        targets = tf.gather(samples, nonzero) * units + tf.gather(self._cols, slot)
        batch = x.dense_shape[0]
        y = tf.math.unsorted_segment_sum(products, targets, batch * units)
        return tf.cast(tf.reshape(y, tf.stack([batch, units])), x.values.dtype)


@functools.lru_cache(maxsize=16)
def _product(pattern: SparsityPattern) -> SparseInputProduct:
    return SparseInputProduct(pattern)


def sparse_input_matmul(x: tf.SparseTensor, pattern: SparsityPattern, values: tf.Tensor, dtype: str) -> tf.Tensor:
    """``x @ W`` for a 2-D ``tf.SparseTensor`` ``x``, in ``dtype`` (the layer's compute dtype for integers).

    The indices of ``x`` may come in any order; an index given more than
    once adds up its values, as ``tf.sparse.sparse_dense_matmul`` and
    ``scipy.sparse`` do (``tf.sparse.to_dense`` refuses repeats instead).

    Args:
        x: ``(batch, input_dim)`` sparse tensor, any numeric dtype.
        pattern: the :class:`SparsityPattern` of ``W``.
        values: ``(nnz,)`` entries of ``W`` in ``pattern``'s order.
        dtype: the dtype for integer ``x``; floating ``x`` keeps its own.

    Returns:
        A dense ``(batch, units)`` tensor, equal to
        ``tf.sparse.sparse_dense_matmul(x, W)`` (and to
        ``tf.sparse.to_dense(x) @ W`` when no index repeats).

    Raises:
        ValueError: ``x`` is not 2-D; eagerly: an index of ``x`` outside
            ``[0, dense_shape)``, or ``dense_shape[1]`` not ``input_dim``.
        tf.errors.InvalidArgumentError: the same inside a ``tf.function``
            (with the smallest and largest indices and the dense shape).
        TypeError: ``x`` holds strings or booleans.

    Example:

    >>> import tensorflow as tf, sparselayers as sl
    >>> pattern = sl.patterns.banded((3, 3))
    >>> x = tf.SparseTensor([[0, 2], [1, 0]], [5.0, 1.0], [2, 3])
    >>> sparse_input_matmul(x, pattern, tf.constant([1.0, 2.0, 3.0]), "float32").numpy()
    array([[ 0.,  0., 15.],
           [ 1.,  0.,  0.]], dtype=float32)
    """
    if x.shape.rank != 2:
        raise ValueError(f"A sparse input must be 2-D (batch, input_dim). Received: a SparseTensor of shape {x.shape}")
    if x.dtype == tf.string or x.dtype == tf.bool:
        raise TypeError(f"SparseDense needs numeric inputs. Received: inputs of dtype {x.dtype.name}")
    x = _checked(x, pattern.shape[0])
    if not x.dtype.is_floating:
        x = tf.SparseTensor(x.indices, tf.cast(x.values, dtype), x.dense_shape)
    return _product(pattern)(x, tf.cast(values, x.dtype))


def _checked(x: tf.SparseTensor, input_dim: int) -> tf.SparseTensor:
    """``x``, once its indices are known to lie in ``[0, dense_shape)`` and ``dense_shape[1] == input_dim``.

    The product would otherwise drop a negative sample index without a word
    and fail on the others with a message about its internal gathers. Two
    reductions over the indices decide; eagerly, the offending index is looked
    up only when they fail, and inside a ``tf.function`` the assertion prints
    the smallest and largest indices (formatting more would cost every step).
    """
    low = tf.reduce_min(x.indices, axis=0)  # an empty input: int64 max, which passes
    high = tf.reduce_max(x.indices, axis=0)
    valid = tf.reduce_all(low >= 0) & tf.reduce_all(high < x.dense_shape) & tf.equal(x.dense_shape[1], input_dim)
    rule = (
        "`inputs` must be a SparseTensor whose indices lie in [0, dense_shape), with dense_shape "
        f"(batch, {input_dim}) for input_dim={input_dim}. Received: "
    )
    if tf.executing_eagerly():
        if not bool(valid):
            indices, shape = x.indices.numpy(), x.dense_shape.numpy()
            outside = np.flatnonzero(((indices < 0) | (indices >= shape)).any(axis=1))
            where = f"inputs.indices[{outside[0]}] = {indices[outside[0]].tolist()} with " if len(outside) else ""
            raise ValueError(f"{rule}{where}dense_shape={shape.tolist()}")
        return x
    check = tf.debugging.Assert(
        valid,
        [rule + "smallest (sample, feature) indices", low, "largest", high, "dense_shape", x.dense_shape],
    )
    with tf.control_dependencies([check]):
        return tf.SparseTensor(tf.identity(x.indices), x.values, x.dense_shape)
