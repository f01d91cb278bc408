"""Which kind of trace a layer call is part of: the seam for kernel choice.

A layer computes the same ``x @ W`` in every context, but not every kernel
can run everywhere: XLA cannot compile TF's CSR ops, and LiteRT and ONNX
cannot express them. :func:`kernel_context` names the context of the current
call so that a layer can pick, among kernels reading the same ``values``,
one that works there.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

#: The contexts :func:`kernel_context` returns.
CONTEXTS = ("default", "xla", "export")

_state = threading.local()


def _in_xla_context() -> bool:
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@contextlib.contextmanager
def exporting(format: str = "export") -> Iterator[None]:  # noqa: A002 - the Keras argument name
    """Within this block, layer calls trace for export (LiteRT, ONNX, ...)."""
    previous = getattr(_state, "export_format", None)
    _state.export_format = format
    try:
        yield
    finally:
        _state.export_format = previous


def export_format() -> str | None:
    """The format being exported to, or None outside an export.

    Set by :func:`exporting`, or found on the call stack when Keras'
    ``model.export(path, format=...)`` traces the model: its exporters live
    in ``keras.src.export.<format>`` modules. Only traces pay for the look
    (eager calls never export).
    """
    explicit = getattr(_state, "export_format", None)
    if explicit is not None or tf.executing_eagerly():
        return explicit
    return _keras_export_format()


#: Keras exporter modules, most specific first: LiteRT and ONNX export go
#: through Keras' SavedModel ExportArchive too.
_KERAS_EXPORTERS = {
    "keras.src.export.litert": "litert",
    "keras.src.export.onnx": "onnx",
    "keras.src.export.openvino": "openvino",
    "keras.src.export.saved_model": "tf_saved_model",
}


def _keras_export_format() -> str | None:
    found = set()
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module in _KERAS_EXPORTERS:
            found.add(_KERAS_EXPORTERS[module])
        frame = frame.f_back
    for format in _KERAS_EXPORTERS.values():  # noqa: A001
        if format in found:
            return format
    return None


def kernel_context() -> str:
    """``"export"``, ``"xla"`` or ``"default"`` for the call being traced or run."""
    if export_format() is not None:
        return "export"
    if _in_xla_context():
        return "xla"
    return "default"
