"""Knowledge-driven networks: layers from mapping tables, read back with names.

Biological knowledge often comes as mapping tables (SNP -> gene,
gene -> pathway, pathway -> phenotype). :func:`chain` turns a list of them
into ``SparseDense`` layers whose patterns carry the names, checking that
consecutive tables meet and reporting units left without connections;
:func:`read_topology` reads GenNet's ``topology.csv`` into such tables.
Trained layers are read back with names: :func:`layer_frame` (also
``SparseDense.to_frame()``) lists every weight, :func:`path_weights` and
:func:`gradient_x_input` rank the units of any level for an output, and
:func:`sparselayers.plotting.plot_manhattan` draws that ranking.

pandas is optional; the functions that return DataFrames need it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import scipy.sparse
import tensorflow as tf

from sparselayers import seams
from sparselayers._validation import _short, check_int, optional_module
from sparselayers.gennet import read_topology
from sparselayers.model_graph import Graph, kernel_layer, kernel_matrix, model_graph, pull_back
from sparselayers.sparse_dense import SparseDense
from sparselayers.sparsity_pattern import SparsityPattern, _quote

__all__ = [
    "ChainReport",
    "chain",
    "check_chain",
    "gradient_x_input",
    "layer_frame",
    "path_weights",
    "read_topology",
]


def _pandas() -> Any:
    return optional_module("pandas", "This function returns a pandas DataFrame", "pandas")


# Building a chain -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChainReport:
    """What :func:`check_chain` found: the aligned patterns and the dead units.

    Attributes:
        patterns: one named pattern per table; ``patterns[k]`` maps level
            ``k`` to level ``k + 1``.
        levels: the unit names of every level, inputs first.
        level_names: a label per level, for messages.
        no_input: per level, names of units that receive no connection
            (level 0: always empty; their layer adds only its bias).
        no_output: per level, names of units that feed nothing (the last
            level: always empty; e.g. SNPs in ``inputs`` absent from the first
            table, or genes in no pathway).
    """

    patterns: tuple[SparsityPattern, ...]
    levels: tuple[tuple[str, ...], ...]
    level_names: tuple[str, ...]
    no_input: tuple[tuple[str, ...], ...]
    no_output: tuple[tuple[str, ...], ...]

    @property
    def has_dead_units(self) -> bool:
        """Whether any unit lacks an input or an output connection."""
        return any(self.no_input) or any(self.no_output)

    def __str__(self) -> str:
        lines = []
        for k, (label, units) in enumerate(zip(self.level_names, self.levels)):
            line = f"level {k} ({label}): {len(units)} units"
            if self.no_input[k]:
                line += f"; {len(self.no_input[k])} without input (bias only): {_quote(self.no_input[k])}"
            if self.no_output[k]:
                line += f"; {len(self.no_output[k])} without output (unused): {_quote(self.no_output[k])}"
            lines.append(line)
        return "\n".join(lines)


def _edges(table: Any, k: int) -> tuple[list[Any], list[Any], tuple[str, ...] | None, tuple[str, ...] | None]:
    """A table as (sources, targets, declared input order, declared output order)."""
    if isinstance(table, SparsityPattern):
        if table.input_names is None or table.output_names is None:
            raise ValueError(
                f"`tables[{k}]` must be a named pattern (see SparsityPattern.from_edges). "
                f"Received: {table!r}"
            )
        inputs = np.asarray(table.input_names, dtype=object)
        outputs = np.asarray(table.output_names, dtype=object)
        return inputs[table.rows].tolist(), outputs[table.cols].tolist(), table.input_names, table.output_names
    columns = getattr(table, "columns", None)
    if columns is not None:
        if len(columns) < 2:
            raise ValueError(f"`tables[{k}]` must have two columns (source, target). Received: columns {list(columns)}")
        return table[columns[0]].tolist(), table[columns[1]].tolist(), None, None
    if isinstance(table, (tuple, list)) and len(table) == 2:
        return list(table[0]), list(table[1]), None, None
    raise TypeError(
        f"`tables[{k}]` must be a named SparsityPattern, a DataFrame (source, target columns) "
        f"or a (sources, targets) pair. Received: {_short(table)}"
    )


def _first_appearance(names: list[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(names))


def check_chain(
    tables: Sequence[Any],
    *,
    inputs: Sequence[str] | None = None,
    level_names: Sequence[str] | None = None,
    strict: bool = True,
) -> ChainReport:
    """Aligns a list of mapping tables into named patterns and finds dead units.

    Level 0 are the inputs (``inputs``, the order of your data's columns,
    or else the first table's sources in order of first appearance); level
    ``k + 1`` are the targets of table ``k`` (its declared output names for a
    named pattern, else in order of first appearance). Table ``k + 1`` must
    start where table ``k`` ends: its sources are matched by name to level
    ``k + 1``, whatever their order.

    Args:
        tables: mapping tables, each a named :class:`SparsityPattern`, a
            DataFrame whose first two columns are (source, target), or a
            ``(sources, targets)`` pair of name lists.
        inputs: ordered input names; inputs absent from the first table are
            kept and reported (they feed nothing).
        level_names: a label per level (inputs first) for messages.
        strict: if True, units of a level that one table has and the next
            lacks raise ``ValueError``. If False, the level keeps the union
            and the units are reported: a unit only the next table knows
            gets no input (its layer adds only its bias), a unit only the
            previous table knows feeds nothing.

    Returns:
        A :class:`ChainReport`.

    Raises:
        ValueError: an empty list; first-table sources not in ``inputs``;
            (``strict``) tables that do not meet, with the first unmatched
            names on each side and their counts.
        TypeError: a table of another kind.

    Example:

    >>> import sparselayers as sl
    >>> snp_gene = (["rs1", "rs2", "rs3"], ["A", "A", "B"])
    >>> gene_pathway = (["A", "B", "C"], ["P1", "P1", "P2"])
    >>> report = sl.knowledge.check_chain([snp_gene, gene_pathway], strict=False,
    ...                                   level_names=["SNPs", "genes", "pathways"])
    >>> print(report)
    level 0 (SNPs): 3 units
    level 1 (genes): 3 units; 1 without input (bias only): 'C'
    level 2 (pathways): 2 units
    """
    if isinstance(tables, (str, bytes)) or not isinstance(tables, Sequence) or not len(tables):
        raise ValueError(f"`tables` must be a non-empty list of mapping tables. Received: tables={_short(tables)}")
    labels = list(level_names) if level_names is not None else [f"level {k}" for k in range(len(tables) + 1)]
    if len(labels) != len(tables) + 1:
        raise ValueError(
            f"`level_names` must name every level, inputs first: {len(tables) + 1} names. "
            f"Received: {len(labels)} names"
        )
    edges = [_edges(table, k) for k, table in enumerate(tables)]
    first_sources, _, declared_inputs, _ = edges[0]
    levels: list[tuple[Any, ...]] = [
        tuple(inputs) if inputs is not None else declared_inputs or _first_appearance(first_sources)
    ]  # tuples, so that a named pattern's names compare equal
    for k, (sources, _, declared_sources, _) in enumerate(edges):
        if k:
            here = levels[k]
            offered = declared_sources or _first_appearance(sources)
            known, offered_set = set(here), set(offered)
            only_next = [n for n in offered if n not in known]
            only_previous = [n for n in here if n not in offered_set]
            if (only_next or only_previous) and strict:
                raise ValueError(
                    f"`tables[{k - 1}]` ends at {labels[k]} that `tables[{k}]` does not start from: "
                    f"{len(only_previous)} of its {len(here)} outputs are not sources of the next table "
                    f"({_quote(only_previous)}), and {len(only_next)} sources of the next table are not "
                    f"its outputs ({_quote(only_next)}). Pass strict=False to keep both as dead units."
                )
            levels[k] = here + tuple(only_next)  # they get no input: reported below
        _, targets, _, declared_targets = edges[k]
        levels.append(declared_targets or _first_appearance(targets))
    built = []
    for k, (sources, targets, _, _) in enumerate(edges):
        table = tables[k]
        if isinstance(table, SparsityPattern) and (table.input_names, table.output_names) == tuple(levels[k : k + 2]):
            built.append(table)  # already aligned: skip rebuilding it from its edges
            continue
        try:
            built.append(SparsityPattern.from_edges(sources, targets, levels[k], levels[k + 1]))
        except (TypeError, ValueError) as error:
            raise type(error)(f"`tables[{k}]` ({labels[k]} -> {labels[k + 1]}): {error}") from None
    no_input = [()] + [_dead(p.fan_in, p.output_names) for p in built]
    no_output = [_dead(p.fan_out, p.input_names) for p in built] + [()]
    return ChainReport(tuple(built), tuple(levels), tuple(labels), tuple(no_input), tuple(no_output))


def _dead(counts: np.ndarray, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(names[k] for k in np.flatnonzero(counts == 0))


def chain(
    tables: Sequence[Any],
    *,
    inputs: Sequence[str] | None = None,
    activation: Any = "tanh",
    names: Sequence[str] | None = None,
    strict: bool = True,
    **layer_kwargs: Any,
) -> list[SparseDense]:
    """``SparseDense`` layers, one per mapping table, with named patterns.

    Consecutive tables are matched by name (see :func:`check_chain`); units
    left without an input or an output connection are kept and reported
    in one ``UserWarning``, never dropped.

    Args:
        tables: mapping tables (SNP -> gene, gene -> pathway, ...), each a
            named :class:`SparsityPattern`, a DataFrame whose first two
            columns are (source, target), or a ``(sources, targets)`` pair.
        inputs: ordered input names (your data's columns); by default the
            first table's sources in order of first appearance.
        activation: one Keras activation for every layer, or a list with one
            per layer.
        names: Keras layer names, one per table (also used in messages).
        strict: see :func:`check_chain`.
        **layer_kwargs: further ``SparseDense`` arguments (``use_bias``,
            ``values_regularizer``, ``kernel``...).

    Returns:
        The layers, in order; ``layers[k].pattern`` names its inputs and
        outputs.

    Raises:
        ValueError: as :func:`check_chain`, or lists of the wrong length.

    Example:

    >>> import keras, sparselayers as sl
    >>> layers = sl.knowledge.chain(
    ...     [(["rs1", "rs2", "rs3"], ["A", "A", "B"]), (["A", "B"], ["P", "P"])], names=["genes", "pathways"])
    >>> model = keras.Sequential([keras.Input((3,)), *layers, keras.layers.Dense(1)])
    >>> [layer.pattern.shape for layer in layers], layers[1].pattern.input_names
    ([(3, 2), (2, 1)], ('A', 'B'))
    """
    count = len(tables) if isinstance(tables, Sequence) else 0
    activations = list(activation) if isinstance(activation, (list, tuple)) else [activation] * count
    layer_names = list(names) if names is not None else [None] * count
    for arg, given in (("activation", activations), ("names", layer_names)):
        if len(given) != count:
            raise ValueError(f"`{arg}` must give one entry per table ({count}). Received: {len(given)} entries")
    labels = ["inputs"] + [name or f"layer {k + 1}" for k, name in enumerate(layer_names)] if count else None
    report = check_chain(tables, inputs=inputs, level_names=labels, strict=strict)
    if report.has_dead_units:
        warnings.warn(f"Units without connections (kept, not dropped):\n{report}", UserWarning, stacklevel=2)
    return [
        SparseDense(pattern, activation=act, name=name, **layer_kwargs)
        for pattern, act, name in zip(report.patterns, activations, layer_names)
    ]


# Reading the network back -----------------------------------------------------


def _labels(names: tuple[str, ...] | None, size: int) -> np.ndarray:
    return np.asarray(names, dtype=object) if names is not None else np.arange(size)


def layer_frame(layer: SparseDense) -> Any:
    """Every entry of a ``SparseDense`` layer as a DataFrame ``input, output, weight``.

    Rows follow ``layer.pattern.indices``; ``input`` and ``output`` hold
    names when the pattern has them, integer positions otherwise.

    >>> import sparselayers as sl
    >>> layer = sl.SparseDense(sl.SparsityPattern.from_edges(["rs1", "rs2"], ["A", "A"]))
    >>> layer.build((None, 2)); _ = layer.values.assign([0.5, -1.0])
    >>> print(layer.to_frame())
      input output  weight
    0   rs1      A     0.5
    1   rs2      A    -1.0
    """
    pd = _pandas()
    pattern = layer.pattern
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' has no weights yet: build it (or call it once) first. Received: an unbuilt layer"
        )
    return pd.DataFrame(
        {
            "input": _labels(pattern.input_names, pattern.shape[0])[pattern.rows],
            "output": _labels(pattern.output_names, pattern.shape[1])[pattern.cols],
            "weight": keras.ops.convert_to_numpy(layer.values),
        }
    )


seams.register_frame(layer_frame)


def _levels(graph: Graph) -> list[int]:
    """Tensor keys of the levels: the first input, then each kernel layer's output."""
    kernels = [call for call in graph.calls if kernel_layer(call.layer)]
    if not kernels:
        raise ValueError("`model` has no SparseDense or Dense layer.")
    return [graph.inputs[0]] + [call.output for call in kernels[:-1]]


def _level_key(level: Any, graph: Graph, levels: list[int]) -> int:
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
            ``SparseDense``/``Dense`` layer (e.g. genes), or the name of an
            input or of a layer (its outputs).
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
    key = _level_key(level, graph, _levels(graph))
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
            ``SparseDense``/``Dense`` layer, or the name of an input or layer.
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
    key = _level_key(level, graph, _levels(graph))
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
