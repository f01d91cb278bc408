"""Run and check what Keras' ``model.export`` wrote: LiteRT and ONNX artifacts.

Export itself is Keras' own call: ``model.export("m.tflite", format="litert")``
or ``model.export("m.onnx", format="onnx")``. While Keras traces the model,
every sparse layer swaps its kernel for one the format can express
(:mod:`sparselayers.ops.export_kernels`), reading the same values. By
default a scattered pattern traces its kernel with exact zeros, and the
converter stores it in the format's own sparse encoding (LiteRT's sparse
tensors, ONNX's ``sparse_initializer``; :mod:`sparselayers.ops.sparse_storage`):
the file follows the entries, the runtime multiplies at dense speed or
faster. :func:`gather_graph` and :func:`densified` are the layouts for
runtimes without sparse tensors. The functions here run an artifact with the runtime a deployment
uses (the LiteRT interpreter, onnxruntime) and compare it with the Keras
model, which is what a test or a release script should do after exporting.
They need the ``export`` extra: ``pip install "sparselayers[export]"``.

>>> import os, tempfile, numpy as np, keras, sparselayers as sl
>>> inputs = keras.Input((16,))
>>> model = keras.Model(inputs, sl.SparseDense(sl.patterns.random((16, 4), density=0.3, seed=0))(inputs))
>>> x = np.random.default_rng(0).normal(size=(3, 16)).astype("float32")
>>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
>>> _ = model(x)  # Keras exports only models that have been called
>>> model.export(path, format="onnx", verbose=False)
>>> sl.export.check_export(model, path, x) <= 1e-5
True
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparselayers.ops.context import densified_export, gather_graph_export

#: Largest max absolute difference :func:`check_export` accepts by default
#: between the artifact's float32 outputs and the Keras model's.
TOLERANCE = 1e-5

_FORMATS = {".tflite": "litert", ".onnx": "onnx"}


def artifact_format(path: str | os.PathLike) -> str:
    """``"litert"`` for a ``.tflite`` file, ``"onnx"`` for a ``.onnx`` file.

    Raises:
        ValueError: any other extension.
    """
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension not in _FORMATS:
        raise ValueError(
            f"`path` must name a .tflite (LiteRT) or .onnx file. Received: path={os.fspath(path)!r}"
        )
    return _FORMATS[extension]


def _litert_interpreter(path: str, num_threads: int | None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TF's own copy: deprecated, but it runs the same files
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806 - a class
    return Interpreter(model_path=path, num_threads=num_threads)


def densified() -> Any:
    """Within this block, exports store scattered patterns as a plain dense kernel.

    For runtimes that read neither LiteRT's sparse tensors nor ONNX's
    ``sparse_initializer``: from a density of 6% a scattered layer
    multiplies by its densified kernel and the artifact stores
    ``4 * input_dim * units`` bytes; below, it takes the
    :func:`gather_graph` form. Block and banded layers keep their kernels
    either way. By default (outside this block) the same dense product is
    stored sparse, which is as fast and several times smaller.

    Example:

    >>> import os, tempfile, keras, numpy as np, sparselayers as sl
    >>> inputs = keras.Input((64,))
    >>> model = keras.Model(inputs, sl.SparseDense(sl.patterns.random((64, 64), density=0.1, seed=0))(inputs))
    >>> _ = model(np.zeros((1, 64), "float32"))
    >>> small, plain = (os.path.join(tempfile.mkdtemp(), name) for name in ("small.onnx", "plain.onnx"))
    >>> model.export(small, format="onnx", verbose=False)
    >>> with sl.export.densified():
    ...     model.export(plain, format="onnx", verbose=False)
    >>> os.path.getsize(small) < os.path.getsize(plain)
    True
    """
    return densified_export()


def gather_graph() -> Any:
    """Within this block, exports store scattered patterns as index constants and a gather graph.

    For runtimes without sparse tensors that still need a file whose size
    follows the entries: each output gathers its inputs, multiplies by its
    values and sums (ELL; gather and ``unsorted_segment_sum`` when columns
    are very uneven), about 8 bytes per entry, with builtin ops only. At
    batch 1 it is slower than a dense matmul from about 1% (onnxruntime) to
    3% (LiteRT) density (``benchmarks/export.py``); the default export is
    not.

    Example:

    >>> import os, tempfile, keras, numpy as np, sparselayers as sl
    >>> inputs = keras.Input((64,))
    >>> layer = sl.SparseDense(sl.patterns.random((64, 64), density=0.1, seed=0))
    >>> model = keras.Model(inputs, layer(inputs))
    >>> _ = model(np.zeros((1, 64), "float32"))
    >>> path = os.path.join(tempfile.mkdtemp(), "gather.onnx")
    >>> with sl.export.gather_graph():
    ...     model.export(path, format="onnx", verbose=False)
    >>> layer.kernel_name
    'ell'
    """
    return gather_graph_export()


def sparse_weights(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The weights that an artifact stores in its format's sparse encoding, and how its runtime reads them.

    Args:
        path: a ``.tflite`` or ``.onnx`` file.

    Returns:
        One dict per sparse weight, with ``name``, ``shape`` (dense) and
        ``entries`` (stored values, padding of blocks included). For ONNX
        also ``encoding``: ``"sparse_initializer"``, or ``"mask"`` (a bit
        mask and the values, expanded by constant-folded ops:
        :func:`sparselayers.ops.sparse_storage.mask_initializers`). For LiteRT
        also ``block``, the shape of its blocks in the tensor's own layout
        (``(1, 1)`` for random sparsity; ``FULLY_CONNECTED`` stores
        ``(units, input_dim)``, so its ``(1, 4)`` blocks are 4 consecutive
        inputs of one unit) and ``read_by``, the operator that reads it:
        ``"DENSIFY"`` when the interpreter expands it once at load, or the
        operator that multiplies by it sparse (``"FULLY_CONNECTED"``). For
        both formats ``used_by``, the operator that computes with the
        weight: the reader, or for ``DENSIFY`` the operator reading its
        output (``"CONV_2D"``, ``"FULLY_CONNECTED"``, ONNX's ``"Conv"``,
        ``"MatMul"``).

    Raises:
        ValueError: ``path`` is neither ``.tflite`` nor ``.onnx``.

    Example:

    >>> import os, tempfile, keras, numpy as np, sparselayers as sl
    >>> inputs = keras.Input((64,))
    >>> model = keras.Model(inputs, sl.SparseDense(sl.patterns.random((64, 32), density=0.1, seed=0))(inputs))
    >>> _ = model(np.zeros((1, 64), "float32"))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.tflite")
    >>> model.export(path, format="litert", verbose=False)
    >>> stored = [(w["shape"], w["block"], w["read_by"], w["used_by"]) for w in sl.export.sparse_weights(path)]
    >>> stored == [((32, 64), (1, 1), "DENSIFY", "FULLY_CONNECTED")]
    True
    """
    path = os.fspath(path)
    if artifact_format(path) == "onnx":
        import onnx
        import onnx.numpy_helper

        from sparselayers.ops.sparse_storage import MASK_SUFFIX, VALUES_SUFFIX

        graph = onnx.load(path, load_external_data=False).graph
        users: dict[str, str] = {}
        for node in graph.node:
            for name in node.input:
                users.setdefault(name, node.op_type)
        found = [
            {"name": t.values.name, "shape": tuple(t.dims), "entries": int(np.prod(t.values.dims)),
             "encoding": "sparse_initializer", "used_by": users.get(t.values.name, "")}
            for t in graph.sparse_initializer
        ]
        dims = {t.name: tuple(t.dims) for t in graph.initializer}
        for name in dims:
            if name.endswith(MASK_SUFFIX):
                weight = name[: -len(MASK_SUFFIX)]
                shape = onnx.numpy_helper.to_array(next(t for t in graph.initializer if t.name == weight + "__sparse_shape"))
                found.append({
                    "name": weight, "shape": tuple(int(d) for d in shape),
                    "entries": int(np.prod(dims[weight + VALUES_SUFFIX])) - 1,  # the appended zero
                    "encoding": "mask", "used_by": users.get(weight, ""),
                })
        return found
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        from tensorflow.lite.python import schema_py_generated as schema
    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    found = []
    for subgraph in model.subgraphs:
        readers: dict[int, str] = {}
        densified: dict[int, int] = {}  # a DENSIFY's input -> its output
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            for index in op.inputs if op.inputs is not None else ():
                readers.setdefault(int(index), name)
            if name == "DENSIFY":
                densified[int(op.inputs[0])] = int(op.outputs[0])
        for index, tensor in enumerate(subgraph.tensors):
            sparsity = tensor.sparsity
            if sparsity is None:
                continue
            shape = tuple(int(d) for d in tensor.shape)
            block_map = [int(d) for d in sparsity.blockMap] if sparsity.blockMap is not None else []
            metadata = sparsity.dimMetadata
            block = tuple(
                int(metadata[len(shape) + block_map.index(d)].denseSize) if d in block_map else 1 for d in range(len(shape))
            )
            buffer = model.buffers[tensor.buffer]
            entries = (len(buffer.data) if buffer.data is not None else int(buffer.size)) // _ITEM_BYTES.get(tensor.type, 4)
            found.append({
                "name": (tensor.name or b"").decode(), "shape": shape, "entries": entries, "block": block,
                "read_by": readers.get(index, ""), "used_by": readers.get(densified.get(index, index), ""),
            })
    return found


#: Bytes per element of LiteRT tensor types a sparse weight may have (schema's TensorType codes).
_ITEM_BYTES = {0: 4, 1: 2, 9: 1, 3: 1}


class ExportedModel:
    """A LiteRT or ONNX artifact loaded in its runtime, called like a model.

    Args:
        path: a ``.tflite`` or ``.onnx`` file written by ``model.export``.
        num_threads: threads of the runtime; None for its default.

    Calling it with one array (any batch size: exports keep the batch
    dimension dynamic) returns the first output as a NumPy array. The array
    is converted to the artifact's input dtype (:attr:`input_dtype`:
    float32, or the integer ids of an embedding).

    Raises:
        ValueError: ``path`` is neither ``.tflite`` nor ``.onnx``, or for
            ONNX, ``onnx.checker`` rejects the file.
        ImportError: the runtime is not installed (the ``export`` extra).
    """

    def __init__(self, path: str | os.PathLike, *, num_threads: int | None = None):
        self.path = os.fspath(path)
        self.format = artifact_format(self.path)
        if self.format == "onnx":
            import onnx
            import onnxruntime

            # onnx's strict shape inference types a sparse_initializer as a sparse
            # tensor, which MatMul does not take; onnxruntime densifies it at load.
            sparse = len(onnx.load(self.path, load_external_data=False).graph.sparse_initializer) > 0
            onnx.checker.check_model(self.path, full_check=not sparse)
            options = onnxruntime.SessionOptions()
            if num_threads is not None:
                options.intra_op_num_threads = options.inter_op_num_threads = num_threads
            self._session = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
            first = self._session.get_inputs()[0]
            self._input_name = first.name
            # "tensor(float)", "tensor(int32)", ...: numpy's names but for float.
            kind = first.type[len("tensor(") : -1]
            self.input_dtype = np.dtype({"float": "float32", "double": "float64"}.get(kind, kind))
        else:
            self._interpreter = _litert_interpreter(self.path, num_threads)
            details = self._interpreter.get_input_details()[0]
            self._input = details["index"]
            self.input_dtype = np.dtype(details["dtype"])
            self._output = self._interpreter.get_output_details()[0]["index"]
            self._shape: tuple[int, ...] | None = None

    def __call__(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=self.input_dtype)
        if self.format == "onnx":
            return self._session.run(None, {self._input_name: x})[0]
        if x.shape != self._shape:
            self._interpreter.resize_tensor_input(self._input, x.shape)
            self._interpreter.allocate_tensors()
            self._shape = x.shape
        self._interpreter.set_tensor(self._input, x)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)


def check_export(model: Any, path: str | os.PathLike, x: Any, *, atol: float = TOLERANCE) -> float:
    """Runs the artifact at ``path`` on ``x`` and compares it with ``model(x)``.

    Args:
        model: the Keras model that was exported.
        path: its ``.tflite`` or ``.onnx`` artifact.
        x: an input batch (converted to the artifact's input dtype).
        atol: largest accepted max absolute difference.

    Returns:
        The max absolute difference between the two outputs.

    Raises:
        ValueError: the outputs differ by more than ``atol`` or in shape, or
            the file is not a valid artifact (see :class:`ExportedModel`).
    """
    artifact = ExportedModel(path)
    x = np.asarray(x, dtype=artifact.input_dtype)
    expected = np.asarray(model(x))
    got = artifact(x)
    if got.shape != expected.shape:
        raise ValueError(
            f"The artifact's output shape {got.shape} differs from the model's {expected.shape}. Received: path={os.fspath(path)!r}"
        )
    difference = float(np.max(np.abs(got - expected), initial=0.0))
    if not difference <= atol:
        raise ValueError(
            f"The artifact's outputs differ from the model's by up to {difference:.3g} (allowed: atol={atol}). "
            f"Received: path={os.fspath(path)!r}"
        )
    return difference
