"""Building a chain: mapping tables -> ``SparseDense`` layers with named patterns."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparselayers._validation import _short
from sparselayers.sparse_dense import SparseDense
from sparselayers.sparsity_pattern import SparsityPattern, _quote


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
