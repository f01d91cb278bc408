"""The converters' own sparse weight storage, which LiteRT and ONNX exports use by default.

By default a scattered pattern exports as its dense kernel with exact zeros
(:class:`~sparselayers.ops.export_kernels.DenseExportKernel`), and the layer
asks the converter of the export under way to store that constant sparse:

* **LiteRT**: ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY`` joins the
  ``optimizations`` that Keras' ``LiteRTExporter`` hands to the TFLite
  converter. Its ``dense_to_sparse`` pass stores every constant weight with
  at least 30% zeros in LiteRT's sparse tensor format (``Tensor.sparsity``).
  ``FULLY_CONNECTED`` multiplies weights made of 1x4 blocks along the input
  (float32) with a sparse kernel; the converter puts a ``DENSIFY`` op before
  other patterns, which expands them once, when the interpreter loads.
  That pass leaves the tables of ``GATHER`` (embeddings) dense, so the
  converted file then goes through :func:`sparse_gather_tables`, which
  stores them in the same format, with the same ``DENSIFY``.
* **ONNX**: after tf2onnx converts the graph, every mostly-zero float
  initializer is stored in the smaller of two forms that onnxruntime turns
  back into the same dense initializer when it loads the file:
  ``sparse_initializer`` (the values and their int64 linear indices, 12
  bytes per entry), or, from a density of 1/64, a bit mask and the values
  (4 bytes per entry and 1 bit per cell) expanded by a few builtin ops
  (:func:`mask_initializers`) that onnxruntime's constant folding runs once,
  at session creation. Either way its graph multiplies by a plain dense
  initializer, pre-packed like the dense model's.

Either way the file holds about the entries, and the runtime multiplies as
fast as the dense model or faster. Both requests act only on the
``model.export`` call whose trace made them.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import Any

import numpy as np

from sparselayers.ops.context import export_format, keras_exporter_local

#: Fewest elements for which an ONNX initializer is stored sparse: smaller
#: ones (biases of tiny layers) gain nothing worth a second encoding.
ONNX_SPARSE_MIN_SIZE = 64
#: Bytes of one ONNX sparse entry: its int64 linear index (``onnx.checker``
#: accepts no other index type) on top of the value itself.
_ONNX_INDEX_BYTES = 8
#: Name suffixes of the initializers of a mask-encoded weight: the packed
#: bit mask, and the values in C order with a zero appended.
MASK_SUFFIX, VALUES_SUFFIX = "__sparse_mask", "__sparse_values"
#: Lowest default-domain opset with every op of the mask expansion (BitShift, CumSum).
_MASK_OPSET = 11

_lock = threading.Lock()
#: Output paths of ONNX exports whose trace asked for sparse initializers.
_onnx_requests: set[str] = set()


def request_sparse_storage() -> None:
    """Asks the converter of the ``model.export`` under way to store sparse weights sparse.

    Does nothing outside a Keras ``model.export`` to LiteRT or ONNX (for
    example under :func:`~sparselayers.ops.context.exporting` alone): the
    artifact is then exact, but stores the kernel dense.
    """
    format = export_format()  # noqa: A001
    if format == "litert":
        _request_litert_sparsity()
    elif format == "onnx":
        _request_onnx_sparse_initializers()


def _is_sparsity(option: Any) -> bool:
    return getattr(option, "name", option) == "EXPERIMENTAL_SPARSITY"


def _request_litert_sparsity() -> None:
    exporter = keras_exporter_local("litert", "self", lambda value: hasattr(value, "_apply_converter_kwargs"))
    kwargs = getattr(exporter, "kwargs", None)
    if not isinstance(kwargs, dict):
        return
    optimizations = list(kwargs.get("optimizations") or ())
    if any(getattr(o, "name", o) in _QUANTIZING for o in optimizations) and not _float16_only(kwargs):
        if not vars(exporter).get("_sparselayers_warned"):  # once per export, not per layer
            exporter._sparselayers_warned = True
            warnings.warn(_quantized_warning(any(_is_sparsity(o) for o in optimizations),
                                             kwargs.get("representative_dataset") is not None), stacklevel=2)
        return
    if not any(_is_sparsity(o) for o in optimizations):
        import tensorflow as tf

        # The exporter passes its kwargs to the converter only after tracing, so this reaches it.
        kwargs["optimizations"] = [*optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    _convert_with_sparse_tables(exporter)


def _convert_with_sparse_tables(exporter: Any) -> None:
    """Makes this export's converter store ``GATHER`` tables sparse too (:func:`sparse_gather_tables`).

    The exporter creates its converter after tracing and hands it to its
    ``_apply_converter_kwargs`` before ``convert``; wrapping that method on
    this exporter instance reaches this export's converter alone.
    """
    if "_apply_converter_kwargs" in vars(exporter):
        return  # a second trace of the same export
    apply_kwargs = exporter._apply_converter_kwargs

    def apply_converter_kwargs(converter: Any) -> None:
        apply_kwargs(converter)
        convert = converter.convert
        converter.convert = lambda: sparse_gather_tables(convert())

    exporter._apply_converter_kwargs = apply_converter_kwargs


#: ``tf.lite.Optimize`` members that quantize weights (dynamic range or int8).
_QUANTIZING = ("DEFAULT", "OPTIMIZE_FOR_SIZE", "OPTIMIZE_FOR_LATENCY")


def _float16_only(kwargs: dict) -> bool:
    """Whether the converter quantizes weights to float16 alone: LiteRT then stores them sparse as well."""
    spec = kwargs.get("target_spec")
    types = spec.get("supported_types") if isinstance(spec, dict) else getattr(spec, "supported_types", None)
    names = {getattr(t, "name", str(t)) for t in types or ()}
    return bool(names) and names <= {"float16"}


def _quantized_warning(sparsity: bool, full_integer: bool) -> str:
    """What a quantized LiteRT export of sparse layers gets, and how to get the other choice (docs/deploying.md)."""
    if not full_integer:
        return (
            "sparselayers: this LiteRT export quantizes with dynamic range (optimizations=[tf.lite.Optimize.DEFAULT], "
            "no representative_dataset). "
            + ("You asked for EXPERIMENTAL_SPARSITY too, but TensorFlow 2.21's sparse int8 FULLY_CONNECTED returns "
               "wrong outputs for dynamic range weights (tests/test_export.py): check the artifact with "
               "sl.export.check_export and a relative tolerance, or drop EXPERIMENTAL_SPARSITY."
               if sparsity else
               "Its sparse layers' int8 weights are stored dense: TensorFlow 2.21's sparse int8 FULLY_CONNECTED "
               "returns wrong outputs for dynamic range weights (tests/test_export.py). For sparse int8 storage, "
               "quantize fully (pass representative_dataset) with EXPERIMENTAL_SPARSITY and 1x16 tiles.")
        )
    return (
        "sparselayers: this LiteRT export quantizes to int8 with a representative_dataset. "
        + ("With EXPERIMENTAL_SPARSITY, FULLY_CONNECTED reads weights made of 1x16 tiles (sl.sparsify(block=(16, 1))) "
           "sparse; other sparse weights get an int8 DENSIFY, which the XNNPACK delegate fails to prepare, so "
           "sparsify with block=(16, 1) or load with XNNPACK off."
           if sparsity else
           "Its sparse layers' int8 weights are stored dense (as fast as dense int8 under XNNPACK). For a file that "
           "follows the entries, sparsify with block=(16, 1) and add tf.lite.Optimize.EXPERIMENTAL_SPARSITY: "
           "FULLY_CONNECTED then multiplies the 1x16 tiles sparse (docs/deploying.md gives its speed).")
    )


#: Highest density at which :func:`sparse_gather_tables` stores a table sparse.
GATHER_TABLE_MAX_DENSITY = 0.5


def sparse_gather_tables(tflite_model: bytes, *, max_density: float = GATHER_TABLE_MAX_DENSITY) -> bytes:
    """``tflite_model`` with the float tables its ``GATHER`` ops read stored in LiteRT's sparse format.

    The TFLite converter's sparsity pass stores only the weights of
    ``FULLY_CONNECTED`` and convolutions sparse. This stores every constant
    2-D float32 or float16 table that a ``GATHER`` reads, with at most
    ``max_density`` of its cells nonzero (``-0.0`` counts), as compressed
    rows (LiteRT's ``SPARSE_CSR`` dimension, with the smallest index type
    that holds them), and puts a ``DENSIFY`` before it: the interpreter
    expands the table once, at load, and every operator that read the table
    (a second gather, tied weights) reads the expansion. A table whose
    buffer another tensor shares, or that is a graph input or output, stays
    as it is. The file holds the values and about one byte or two per
    entry instead of every cell. Other models come back unchanged.

    Example:

    >>> import os, tempfile, numpy as np, keras
    >>> from ai_edge_litert.interpreter import Interpreter
    >>> table = np.zeros((1000, 8), "float32"); table[::7, ::3] = 1.0
    >>> ids = keras.Input((4,), dtype="int32")
    >>> model = keras.Model(ids, keras.layers.Embedding(1000, 8, weights=[table])(ids))
    >>> path = os.path.join(tempfile.mkdtemp(), "embedding.tflite")
    >>> model.export(path, format="litert", verbose=False)  # a Keras model: its table is stored dense
    >>> dense = open(path, "rb").read()
    >>> sparse = sparse_gather_tables(dense)
    >>> len(sparse) < len(dense) / 4
    True
    >>> interpreter = Interpreter(model_content=sparse)
    >>> runner = interpreter.get_signature_runner()
    >>> out = runner(**{runner.get_input_details().popitem()[0]: np.array([[0, 7, 8, 999]], "int32")})
    >>> bool(np.array_equal(out.popitem()[1][0], table[[0, 7, 8, 999]]))
    True
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_model))

    def builtin(code: Any) -> int:
        return max(code.builtinCode, code.deprecatedBuiltinCode)

    densify = next((i for i, code in enumerate(model.operatorCodes) if builtin(code) == schema.BuiltinOperator.DENSIFY), None)
    dtypes = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16}
    # Tensors per buffer, over every subgraph: a shared buffer is left as it is.
    users = np.bincount([t.buffer for g in model.subgraphs for t in g.tensors or ()], minlength=len(model.buffers))
    changed = False
    for subgraph in model.subgraphs:
        ends = {int(i) for i in [*(subgraph.inputs if subgraph.inputs is not None else ()),
                                 *(subgraph.outputs if subgraph.outputs is not None else ())]}
        tables = sorted({
            int(op.inputs[0]) for op in subgraph.operators or ()
            if builtin(model.operatorCodes[op.opcodeIndex]) == schema.BuiltinOperator.GATHER
        })
        expanded = {}  # table tensor -> the DENSIFY output that replaces it for every reader
        for index in tables:
            tensor = subgraph.tensors[index]
            buffer = model.buffers[tensor.buffer]
            if (tensor.type not in dtypes or tensor.sparsity is not None or buffer.data is None or index in ends
                    or users[tensor.buffer] != 1 or tensor.shape is None or len(tensor.shape) != 2):
                continue
            table = np.frombuffer(bytes(bytearray(buffer.data)), dtypes[tensor.type]).reshape(tuple(tensor.shape))
            mask = _entries(table)
            if table.size == 0 or mask.mean() > max_density:
                continue
            tensor.sparsity = _csr_sparsity(schema, mask)
            buffer.data = np.ascontiguousarray(table[mask]).view(np.uint8)
            dense = schema.TensorT()
            dense.shape, dense.type, dense.buffer = list(tensor.shape), tensor.type, 0
            dense.name = (tensor.name or b"") + b"/densified"
            subgraph.tensors.append(dense)
            expanded[index] = len(subgraph.tensors) - 1
        if not expanded:
            continue
        if densify is None:
            code = schema.OperatorCodeT()
            code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.DENSIFY
            code.version = 1
            model.operatorCodes.append(code)
            densify = len(model.operatorCodes) - 1
        for op in subgraph.operators:  # every reader, not only the gathers (tied weights, a shared embedding)
            op.inputs = [expanded.get(int(i), int(i)) for i in op.inputs]
        expansions = []
        for index, dense_index in expanded.items():
            expansion = schema.OperatorT()
            expansion.opcodeIndex, expansion.inputs, expansion.outputs = densify, [index], [dense_index]
            expansion.builtinOptionsType = schema.BuiltinOptions.DensifyOptions
            expansion.builtinOptions = schema.DensifyOptionsT()
            expansions.append(expansion)
        subgraph.operators = expansions + list(subgraph.operators)
        changed = True
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)) if changed else tflite_model


def _csr_sparsity(schema: Any, mask: np.ndarray) -> Any:
    """LiteRT ``SparsityParameters`` of a 2-D ``mask``: dense rows, compressed columns, entries in C order."""

    def index_vector(array: np.ndarray) -> tuple[int, Any]:
        for kind, vector, dtype in (("Uint8Vector", schema.Uint8VectorT, np.uint8),
                                    ("Uint16Vector", schema.Uint16VectorT, np.uint16),
                                    ("Int32Vector", schema.Int32VectorT, np.int32)):
            if array.max(initial=0) <= np.iinfo(dtype).max:
                stored = vector()
                stored.values = array.astype(dtype)
                return getattr(schema.SparseIndexVector, kind), stored
        raise ValueError(f"A LiteRT sparse index above int32. Received: {int(array.max())}")

    rows = schema.DimensionMetadataT()
    rows.format, rows.denseSize = schema.DimensionType.DENSE, mask.shape[0]
    columns = schema.DimensionMetadataT()
    columns.format = schema.DimensionType.SPARSE_CSR
    columns.arraySegmentsType, columns.arraySegments = index_vector(np.concatenate([[0], np.cumsum(mask.sum(axis=1))]))
    columns.arrayIndicesType, columns.arrayIndices = index_vector(np.nonzero(mask)[1])
    sparsity = schema.SparsityParametersT()
    sparsity.traversalOrder, sparsity.dimMetadata = [0, 1], [rows, columns]
    return sparsity


def _request_onnx_sparse_initializers() -> None:
    path = keras_exporter_local("onnx", "filepath")
    if path is None:
        return
    _wrap_tf2onnx()
    with _lock:
        _onnx_requests.add(os.path.abspath(os.fspath(path)))


@functools.lru_cache(maxsize=1)
def _wrap_tf2onnx() -> None:
    """Makes ``tf2onnx.convert.from_function`` store sparse initializers for the exports that asked.

    Keras' ONNX exporter traces the model, then calls that function with
    ``output_path``: the trace's request names the path, and the conversion
    for that path writes the model with :func:`sparse_initializers`.
    Conversions nobody asked about run unchanged.
    """
    import tf2onnx.convert
    from tf2onnx import utils

    original = tf2onnx.convert.from_function

    @functools.wraps(original)
    def from_function(*args: Any, output_path: Any = None, **kwargs: Any) -> Any:
        key = None if output_path is None else os.path.abspath(os.fspath(output_path))
        with _lock:
            asked = key in _onnx_requests
            _onnx_requests.discard(key)
        if not asked or kwargs.get("large_model"):
            return original(*args, output_path=output_path, **kwargs)
        model_proto, storage = original(*args, output_path=None, **kwargs)
        model_proto = sparse_initializers(mask_initializers(model_proto))
        utils.save_protobuf(output_path, model_proto)
        return model_proto, storage

    tf2onnx.convert.from_function = from_function


def sparse_initializers(model: Any, *, min_size: int = ONNX_SPARSE_MIN_SIZE) -> Any:
    """``model`` (an ``onnx.ModelProto``) with its mostly-zero float initializers stored as ``sparse_initializer``.

    An initializer moves when its nonzeros (``-0.0`` counts as one, so the
    graph stays bit-exact) with their int64 linear indices take fewer bytes
    than the dense tensor: below a density of 1/3 in float32. The model is
    changed in place and returned.

    Example:

    >>> import numpy as np, onnx
    >>> from onnx import helper, numpy_helper
    >>> w = np.zeros((16, 8), "float32"); w[::4, ::2] = 1.0
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 16])],
    ...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8])],
    ...     initializer=[numpy_helper.from_array(w, "w")])
    >>> model = sparse_initializers(helper.make_model(graph))
    >>> len(model.graph.initializer), model.graph.sparse_initializer[0].values.dims
    (0, [16])
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inputs = {value.name for value in graph.input}
    kept = []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if tensor.name in inputs or array.dtype.kind != "f" or array.size < min_size:
            kept.append(tensor)
            continue
        flat = array.ravel()
        entries = np.flatnonzero(_entries(flat))
        if entries.size * (flat.itemsize + _ONNX_INDEX_BYTES) >= flat.nbytes:
            kept.append(tensor)
            continue
        values = numpy_helper.from_array(flat[entries], tensor.name)
        indices = numpy_helper.from_array(entries.astype(np.int64), tensor.name + "_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _entries(flat: np.ndarray) -> np.ndarray:
    """Where ``flat`` is nonzero; ``-0.0`` counts, so that the graph stays bit-exact."""
    return (flat != 0) | np.signbit(flat)


def mask_initializers(model: Any, *, min_size: int = ONNX_SPARSE_MIN_SIZE) -> Any:
    """``model`` with its float initializers of density 1/64 to 1/3 stored as a bit mask and the values.

    Each such initializer ``w`` becomes ``w__sparse_mask`` (the packed
    mask, 1 bit per cell) and ``w__sparse_values`` (the entries in C
    order, then a zero), and a subgraph of builtin ops computes ``w``:
    unpack the bits, give each cell its entry's position with an exclusive
    cumulative sum, gather, and zero the cells outside the mask. Its
    inputs are all constants, so onnxruntime's constant folding (on by
    default, at any ``graph_optimization_level`` above ``ORT_DISABLE_ALL``)
    computes ``w`` once, when the session is created: the model then runs
    the dense model's graph. Below a density of 1/64 the mask costs more
    than ``sparse_initializer``'s int64 indices, so those initializers stay
    for :func:`sparse_initializers`. Models of an opset below 11 (which
    lacks ``BitShift`` and ``CumSum``) are left as they are. The model is
    changed in place and returned.

    Example:

    >>> import numpy as np, onnx, onnxruntime
    >>> from onnx import helper, numpy_helper
    >>> w = np.zeros((16, 8), "float32"); w[::4, ::2] = 1.0
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 16])],
    ...     [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8])],
    ...     initializer=[numpy_helper.from_array(w, "w")])
    >>> model = mask_initializers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    >>> [t.name for t in model.graph.initializer if t.name.startswith("w__sparse_m") or t.name.endswith("values")]
    ['w__sparse_mask', 'w__sparse_values']
    >>> session = onnxruntime.InferenceSession(model.SerializeToString())
    >>> x = np.ones((1, 16), "float32")
    >>> bool(np.array_equal(session.run(None, {"x": x})[0], x @ w))
    True
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0) < _MASK_OPSET:
        return model
    inputs = {value.name for value in graph.input}
    kept, expansions = [], []

    def constant(array: np.ndarray, name: str) -> str:
        kept.append(numpy_helper.from_array(array, name))
        return name

    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if tensor.name in inputs or array.dtype.kind != "f" or array.size < min_size:
            kept.append(tensor)
            continue
        flat = array.ravel()
        mask = _entries(flat)
        nnz = int(mask.sum())
        mask_bytes = nnz * flat.itemsize + -(-flat.size // 8)
        if mask_bytes >= min(flat.nbytes, nnz * (flat.itemsize + _ONNX_INDEX_BYTES)):
            kept.append(tensor)
            continue
        name, prefix = tensor.name, tensor.name + "__sparse_"
        bits = constant(np.packbits(mask), name + MASK_SUFFIX)
        values = constant(np.append(flat[mask], np.zeros(1, flat.dtype)), name + VALUES_SUFFIX)
        expansions += [
            # Bit k of byte j (most significant first) is cell 8 j + k.
            helper.make_node("Unsqueeze", [bits, constant(np.array([1], np.int64), prefix + "axis")], [prefix + "bytes"]),
            helper.make_node("BitShift", [prefix + "bytes", constant(np.arange(7, -1, -1, dtype=np.uint8), prefix + "shifts")],
                             [prefix + "shifted"], direction="RIGHT"),
            helper.make_node("Mod", [prefix + "shifted", constant(np.array([2], np.uint8), prefix + "two")], [prefix + "bits"]),
            helper.make_node("Reshape", [prefix + "bits", constant(np.array([-1], np.int64), prefix + "flat_shape")], [prefix + "all_bits"]),
            helper.make_node("Slice", [prefix + "all_bits", constant(np.array([0], np.int64), prefix + "start"),
                                       constant(np.array([flat.size], np.int64), prefix + "size")], [prefix + "cell_bits"]),
            helper.make_node("Cast", [prefix + "cell_bits"], [prefix + "counts"], to=TensorProto.INT64),
            # Each cell's entry: the number of entries before it (cells outside the mask read the zero).
            helper.make_node("CumSum", [prefix + "counts", constant(np.array(0, np.int64), prefix + "cumsum_axis")],
                             [prefix + "positions"], exclusive=1),
            helper.make_node("Cast", [prefix + "cell_bits"], [prefix + "inside"], to=TensorProto.BOOL),
            helper.make_node("Where", [prefix + "inside", prefix + "positions", constant(np.array([nnz], np.int64), prefix + "zero_at")],
                             [prefix + "reads"]),
            helper.make_node("Gather", [values, prefix + "reads"], [prefix + "cells"]),
            helper.make_node("Reshape", [prefix + "cells", constant(np.array(array.shape, np.int64), prefix + "shape")], [name]),
        ]
    if not expansions:
        return model
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = expansions + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model
