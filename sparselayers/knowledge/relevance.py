"""Relevance of the units of a level for an output: path weights and gradient x input."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sparselayers._validation import _short, check_int
from sparselayers.knowledge.frames import _labels, _pandas
from sparselayers.knowledge.graph import Graph, kernel_layer, kernel_matrix, model_graph, pull_back
from sparselayers.sparse_dense import SparseDense


def _levels(graph: Graph) -> tuple[list[int], str | None]:
    """Tensor keys of the numbered levels (the first input, then each kernel layer's output).

    Also the name of a kernel layer off the chain, if the kernels do not form one
    chain: numbers then name no single level beyond the inputs.
    """
    kernels = [call for call in graph.calls if kernel_layer(call.layer)]
    if not kernels:
        raise ValueError("`model` has no SparseDense or Dense layer.")
    off_chain = next(
        (after.layer.name for before, after in zip(kernels, kernels[1:]) if after.output not in graph.downstream(before.output)),
        None,
    )
    return [graph.inputs[0]] + [call.output for call in kernels[:-1]], off_chain


def _level_key(level: Any, graph: Graph) -> int:
    levels, off_chain = _levels(graph)
    if isinstance(level, str):
        if level in graph.input_names:
            return graph.inputs[graph.input_names.index(level)]
        calls = [call for call in graph.calls if call.layer.name == level]
        if len(calls) == 1:
            return calls[0].output
        raise ValueError(f"`level` must name a layer or an input of the model. Received: level={level!r}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < len(levels):
        raise ValueError(
            f"`level` must be an integer in [0, {len(levels)}): 0 for the inputs, k for the outputs of "
            f"the k-th SparseDense/Dense layer, or a layer's name. Received: level={_short(level)}"
        )
    if level and off_chain is not None:
        raise ValueError(
            f"`level` must be 0 or the name of a layer or an input on a model whose SparseDense/Dense layers "
            f"are not one chain (layer '{off_chain}' is on another branch). Received: level={level}"
        )
    return levels[int(level)]


def _unit_names(graph: Graph, key: int) -> tuple[str, ...] | None:
    """The names of a tensor's units: from the SparseDense that writes or reads it, through per-unit layers."""
    producer = graph.producer(key)
    while producer is not None and not kernel_layer(producer.layer) and len(producer.inputs) == 1:
        if graph.widths.get(producer.inputs[0]) != graph.widths.get(key):
            break
        producer = graph.producer(producer.inputs[0])
    if producer is not None and isinstance(producer.layer, SparseDense):
        return producer.layer.pattern.output_names
    readers = graph.consumers(key)
    while len(readers) == 1 and not kernel_layer(readers[0].layer) and len(readers[0].inputs) == 1:
        if graph.widths.get(readers[0].output) != graph.widths.get(key):
            break
        readers = graph.consumers(readers[0].output)  # through Dropout, noise, BatchNormalization
    named = [call.layer for call in readers if isinstance(call.layer, SparseDense)]
    return named[0].pattern.input_names if named else None


def _output_index(output: Any, graph: Graph) -> int:
    names = _unit_names(graph, graph.output)
    units = graph.widths.get(graph.output)
    if isinstance(output, str):
        if names is None or output not in names:
            raise ValueError(f"`output` must be one of the model's output names. Received: output={output!r}")
        return names.index(output)
    if isinstance(output, bool) or not isinstance(output, (int, np.integer)) or not 0 <= output < (units or 0):
        raise ValueError(f"`output` must be an output name or a position in [0, {units}). Received: output={output!r}")
    return int(output)


def _ranking(relevance: np.ndarray, names: tuple[str, ...] | None) -> Any:
    pd = _pandas()
    order = np.lexsort((np.arange(relevance.size), -np.abs(relevance)))
    return pd.DataFrame(
        {
            "unit": _labels(names, relevance.size)[order],
            "position": order,
            "relevance": relevance[order],
        }
    ).reset_index(drop=True)


def path_weights(model: Any, *, level: int | str = 0, output: int | str = 0) -> Any:
    """Relevance of each unit of a level for an output, by path weights.

    The relevance of unit ``i`` is the sum, over every path from ``i`` to
    ``output``, of the product of the weights along the path, as GenNet
    reports it: for a chain, row ``i`` of ``W[level] @ ... @ W[last]``,
    column ``output``. It is computed sparsely with scipy, one
    matrix-vector product per layer from the output back, following the
    model's wiring: branches joined by ``Add``/``Subtract``/``Average`` are
    summed (with their sign or share), ``Concatenate`` gives each branch its
    block of units. BatchNormalization is folded in at inference: each unit
    scaled by ``gamma / sqrt(moving_variance + epsilon)``. Activations,
    biases and shifts are ignored.

    Args:
        model: a ``keras.Sequential``, a functional model (one output; it
            may branch and have several inputs), or a list of layers applied
            one after the other.
        level: 0 for the first input, ``k`` for the outputs of the ``k``-th
            ``SparseDense``/``Dense`` layer (e.g. genes) when these form one
            chain, or the name of an input or of a layer (its outputs).
        output: position or name of the output unit.

    Returns:
        A DataFrame ``unit, position, relevance`` sorted by decreasing
        ``|relevance|``; ``unit`` is the name, or the position when unnamed.

    Raises:
        ValueError: bad ``level`` or ``output``, or a model with several
            outputs.
        TypeError: a layer between the level and the output that is not a
            linear map read here (LayerNormalization, Multiply, a layer with
            weights other than SparseDense, Dense, BatchNormalization),
            naming it.

    Example:

    >>> import keras, sparselayers as sl
    >>> layers = sl.knowledge.chain([(["rs1", "rs2", "rs3"], ["A", "A", "B"])], activation=None)
    >>> model = keras.Sequential([keras.Input((3,)), *layers, keras.layers.Dense(1, use_bias=False)])
    >>> _ = layers[0].values.assign([1.0, -2.0, 0.5]); _ = model.layers[-1].kernel.assign([[3.0], [4.0]])
    >>> print(sl.knowledge.path_weights(model))
      unit  position  relevance
    0  rs2         1       -6.0
    1  rs1         0        3.0
    2  rs3         2        2.0
    """
    graph = model_graph(model)
    key = _level_key(level, graph)
    index = _output_index(output, graph)
    downstream = graph.downstream(key)
    adjoint = {graph.output: np.eye(graph.widths[graph.output])[index]}
    for call in reversed(graph.calls):
        if call.output not in adjoint or call.output not in downstream:
            continue
        for source, vector in pull_back(call, adjoint[call.output], graph.widths):
            if source in downstream:
                adjoint[source] = adjoint[source] + vector if source in adjoint else vector
    if key not in adjoint:
        raise ValueError(f"`level` does not lead to the model's output. Received: level={_short(level)}")
    return _ranking(adjoint[key], _unit_names(graph, key))


def _batches(data: Any, batch_size: int, inputs: int) -> Any:
    """Batches of ``data`` as a list with one array per model input."""
    if isinstance(data, tf.data.Dataset):
        for element in data:
            nested = isinstance(element, (tuple, list)) and (inputs == 1 or isinstance(element[0], (tuple, list)))
            x = element[0] if nested else element  # (x, y, ...) or x; x a tuple for several inputs
            yield list(x) if inputs > 1 else [x]
        return
    arrays = list(data) if inputs > 1 and isinstance(data, (tuple, list)) else [data]
    if len(arrays) != inputs or any(not hasattr(a, "shape") or len(a.shape) != 2 for a in arrays):
        raise ValueError(
            f"`data` must be a 2-D array (samples, inputs) per model input ({inputs}) or a tf.data.Dataset of "
            f"batches. Received: {_short(data)}"
        )
    for start in range(0, arrays[0].shape[0], batch_size):
        yield [np.asarray(a[start : start + batch_size]) for a in arrays]  # one batch in memory (memmaps)


def _check_data(data: Any, graph: Graph, batch_size: Any) -> None:
    """Checks array ``data`` and ``batch_size`` before any batch runs."""
    check_int(batch_size, "batch_size", minimum=1)
    arrays = list(data) if len(graph.inputs) > 1 and isinstance(data, (tuple, list)) else [data]
    for key, array in zip(graph.inputs, arrays):
        if isinstance(array, tf.data.Dataset) or not hasattr(array, "shape") or len(array.shape) != 2:
            return  # _batches names a bad container; datasets are checked per batch by the layers
        width = graph.widths.get(key)
        if width is not None and array.shape[1] != width:
            raise ValueError(
                f"`data` must have the model's {width} inputs per sample. Received: data with shape {tuple(array.shape)}"
            )


def _sole_kernel_reader(graph: Graph, key: int) -> Any:
    """The kernel call that is the only reader of tensor ``key``, or None."""
    readers = graph.consumers(key)
    if len(readers) == 1 and kernel_layer(readers[0].layer) and readers[0].layer.built:
        return readers[0]
    return None


def _as_float(value: Any) -> tf.Tensor:
    tensor = tf.convert_to_tensor(value)
    return tf.cast(tensor, "float32") if not tensor.dtype.is_floating else tensor  # per batch: data keeps its dtype


def gradient_x_input(
    model: Any,
    data: Any,
    *,
    level: int | str = 0,
    output: int | str = 0,
    batch_size: int = 256,
    absolute: bool = True,
) -> Any:
    """Relevance of each unit of a level for an output, by gradient x input.

    For every sample, the value ``h_i`` of unit ``i`` at ``level`` times the
    derivative of ``output`` with respect to it, ``h_i * d output / d h_i``,
    averaged over ``data`` (its absolute value with ``absolute``, so that
    effects of opposite signs in different samples do not cancel). The
    model runs in inference mode (BatchNormalization uses its moving
    statistics) and its wiring is followed: branches joined by ``Add`` or
    ``Concatenate`` all count.

    Args:
        model: a ``keras.Sequential``, a functional model (one output; it
            may branch and have several inputs), or a list of layers applied
            one after the other.
        data: inputs, a 2-D array (a NumPy memmap is read batch by batch, so
            int8 genotypes never become one float copy), a list of such
            arrays for a model with several inputs, or a ``tf.data.Dataset``
            of batches (``x`` or ``(x, y, ...)``; ``x`` a tuple for several
            inputs).
        level: 0 for the first input, ``k`` for the outputs of the ``k``-th
            ``SparseDense``/``Dense`` layer when these form one chain, or the
            name of an input or layer.
        output: position or name of the output unit.
        batch_size: rows per batch for array ``data``.
        absolute: average ``|h * grad|`` (default) or the signed product.

    Returns:
        A DataFrame ``unit, position, relevance`` sorted by decreasing
        ``|relevance|``.

    Raises:
        ValueError: bad ``level``, ``output`` or ``data``, or no samples.
    """
    graph = model_graph(model)
    _check_data(data, graph, batch_size)
    key = _level_key(level, graph)
    index = _output_index(output, graph)
    # When one kernel layer reads the level, d y / d h = (d y / d z) @ W.T for its
    # pre-activation z = h @ W + b: TensorFlow differentiates only from z on and the
    # product with the sparse kernel runs in scipy, in float64. Differentiating
    # through the kernel instead costs seconds per batch at a million inputs.
    after = _sole_kernel_reader(graph, key)
    if after is not None:
        layer = after.layer
        kernel = kernel_matrix(layer)
        kernel_t = kernel.T.tocsr()
        bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64) if layer.bias is not None else 0.0
    total, count = None, 0
    for batch in _batches(data, batch_size, len(graph.inputs)):
        values = {k: _as_float(x) for k, x in zip(graph.inputs, batch)}
        with tf.GradientTape() as tape:
            if after is None and key in values:
                tape.watch(values[key])
            for call in graph.calls:
                if call is after:
                    # (units, batch) layout, C-contiguous, keeps scipy's products streaming.
                    h_t = np.asarray(values[key]).T.astype(np.float64, order="C")
                    watched = tf.constant((kernel_t @ h_t).T + bias, dtype=layer.compute_dtype)
                    tape.watch(watched)
                    values[call.output] = layer.activation(watched) if layer.activation is not None else watched
                    continue
                values[call.output] = call.run(values)
                if call.output == key and after is None:
                    tape.watch(values[key])  # before its readers run
            target = tf.reduce_sum(values[graph.output][:, index])
        if after is not None:
            d_z = tape.gradient(target, watched).numpy().astype(np.float64)
            product = h_t * (kernel @ np.ascontiguousarray(d_z.T))
        else:
            gradient = tape.gradient(target, values[key])
            h = np.asarray(values[key]).astype(np.float64)
            grad = np.zeros_like(h) if gradient is None else gradient.numpy().astype(np.float64)
            product = (h * grad).T
        summed = (np.abs(product) if absolute else product).sum(axis=1)
        total = summed if total is None else total + summed
        count += product.shape[1]
    if not count:
        raise ValueError("`data` holds no samples.")
    return _ranking(total / count, _unit_names(graph, key))
