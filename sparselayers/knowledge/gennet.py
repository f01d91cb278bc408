"""GenNet's ``topology.csv`` (one row per path through the network) as mapping tables.

Reached as :func:`sparselayers.knowledge.read_topology`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sparselayers._validation import _short, optional_module
from sparselayers.sparsity_pattern import SparsityPattern, _quote


def _levels(columns: list[str]) -> int:
    """How many levels the columns describe (``layer0`` ... ``layer{n-1}``)."""
    present = set(columns)
    count = 0
    while f"layer{count}_node" in present or f"layer{count}_name" in present:
        for part in ("node", "name"):
            if f"layer{count}_{part}" not in present:
                raise ValueError(
                    f"`path_or_frame` must have both layer{count}_node and layer{count}_name columns. "
                    f"Received: columns {columns}"
                )
        count += 1
    if count < 2:
        raise ValueError(
            "`path_or_frame` must be a GenNet topology with columns layer0_node, layer0_name, layer1_node, "
            f"layer1_name, ... (at least two levels). Received: columns {columns}"
        )
    return count


def _units(nodes: np.ndarray, names: np.ndarray, level: int) -> tuple[str, ...]:
    """The names of one level in node order; a node has one name and a name one node."""
    pairs = sorted(set(zip(nodes.tolist(), names.tolist())))
    for position, what, other in ((0, "node", "names"), (1, "name", "nodes")):
        seen: dict[Any, Any] = {}
        for pair in pairs:
            first = seen.setdefault(pair[position], pair[1 - position])
            if first != pair[1 - position]:
                raise ValueError(
                    f"In level {level}, each {what} must have one {other[:-1]}: layer{level}_{what} "
                    f"{pair[position]!r} has two {other}. Received: {first!r} and {pair[1 - position]!r}"
                )
    return tuple(name for _, name in pairs)


def read_topology(path_or_frame: str | os.PathLike[str] | Any) -> list[SparsityPattern]:
    """Reads GenNet's ``topology.csv`` into one mapping table per pair of levels.

    GenNet describes a network as one row per path from an input to the
    output: ``layer0_node, layer0_name, layer1_node, layer1_name, ...``
    (other columns, such as ``chr``, are ignored). ``layer{k}_node`` is the
    unit's position in level ``k``; for level 0 it is the genotype matrix's
    column. Names are stripped of surrounding whitespace (GenNet pads them).
    Each level's units come in node order, so
    ``sl.knowledge.chain(sl.knowledge.read_topology(path))`` reads the
    data's columns as they are.

    Args:
        path_or_frame: a path to the CSV file, or a pandas DataFrame of it.

    Returns:
        Named patterns, ``tables[k]`` mapping level ``k`` to level ``k + 1``,
        ready for :func:`sparselayers.knowledge.chain`.

    Raises:
        ValueError: no ``layer{k}_node``/``layer{k}_name`` column pair for
            two levels or a pair missing one column; a node with two names
            or a name with two nodes; level-0 nodes that are not the
            columns ``0 ... n-1``; an empty table.
        TypeError: something neither a path nor a DataFrame.

    Example:

    >>> import io, pandas as pd, sparselayers as sl
    >>> text = ("layer0_node,layer0_name,layer1_node,layer1_name\\n"
    ...         "1,rs2   ,0,GENE_A\\n0,rs1   ,0,GENE_A\\n2,rs3   ,1,GENE_B\\n")
    >>> tables = sl.knowledge.read_topology(pd.read_csv(io.StringIO(text)))
    >>> tables[0].input_names, tables[0].output_names
    (('rs1', 'rs2', 'rs3'), ('GENE_A', 'GENE_B'))
    """
    pd = optional_module("pandas", "read_topology reads CSV files with pandas", "pandas")
    if isinstance(path_or_frame, (str, os.PathLike)):
        frame = pd.read_csv(path_or_frame)
    elif isinstance(path_or_frame, pd.DataFrame):
        frame = path_or_frame
    else:
        raise TypeError(
            f"`path_or_frame` must be a path to topology.csv or a pandas DataFrame. Received: {_short(path_or_frame)}"
        )
    count = _levels([str(c) for c in frame.columns])
    if not len(frame):
        raise ValueError("`path_or_frame` must hold at least one path (row). Received: an empty table")
    names = [frame[f"layer{k}_name"].astype(str).str.strip().to_numpy() for k in range(count)]
    nodes = [frame[f"layer{k}_node"].to_numpy() for k in range(count)]
    levels = [_units(nodes[k], names[k], k) for k in range(count)]
    columns = sorted(set(nodes[0].tolist()))
    if columns != list(range(len(columns))):
        missing = sorted(set(range(int(max(columns)) + 1)) - set(columns))
        raise ValueError(
            "`path_or_frame`'s layer0_node must number the genotype columns 0 ... n-1 (each column one input). "
            f"Received: {len(missing)} missing columns ({_quote(missing)})"
        )
    tables = []
    for k in range(count - 1):
        edges = list(dict.fromkeys(zip(names[k].tolist(), names[k + 1].tolist())))
        sources, targets = zip(*edges)
        tables.append(SparsityPattern.from_edges(list(sources), list(targets), levels[k], levels[k + 1]))
    return tables
