"""Kernels that LiteRT and ONNX can express, swapped in while Keras exports.

Keras' ``model.export(path, format="litert" | "onnx")`` traces the model and
hands the graph to a converter (the TFLite converter, tf2onnx). The training
kernels do not all survive that: TF's CSR ops have no LiteRT or ONNX
equivalent, and index tensors that a kernel created eagerly and captured are
inputs of the traced function, which tf2onnx turns into required inputs of
the ONNX graph. The kernels here read the same ``values`` in the same order,
create every index tensor inside the trace (so converters embed it as a
constant) and use only gather, concat, multiply, sum, matmul and
``unsorted_segment_sum``, which both converters map to builtin operators.

>>> import numpy as np, sparselayers as sl
>>> p = sl.patterns.random((6, 5), density=0.4, seed=0)
>>> v = np.arange(1, p.nnz + 1, dtype="float32")
>>> x = np.eye(6, dtype="float32")
>>> bool(np.allclose(sl.ops.export_kernels.EllKernel(p)(x, v), p.to_dense(v)))
True
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.framework.ops import EagerTensor

from sparselayers.ops.base import Kernel
from sparselayers.ops.choose import EXPORTABLE, choose_export_kernel
from sparselayers.ops.context import export_densified, export_format, export_gather_graph
from sparselayers.ops.serving import SWITCHED, SmallBatchServing
from sparselayers.ops.sparse_storage import request_sparse_storage
from sparselayers.sparsity_pattern import SparsityPattern


def _index_dtype(*bounds: int) -> tf.DType:
    # int32 halves the artifact's index bytes; both converters take it.
    return tf.int32 if max(bounds, default=0) < 2**31 - 1 else tf.int64


def _captured_ids(graph: Any) -> set[int]:
    """Ids of the non-variable tensors a traced function captured so far."""
    captures = getattr(graph, "function_captures", None)
    if captures is None:
        return set()
    return {key for key, tensor in captures.by_val_external.items() if tensor.dtype != tf.resource}


@functools.lru_cache(maxsize=1)
def _onnx_convertible_ops() -> frozenset[str]:
    """TF op types tf2onnx has a handler for."""
    import tf2onnx.tfonnx  # noqa: F401 - registers the handlers
    from tf2onnx import constants
    from tf2onnx.handler import tf_op

    return frozenset(name for opset in tf_op.get_opsets()[constants.ONNX_DOMAIN] for name in opset)


def unconvertible_onnx_ops(op_types: Any) -> list[str]:
    """The op types among ``op_types`` that tf2onnx cannot convert, sorted.

    >>> unconvertible_onnx_ops(["MatMul", "SparseMatrixMatMul"])
    ['SparseMatrixMatMul']
    """
    known = _onnx_convertible_ops() | {"Const", "Placeholder", "Identity", "NoOp"}
    return sorted(set(op_types) - known)


class ExportKernel(Kernel):
    """An exportable kernel: fails the trace rather than yield a broken artifact.

    tf2onnx writes an ONNX file even when it could not convert an op, or when
    the traced function captured a tensor (it lists every capture as a graph
    input that nobody feeds); onnxruntime then rejects the file. So, while
    tracing, this raises ValueError if the kernel captured a tensor, or, for
    ONNX, created an op that tf2onnx has no handler for.
    """

    supports_jit = True

    def __call__(self, x, values):
        graph = tf.compat.v1.get_default_graph()
        captured = _captured_ids(graph)
        n_ops = len(graph.get_operations())
        y = self.compute(x, values)
        if export_format() == "onnx" and not tf.executing_eagerly():
            unknown = unconvertible_onnx_ops(op.type for op in graph.get_operations()[n_ops:])
            if unknown:
                raise ValueError(
                    f"The {self.name!r} export kernel uses TensorFlow ops that tf2onnx cannot convert: "
                    f"{unknown}. Export to 'litert' or 'tf_saved_model', or force a kernel in "
                    f"{list(EXPORTABLE)}. Received: kernel={self!r}"
                )
        if _captured_ids(graph) - captured:
            raise ValueError(
                f"The {self.name!r} export kernel captured a tensor created outside the traced function; "
                "LiteRT and ONNX converters would turn it into a graph input. "
                f"Received: kernel={self!r}"
            )
        return y

    def compute(self, x: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError


def _embed(obj: Any) -> Any:
    """``obj`` with every eager tensor in it re-created as a constant of the current trace."""
    if isinstance(obj, EagerTensor):
        return tf.constant(obj.numpy(), dtype=obj.dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_embed(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _embed(item) for key, item in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _embed(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    return obj


class EmbeddedKernel(ExportKernel):
    """A training kernel (block, banded) traced with its index tensors embedded.

    Those kernels hold their index tensors as eager constants, prepared once;
    at export a shallow copy of the kernel gets in-graph copies of them, so
    the exported graph is the kernel's own, with constants instead of inputs.
    """

    def __init__(self, kernel: Kernel):
        super().__init__(kernel.pattern)
        self.kernel = kernel
        self.name = kernel.name

    def compute(self, x, values):
        embedded = copy.copy(self.kernel)
        embedded.__dict__.update(_embed(vars(self.kernel)))
        return embedded(x, values)

    def __repr__(self) -> str:
        return f"EmbeddedKernel({self.kernel!r})"


#: Column groups of the ELL kernel: columns sorted by entry count and cut
#: into this many groups, each padded to its own fullest column. With one
#: group a random 2048 x 2048 pattern pads to the fullest column, about
#: twice the mean at 0.3% to 1% density; with 8 groups its LiteRT and ONNX
#: artifacts were 1.2x to 1.7x faster at batch 1 and 30% to 50% smaller
#: (4 groups: nearly as good).
ELL_GROUPS = 8


class EllKernel(ExportKernel):
    """Each output unit sums its entries, padded to the fullest column of its group.

    ELLPACK layout, sliced: the output columns, sorted by entry count, form
    :data:`ELL_GROUPS` groups; in a group of width ``w`` (its fullest
    column), output ``j`` reads ``w`` (input row, value) pairs, padding
    pointing at an appended zero input and a zero value. Per group three
    builtin ops (gather, multiply, sum over the last axis), then one gather
    puts the columns back in order: the fastest sparse form measured on both
    runtimes at batch 1 (``benchmarks/export.py``). The artifact holds the
    padded slots' indices and values, so it is for patterns whose columns
    are not too uneven (see :data:`ELL_MAX_PADDING`).
    """

    name = "ell"

    def __init__(self, pattern: SparsityPattern):
        super().__init__(pattern)
        n, m = pattern.shape
        order = np.lexsort((pattern.rows, pattern.cols))  # entries column by column
        counts = np.bincount(pattern.cols, minlength=m)
        starts = np.concatenate([[0], np.cumsum(counts)])
        by_count = np.argsort(counts, kind="stable")
        self._groups: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, value positions), each (columns, width)
        # Column-ordered entries with one padding slot appended: input n (the
        # zero input), value position nnz (the zero value).
        padded_rows = np.append(pattern.rows[order], n)
        padded_positions = np.append(order, pattern.nnz)
        for columns in np.array_split(by_count, min(ELL_GROUPS, m)):
            slot = np.arange(max(int(counts[columns].max(initial=0)), 1))
            k = np.where(slot < counts[columns, None], starts[columns, None] + slot, pattern.nnz)
            self._groups.append((padded_rows[k], padded_positions[k]))
        self._unsort = np.argsort(by_count)  # output column j is column _unsort[j] of the groups' concat
        self.slots = sum(rows.size for rows, _ in self._groups)
        self._dtype = _index_dtype(n, m, pattern.nnz)

    def compute(self, x, values):
        padded_x = tf.concat([x, tf.zeros_like(x[:, :1])], axis=1)
        padded_values = tf.concat([values, tf.zeros([1], values.dtype)], axis=0)
        parts = []
        for rows, positions in self._groups:
            weights = tf.gather(padded_values, tf.constant(positions, self._dtype))
            inputs = tf.gather(padded_x, tf.constant(rows, self._dtype), axis=1)
            parts.append(tf.reduce_sum(inputs * weights, axis=-1))
        y = parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)
        return tf.gather(y, tf.constant(self._unsort, self._dtype), axis=1)


class SegmentSumKernel(ExportKernel):
    """``y[:, j] = sum of x[:, rows[k]] * values[k]`` over the entries ``k`` of column ``j``.

    The gather kernel's computation with in-graph indices: gather, multiply,
    ``unsorted_segment_sum``. Its artifact holds exactly ``nnz`` indices, so
    it serves patterns too uneven for :class:`EllKernel`.
    """

    name = "gather"

    def __init__(self, pattern: SparsityPattern):
        super().__init__(pattern)
        self._dtype = _index_dtype(*pattern.shape)

    def compute(self, x, values):
        rows = tf.constant(self.pattern.rows, self._dtype)
        cols = tf.constant(self.pattern.cols, self._dtype)
        products = tf.gather(x, rows, axis=1) * values
        return tf.transpose(tf.math.unsorted_segment_sum(tf.transpose(products), cols, self.pattern.shape[1]))


class DenseExportKernel(ExportKernel):
    """Densifies ``values`` with one gather from an in-graph position table, then a matmul.

    Converters fold the gather of the frozen values into a dense weight
    constant with exact zeros (TFLite's converter folds this gather where it
    left a ``scatter_nd`` unfolded), so the artifact runs a plain matmul. By
    default the converter then stores that constant in its sparse format
    (:mod:`sparselayers.ops.sparse_storage`); inside
    :func:`sparselayers.export.densified` it stays ``input_dim * units``
    floats.
    """

    name = "dense"

    def __init__(self, pattern: SparsityPattern):
        super().__init__(pattern)
        self._dtype = _index_dtype(pattern.nnz)
        # Built in the index dtype: the table has input_dim * units entries.
        self._positions = np.full(pattern.shape[0] * pattern.shape[1], pattern.nnz, self._dtype.as_numpy_dtype)
        self._positions[pattern.linear] = np.arange(pattern.nnz)

    def weights(self, values: tf.Tensor) -> tf.Tensor:
        """The ``(input_dim, units)`` kernel of ``values``, with exact zeros outside the pattern."""
        padded_values = tf.concat([values, tf.zeros([1], values.dtype)], axis=0)
        return tf.gather(padded_values, tf.constant(self._positions.reshape(self.pattern.shape), self._dtype))

    def compute(self, x, values):
        return tf.matmul(x, self.weights(values))


#: Export form of each kernel name :func:`choose_export_kernel` returns.
_EXPORT_KERNELS = {"ell": EllKernel, "gather": SegmentSumKernel, "dense": DenseExportKernel}


@functools.lru_cache(maxsize=16)
def _export_kernel(name: str, pattern: SparsityPattern) -> Kernel:
    from sparselayers.ops import get_kernel

    if name in _EXPORT_KERNELS:
        return _EXPORT_KERNELS[name](pattern)
    return EmbeddedKernel(get_kernel(name, pattern))


@functools.lru_cache(maxsize=16)
def _serving_kernel(name: str, pattern: SparsityPattern) -> Kernel:
    from sparselayers.ops import get_kernel

    return SmallBatchServing(get_kernel(name, pattern))


def export_kernel(pattern: SparsityPattern, preferred: str, *, forced: bool = False,
                  small_batches: bool = True) -> Kernel:
    """The kernel a layer calls while it is traced for export (see :func:`choose_export_kernel`).

    SavedModel export gets the training kernel ``preferred`` (CSR and
    gather kernels switch to ``sparse_dense_matmul`` on small batches
    where ``small_batches``: :mod:`sparselayers.ops.serving`); LiteRT and
    ONNX get an export form (cached per pattern). A dense form asks the
    converter to store the kernel sparse (:mod:`sparselayers.ops.sparse_storage`),
    except inside :func:`sparselayers.export.densified` and
    :func:`sparselayers.export.gather_graph`, the layouts for runtimes
    without sparse tensors.
    """
    from sparselayers.ops import get_kernel

    name = choose_export_kernel(pattern, preferred, forced=forced)
    if export_format() == "tf_saved_model" and name in SWITCHED and small_batches and not forced:
        return _serving_kernel(name, pattern)
    if export_format() in (None, "tf_saved_model"):
        return get_kernel(name, pattern)
    if name == "dense" and not (export_densified() or export_gather_graph()):
        request_sparse_storage()
    return _export_kernel(name, pattern)
