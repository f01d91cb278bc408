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
* **ONNX**: after tf2onnx converts the graph, every float initializer whose
  values and int64 linear indices take fewer bytes than its dense form moves
  to the graph's ``sparse_initializer``; onnxruntime densifies it at load.

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
    quantized = any(getattr(o, "name", o) in _QUANTIZING for o in optimizations)
    if quantized:
        warnings.warn(
            _QUANTIZED_SPARSE_WARNING if any(_is_sparsity(o) for o in optimizations) else _QUANTIZED_DENSE_WARNING,
            stacklevel=2,
        )
    elif not any(_is_sparsity(o) for o in optimizations):
        import tensorflow as tf

        # The exporter passes its kwargs to the converter only after tracing, so this reaches it.
        kwargs["optimizations"] = [*optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]


#: ``tf.lite.Optimize`` members that quantize weights (dynamic range or int8).
_QUANTIZING = ("DEFAULT", "OPTIMIZE_FOR_SIZE", "OPTIMIZE_FOR_LATENCY")
_QUANTIZED_DENSE_WARNING = (
    "sparselayers: this LiteRT export quantizes (optimizations=[tf.lite.Optimize.DEFAULT]), so its sparse "
    "layers' int8 weights are stored dense: TensorFlow 2.21's sparse int8 FULLY_CONNECTED returned wrong "
    "outputs for dynamic range quantized weights (tests/test_export.py). Export without quantization for "
    "sparse storage."
)
_QUANTIZED_SPARSE_WARNING = (
    "sparselayers: optimizations asks for both quantization and EXPERIMENTAL_SPARSITY: TensorFlow 2.21's "
    "sparse int8 FULLY_CONNECTED returned wrong outputs for dynamic range quantized weights "
    "(tests/test_export.py). Check the artifact with sl.export.check_export and a relative tolerance."
)


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
        model_proto = sparse_initializers(model_proto)
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
        entries = np.flatnonzero((flat != 0) | np.signbit(flat))
        if entries.size * (flat.itemsize + _ONNX_INDEX_BYTES) >= flat.nbytes:
            kept.append(tensor)
            continue
        values = numpy_helper.from_array(flat[entries], tensor.name)
        indices = numpy_helper.from_array(entries.astype(np.int64), tensor.name + "_indices")
        graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(array.shape)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model
