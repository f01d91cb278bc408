"""GenNet's ``topology.csv`` (one row per path through the network) as mapping tables.

Reached as :func:`sparselayers.knowledge.read_topology`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from sparselayers._validation import _short, optional_module
from sparselayers.sparsity_pattern import SparsityPattern, _quote

_AS_TEXT = "pd.read_csv(path, dtype=str, keep_default_na=False)"


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


def _names(values: list[Any], column: str, where: Callable[[int], str]) -> list[str]:
    """One level's names, stripped; a name must be text and not empty."""
    pd = optional_module("pandas", "read_topology reads CSV files with pandas", "pandas")
    names = []
    for row, value in enumerate(values):
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(
                    f"`path_or_frame` {where(row)}: {column} is empty; every unit needs a name. Received: {value!r}"
                )
            names.append(value.strip())
        elif pd.isna(value):
            raise ValueError(
                f"`path_or_frame` {where(row)}: {column} is missing. pandas reads an empty name, and names such "
                f"as NA or nan, as missing: pass the path, or read the file with {_AS_TEXT}. Received: {value!r}"
            )
        else:
            raise ValueError(
                f"`path_or_frame`'s {column} must hold names as text; pandas parsed {where(row)} into "
                f"{value!r} ({type(value).__name__}), which loses names (1.10 becomes 1.1, 0672 becomes 672). "
                f"Pass the path, or read the file with {_AS_TEXT}"
            )
    return names


def _nodes(values: list[Any], column: str, where: Callable[[int], str]) -> list[int]:
    """One level's node numbers: whole numbers >= 0, as text (from the file) or numbers (from a frame)."""
    nodes = []
    for row, value in enumerate(values):
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
            nodes.append(int(value))
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
            nodes.append(int(value))
        elif isinstance(value, (float, np.floating)) and float(value).is_integer() and value >= 0:
            nodes.append(int(value))  # a frame's integer column holding a missing value elsewhere is float
        else:
            raise ValueError(
                f"`path_or_frame` {where(row)}: {column} must be a whole number >= 0. Received: {value!r}"
            )
    return nodes


def _units(nodes: list[int], names: list[str], level: int, where: Callable[[int], str]) -> tuple[str, ...]:
    """The names of one level in node order; a node has one name and a name one node."""
    name_of: dict[int, tuple[str, int]] = {}
    node_of: dict[str, tuple[int, int]] = {}
    for row, (node, name) in enumerate(zip(nodes, names)):
        checks = ((node, name, name_of, "node", "name"), (name, node, node_of, "name", "node"))
        for key, value, seen, what, other in checks:
            first, first_row = seen.setdefault(key, (value, row))
            if first != value:
                raise ValueError(
                    f"In level {level}, each {what} must have one {other}; `path_or_frame` {where(row)}: "
                    f"layer{level}_{what} {key!r} has two {other}s. "
                    f"Received: {first!r} ({where(first_row)}) and {value!r}"
                )
    return tuple(name_of[node][0] for node in sorted(name_of))


def read_topology(path_or_frame: str | os.PathLike[str] | Any) -> list[SparsityPattern]:
    """Reads GenNet's ``topology.csv`` into one mapping table per pair of levels.

    GenNet describes a network as one row per path from an input to the
    output: ``layer0_node, layer0_name, layer1_node, layer1_name, ...``
    (other columns, such as ``chr``, are ignored). ``layer{k}_node`` is the
    unit's position in level ``k``; for level 0 it is the genotype matrix's
    column. Names are text, stripped of surrounding whitespace (GenNet pads
    them) and nothing else: ``1.1`` and ``1.10``, ``0672`` and ``672`` are
    four names, and ``NA`` is a name. Each level's units come in node order, so
    ``sl.knowledge.chain(sl.knowledge.read_topology(path))`` reads the
    data's columns as they are.

    Args:
        path_or_frame: a path to the CSV file, or a pandas DataFrame of it
            with the names as text (``pd.read_csv(path, dtype=str,
            keep_default_na=False)``).

    Returns:
        Named patterns, ``tables[k]`` mapping level ``k`` to level ``k + 1``,
        ready for :func:`sparselayers.knowledge.chain`.

    Raises:
        ValueError: no ``layer{k}_node``/``layer{k}_name`` column pair for
            two levels or a pair missing one column; an empty or missing
            name, or one a DataFrame holds as a number; a node that is not a
            whole number >= 0; a node with two names or a name with two
            nodes; level-0 nodes that are not the columns ``0 ... n-1``; an
            empty table. The message names the file's line (the header is
            line 1) or the DataFrame's row.
        TypeError: something neither a path nor a DataFrame.

    Example:

    >>> import io, pandas as pd, sparselayers as sl
    >>> text = ("layer0_node,layer0_name,layer1_node,layer1_name\\n"
    ...         "1,rs2   ,0,GENE_A\\n0,rs1   ,0,GENE_A\\n2,rs3   ,1,GENE_B\\n")
    >>> frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    >>> tables = sl.knowledge.read_topology(frame)
    >>> tables[0].input_names, tables[0].output_names
    (('rs1', 'rs2', 'rs3'), ('GENE_A', 'GENE_B'))
    """
    pd = optional_module("pandas", "read_topology reads CSV files with pandas", "pandas")
    if isinstance(path_or_frame, (str, os.PathLike)):
        # As text: a parser would read 1.10 as 1.1, 0672 as 672, and NA or an empty name as missing.
        frame = pd.read_csv(path_or_frame, dtype=str, keep_default_na=False)

        def where(row: int) -> str:
            return f"line {row + 2}"  # after the header, line 1

    elif isinstance(path_or_frame, pd.DataFrame):
        frame = path_or_frame

        def where(row: int) -> str:
            return f"row {frame.index[row]}"

    else:
        raise TypeError(
            f"`path_or_frame` must be a path to topology.csv or a pandas DataFrame. Received: {_short(path_or_frame)}"
        )
    count = _levels([str(c) for c in frame.columns])
    if not len(frame):
        raise ValueError("`path_or_frame` must hold at least one path (row). Received: an empty table")
    names = [_names(frame[f"layer{k}_name"].tolist(), f"layer{k}_name", where) for k in range(count)]
    nodes = [_nodes(frame[f"layer{k}_node"].tolist(), f"layer{k}_node", where) for k in range(count)]
    levels = [_units(nodes[k], names[k], k, where) for k in range(count)]
    columns = sorted(set(nodes[0]))
    if columns != list(range(len(columns))):
        missing = sorted(set(range(max(columns) + 1)) - set(columns))
        raise ValueError(
            "`path_or_frame`'s layer0_node must number the genotype columns 0 ... n-1 (each column one input). "
            f"Received: {len(missing)} missing columns ({_quote(missing)})"
        )
    tables = []
    for k in range(count - 1):
        edges = list(dict.fromkeys(zip(names[k], names[k + 1])))
        sources, targets = zip(*edges)
        tables.append(SparsityPattern.from_edges(list(sources), list(targets), levels[k], levels[k + 1]))
    return tables
