"""A Keras model as a graph of layer calls, for relevance (``sl.knowledge``).

Relevance has to follow the model's own wiring: two branches joined by
``Add`` contribute two sums of paths, a ``Concatenate`` hands each input its
own block of units. :func:`model_graph` lists the layer calls of a
functional model (or a chain of layers) in topological order with the
tensors they read and write; :func:`pull_back` carries a vector of output
weights back through one call, linearly, as path weights need it.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import scipy.sparse

from sparselayers.sparse_dense import SparseDense

__all__ = ["Call", "Graph", "kernel_layer", "kernel_matrix", "model_graph", "pull_back"]

# Weightless layers that keep the shape but are not a fixed per-unit map: each
# unit's output depends on other units (or on code we cannot read).
_NOT_PER_UNIT = (
    keras.layers.UnitNormalization,
    keras.layers.Lambda,
    keras.layers.Multiply,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Dot,
)


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of a layer: the keys of the tensors it reads and the one it writes."""

    layer: Any
    inputs: tuple[int, ...]
    output: int
    run: Callable[[dict[int, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Graph:
    """Layer calls in topological order, from ``inputs`` to ``output`` (tensor keys)."""

    inputs: tuple[int, ...]
    output: int
    calls: tuple[Call, ...]
    widths: dict[int, int | None]
    input_names: tuple[str | None, ...]

    def producer(self, key: int) -> Call | None:
        return next((call for call in self.calls if call.output == key), None)

    def consumers(self, key: int) -> list[Call]:
        return [call for call in self.calls if key in call.inputs]

    def downstream(self, key: int) -> set[int]:
        """Keys of the tensors that depend on ``key`` (itself included)."""
        found = {key}
        for call in self.calls:
            if any(k in found for k in call.inputs):
                found.add(call.output)
        return found


def kernel_layer(layer: Any) -> bool:
    """Whether ``layer`` is a SparseDense or Dense layer (a level of relevance)."""
    return isinstance(layer, (SparseDense, keras.layers.Dense))


def _inference(layer: Any) -> dict[str, Any]:
    return {"training": False} if "training" in inspect.signature(layer.call).parameters else {}


def _from_chain(layers: list[Any]) -> Graph:
    calls = tuple(
        Call(layer, (k,), k + 1, lambda values, layer=layer, k=k: layer(values[k], **_inference(layer)))
        for k, layer in enumerate(layers)
    )
    widths: dict[int, int | None] = {0: None}
    for k, layer in enumerate(layers):
        if kernel_layer(layer) and layer.built:
            shape = layer.pattern.shape if isinstance(layer, SparseDense) else tuple(layer.kernel.shape)
            widths[k], widths[k + 1] = shape
        elif widths[k] is None:
            widths[k + 1] = None  # before the first built kernel: nothing to pass back through
        else:
            widths[k + 1] = layer.compute_output_shape((None, widths[k]))[-1]
    return Graph((0,), len(layers), calls, widths, (None,))


def _from_functional(model: keras.Model) -> Graph:
    if len(model.outputs) != 1:
        raise ValueError(f"Relevance needs a model with one output. Received: a model with {len(model.outputs)} outputs")
    calls: list[Call] = []
    widths: dict[int, int | None] = {}
    seen: set[int] = set()

    def visit(tensor: Any) -> None:
        key = id(tensor)
        if key in seen:
            return
        seen.add(key)
        widths[key] = tensor.shape[-1] if len(tensor.shape) == 2 else None
        layer, node_index, _ = tensor._keras_history
        if isinstance(layer, keras.layers.InputLayer):
            return
        node = layer._inbound_nodes[node_index]
        if len(node.output_tensors) != 1:
            raise TypeError(
                f"Relevance follows layers with one output tensor. Received: layer '{layer.name}' of type "
                f"{type(layer).__name__} with {len(node.output_tensors)} outputs"
            )
        for source in node.input_tensors:
            visit(source)

        def run(values: dict[int, Any], node: Any = node, layer: Any = layer) -> Any:
            args, kwargs = node.arguments.fill_in(values)
            return layer(*args, **{**kwargs, **_inference(layer)})

        calls.append(Call(layer, tuple(id(t) for t in node.input_tensors), key, run))

    visit(model.outputs[0])
    for tensor in model.inputs:
        widths.setdefault(id(tensor), tensor.shape[-1] if len(tensor.shape) == 2 else None)
    names = tuple(t._keras_history[0].name for t in model.inputs)
    return Graph(tuple(id(t) for t in model.inputs), id(model.outputs[0]), tuple(calls), widths, names)


def model_graph(model: Any) -> Graph:
    """The layer calls of a functional or Sequential model, or of a list of layers (a chain).

    Args:
        model: a ``keras.Model`` (functional or ``Sequential``), or a list
            of layers applied one after the other.

    Returns:
        A :class:`Graph`.

    Raises:
        ValueError: no layers, or several outputs.
        TypeError: a layer call with several output tensors.
    """
    if isinstance(model, keras.Model):
        try:
            outputs = model.outputs
        except (AttributeError, ValueError):
            outputs = None  # a Sequential without an Input: its layers are a chain
        if outputs:
            return _from_functional(model)
        layers = list(model.layers)
    else:
        layers = list(model)
    layers = [layer for layer in layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        raise ValueError("`model` must hold at least one layer.")
    return _from_chain(layers)


def _refuse(layer: Any, why: str) -> TypeError:
    return TypeError(
        f"Path weights need linear maps between the level and the output ({why}). "
        f"Received: layer '{layer.name}' of type {type(layer).__name__}"
    )


def kernel_matrix(layer: Any) -> scipy.sparse.csr_array:
    """A SparseDense or Dense layer's kernel as a float64 scipy matrix (inputs x units)."""
    if isinstance(layer, SparseDense):
        return layer.to_scipy().astype(np.float64)
    return scipy.sparse.csr_array(keras.ops.convert_to_numpy(layer.kernel).astype(np.float64))


def _batch_norm_scale(layer: Any, width: int | None) -> np.ndarray:
    axis = layer.axis if isinstance(layer.axis, int) else None
    if axis not in (-1, 1):
        raise _refuse(layer, f"BatchNormalization must normalise the units axis (-1). Received: axis={layer.axis}")
    variance = keras.ops.convert_to_numpy(layer.moving_variance).astype(np.float64)
    gamma = keras.ops.convert_to_numpy(layer.gamma).astype(np.float64) if layer.scale else 1.0
    return gamma / np.sqrt(variance + layer.epsilon) * np.ones(width or variance.size)


def pull_back(call: Call, vector: np.ndarray, widths: dict[int, int | None]) -> list[tuple[int, np.ndarray]]:
    """``vector`` (weights of ``call``'s output units) carried back to each of its inputs.

    Kernels multiply, BatchNormalization scales each unit by
    ``gamma / sqrt(moving_variance + epsilon)`` (its shift adds a constant,
    not a path), ``Add``/``Subtract``/``Average`` hand the vector to every
    input (with sign or share), ``Concatenate`` hands each input its block,
    and weightless layers that keep the width (activations, dropout, noise)
    pass it on unchanged: activations are ignored, as in GenNet.

    Raises:
        TypeError: a layer that is not one of these, naming it.
    """
    layer = call.layer
    if kernel_layer(layer):
        return [(call.inputs[0], kernel_matrix(layer) @ vector)]
    if isinstance(layer, keras.layers.BatchNormalization):
        return [(call.inputs[0], _batch_norm_scale(layer, vector.size) * vector)]
    if isinstance(layer, keras.layers.Add):
        return [(key, vector) for key in call.inputs]
    if isinstance(layer, keras.layers.Average):
        return [(key, vector / len(call.inputs)) for key in call.inputs]
    if isinstance(layer, keras.layers.Subtract):
        return [(call.inputs[0], vector), (call.inputs[1], -vector)]
    if isinstance(layer, keras.layers.Concatenate):
        if layer.axis not in (-1, 1):
            raise _refuse(layer, f"Concatenate must join along the units axis (-1). Received: axis={layer.axis}")
        sizes = [widths[key] for key in call.inputs]
        return list(zip(call.inputs, np.split(vector, np.cumsum(sizes)[:-1])))
    if isinstance(layer, (keras.layers.LayerNormalization, keras.layers.GroupNormalization)):
        raise _refuse(layer, "its effect depends on each sample, not a fixed per-unit scale")
    if isinstance(layer, _NOT_PER_UNIT) or isinstance(layer, keras.Model):
        raise _refuse(layer, "it is not a fixed per-unit map")
    if layer.weights:
        raise _refuse(layer, "SparseDense, Dense, BatchNormalization and weightless layers are read")
    if len(call.inputs) != 1 or widths.get(call.inputs[0]) != vector.size:
        raise _refuse(layer, "a weightless layer must keep the number of units")
    return [(call.inputs[0], vector)]
