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
from typing import Any

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

#: The contexts :func:`kernel_context` returns.
CONTEXTS = ("default", "xla", "export")

_state = threading.local()


def _in_xla_context() -> bool:
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@contextlib.contextmanager
def exporting(format: str = "export", **options: Any) -> Iterator[None]:  # noqa: A002 - the Keras argument name
    """Within this block, layer calls trace for export (LiteRT, ONNX, ...).

    ``options`` stand for the keyword arguments of ``model.export`` (converter
    options such as ``optimizations``), which :func:`export_options` returns.
    """
    previous = getattr(_state, "export_format", None), getattr(_state, "export_options", None)
    _state.export_format, _state.export_options = format, options
    try:
        yield
    finally:
        _state.export_format, _state.export_options = previous


@contextlib.contextmanager
def densified_export() -> Iterator[None]:
    """Within this block, LiteRT and ONNX exports multiply scattered patterns by their densified kernel.

    From :data:`~sparselayers.ops.choose.EXPORT_DENSE_MIN_DENSITY` on: the
    latency-first layout at batch 1, whose artifact stores
    ``input_dim * units`` floats whatever the density. Public as
    :func:`sparselayers.export.densified`.
    """
    previous = getattr(_state, "densified", False)
    _state.densified = True
    try:
        yield
    finally:
        _state.densified = previous


def export_densified() -> bool:
    """True inside :func:`densified_export`."""
    return getattr(_state, "densified", False)


@contextlib.contextmanager
def gather_graph_export() -> Iterator[None]:
    """Within this block, LiteRT and ONNX exports keep scattered patterns as index constants and a gather graph.

    The form for runtimes without sparse tensors: the artifact holds each
    entry's value and input index (ELL, or gather and segment sum), no dense
    kernel and no sparse tensor encoding. Public as
    :func:`sparselayers.export.gather_graph`.
    """
    previous = getattr(_state, "gather_graph", False)
    _state.gather_graph = True
    try:
        yield
    finally:
        _state.gather_graph = previous


def export_gather_graph() -> bool:
    """True inside :func:`gather_graph_export`."""
    return getattr(_state, "gather_graph", False)


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
    return _keras_export()[0]


def export_options() -> dict[str, Any]:
    """The keyword arguments of the export under way (converter options), or ``{}``.

    Those of :func:`exporting`, or those given to Keras' ``model.export``,
    read from its exporter's frame (``kwargs``) on the call stack.
    """
    if getattr(_state, "export_format", None) is not None:
        return dict(_state.export_options or {})
    if tf.executing_eagerly():
        return {}
    return _keras_export()[1]


#: Keras exporter modules, most specific first: LiteRT and ONNX export go
#: through Keras' SavedModel ExportArchive too.
_KERAS_EXPORTERS = {
    "keras.src.export.litert": "litert",
    "keras.src.export.onnx": "onnx",
    "keras.src.export.openvino": "openvino",
    "keras.src.export.saved_model": "tf_saved_model",
}


def _frame_options(frame: Any) -> dict[str, Any]:
    """``model.export``'s extra keyword arguments, as Keras' exporter frame holds them."""
    local = frame.f_locals
    kwargs = local.get("kwargs")
    if not isinstance(kwargs, dict):
        kwargs = getattr(local.get("self"), "kwargs", None)
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def keras_exporter_local(format: str, name: str, accept: Any = lambda value: True) -> Any:  # noqa: A002
    """The local ``name`` of the innermost frame of Keras' ``format`` exporter that has one ``accept`` takes, or None.

    Those locals hold what the exporter converts with: LiteRT's
    ``LiteRTExporter`` as ``self``, ONNX's output ``filepath``.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if _KERAS_EXPORTERS.get(frame.f_globals.get("__name__", "")) == format:
            value = frame.f_locals.get(name)
            if value is not None and accept(value):
                return value
        frame = frame.f_back
    return None


def _keras_export() -> tuple[str | None, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module in _KERAS_EXPORTERS:
            found.setdefault(_KERAS_EXPORTERS[module], {}).update(_frame_options(frame))
        frame = frame.f_back
    for format in _KERAS_EXPORTERS.values():  # noqa: A001
        if format in found:
            return format, found[format]
    return None, {}


def kernel_context() -> str:
    """``"export"``, ``"xla"`` or ``"default"`` for the call being traced or run."""
    if export_format() is not None:
        return "export"
    if _in_xla_context():
        return "xla"
    return "default"


@contextlib.contextmanager
def observing_layers() -> Iterator[None]:
    """Within this block every layer call goes through its kernel seam.

    Tools that watch :meth:`SparseDense._select_kernel` (``sl.autotune``
    recording batches, RigL recording inputs and gradients) enter it, so that
    containers with fused fast paths (``Towers``' tower layout) call their
    layers one by one instead.
    """
    depth = getattr(_state, "observing", 0)
    _state.observing = depth + 1
    try:
        yield
    finally:
        _state.observing = depth


def layers_observed() -> bool:
    """True inside :func:`observing_layers`."""
    return getattr(_state, "observing", 0) > 0
