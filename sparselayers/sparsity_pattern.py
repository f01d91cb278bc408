"""`SparsityPattern`: the one value type for a fixed connectivity.

A pattern is the set of trainable positions of an ``(input_dim, units)``
kernel. Its entries are kept in one canonical order, row-major sorted and
unique, and every array of per-entry data in sparselayers follows it:
``values[i]`` belongs to ``pattern.indices[i]``.

A pattern may also name its inputs and outputs (``input_names``,
``output_names``), for example SNPs and genes when it comes from a mapping
table (:meth:`SparsityPattern.from_edges`). Names are labels of rows and
columns: they travel with the pattern (config, ``.keras`` files,
``transpose``) but do not take part in ``==`` or ``hash``, which compare
connectivity only.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import hashlib
import json
import os
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.sparse

from sparselayers._validation import _short, as_index_array, check_shape

#: How many names error messages and ``repr`` quote.
_QUOTED = 5
#: Bytes per name a config may inflate to (JSON-quoted), a bound against hostile payloads.
_MAX_NAME_BYTES = 4096
#: Bounds on encoded names that do not trust the dimensions declared beside
#: them: bytes of JSON per byte of compressed names (real name lists inflate
#: 3 to 20 times: 1e6 random rsIDs 2.6, ``unit_0 ...`` 5.9, 40-character
#: shared prefixes 20), and names per byte of compressed names (real lists
#: take 2 bytes a name or more), each allowing at least a small list.
_MAX_NAME_INFLATION = 64
_MAX_NAMES_PER_BYTE = 2
_MIN_NAME_LIMIT = 2**20
#: The most entries a config may declare, checked before decompressing: no
#: layer holds more (its values alone would take 8 GiB in float32).
MAX_NNZ = 2**31 - 1
#: Dtype of stored indices. Every dimension is at most ``MAX_DIM = 2**31 - 1``
#: (``check_shape``), so every index fits: half the memory of int64, as
#: scipy.sparse does for index arrays that fit.
INDEX_DTYPE = np.dtype(np.int32)
#: Entries per step of the loops over a pattern's entries (here, in
#: ``structure`` and in the kernels' index constants), so that no int64
#: temporary of all nnz entries is made at once.
ENTRY_CHUNK = 2**20


def _quote(names: Iterable[Any], count: int | None = None) -> str:
    """``'a', 'b', 'c', ... (12 in all)``: the first few names of a list."""
    names = list(names)
    count = len(names) if count is None else count
    text = ", ".join(repr(n) for n in names[:_QUOTED])
    return text + (f", ... ({count} in all)" if count > _QUOTED else "")


def _check_names(names: Any, dim: int | None, arg: str) -> tuple[str, ...] | None:
    """``names`` as a tuple of unique str (``dim`` of them unless None), or None."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, (Sequence, np.ndarray)) and not hasattr(
        names, "tolist"
    ):
        raise TypeError(f"`{arg}` must be a sequence of str. Received: {arg}={_short(names)}")
    names = names.tolist() if hasattr(names, "tolist") else list(names)
    if set(map(type, names)) - {str}:  # a C-speed check of a million names
        bad = next((k for k, n in enumerate(names) if not isinstance(n, str)), None)
        if bad is not None:
            raise TypeError(
                f"`{arg}` must hold str names. Received: {arg}[{bad}]={names[bad]!r} "
                f"of type {type(names[bad]).__name__}"
            )
        names = [str(n) for n in names]  # np.str_ and other subclasses become plain str
    if dim is not None and len(names) != dim:
        raise ValueError(f"`{arg}` must name all {dim} units. Received: {len(names)} names")
    try:
        "".join(names).encode("utf-8")  # one C-speed pass; files can then always hold the names
    except UnicodeEncodeError:
        bad = next(k for k, n in enumerate(names) if not _is_utf8(n))
        raise ValueError(
            f"`{arg}` must be valid UTF-8 text (a lone surrogate comes from decoding bytes with "
            f"errors='surrogateescape'; decode them as UTF-8 or fix the stray byte). "
            f"Received: {arg}[{bad}]={names[bad]!r}"
        ) from None
    names = tuple(names)
    if len(set(names)) != len(names):
        seen: set[str] = set()
        repeated = [n for n in names if n in seen or seen.add(n)]  # type: ignore[func-returns-value]
        raise ValueError(f"`{arg}` must be unique. Received: repeated names {_quote(dict.fromkeys(repeated))}")
    return names


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encode_names(names: tuple[str, ...] | None) -> str | None:
    """base64 of the zlib-compressed JSON list: any str; 6.4 bytes a name for 1e6 random rsIDs."""
    if names is None:
        return None
    raw = json.dumps(names, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return base64.b64encode(zlib.compress(raw, 6)).decode("ascii")


def _decode_names(value: Any, key: str, dim: int) -> list[str] | None:
    """Inverse of :func:`_encode_names`, inflating a bounded number of bytes and names.

    The bounds follow the compressed size and ``dim`` (which a loading layer
    has checked against its own, or the absolute :data:`MAX_DIM`), so a small
    hostile payload cannot make the decoder allocate much more than itself.
    A plain JSON list (a hand-edited config) also works.
    """
    if value is None or isinstance(value, list):
        return value
    try:
        compressed = base64.b64decode(value, validate=True)
        limit = min(dim * _MAX_NAME_BYTES, max(_MIN_NAME_LIMIT, _MAX_NAME_INFLATION * len(compressed)))
        inflater = zlib.decompressobj()
        raw = inflater.decompress(compressed, limit)
        if inflater.unconsumed_tail:
            raise ValueError(f"over {limit} bytes of names for {len(compressed)} compressed bytes")
        # Every name is a JSON string with two quotes: an upper bound on the
        # names, counted before json makes a Python str of each.
        strings = raw.count(b'"') // 2
        if strings > max(_MIN_NAME_LIMIT, _MAX_NAMES_PER_BYTE * len(compressed)):
            raise ValueError(f"up to {strings} names in {len(compressed)} compressed bytes")
        names = json.loads(raw.decode("utf-8"))
    except (TypeError, ValueError, binascii.Error, zlib.error) as error:
        raise ValueError(f"Corrupt SparsityPattern config: `{key}` is not encoded names ({error})") from None
    if not isinstance(names, list):
        raise ValueError(f"Corrupt SparsityPattern config: `{key}` must decode to a list of names")
    return names


def _as_list(values: Any, arg: str) -> list[Any] | np.ndarray:
    """A list, or an integer NumPy array, of the entries of ``values`` (a column of a table)."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"`{arg}` must be a sequence of names or integer positions. Received: {arg}={_short(values)}")
    if isinstance(values, np.ndarray) and np.issubdtype(values.dtype, np.integer):
        return values
    if hasattr(values, "tolist"):  # NumPy arrays, pandas Series
        values = values.tolist()
    try:
        return list(values)
    except TypeError:
        raise TypeError(
            f"`{arg}` must be a sequence of names or integer positions. Received: {arg}={_short(values)}"
        ) from None


def _positions(
    values: Any, universe: Any, arg: str, universe_arg: str
) -> tuple[np.ndarray, tuple[str, ...] | None, int]:
    """Positions of one side of an edge list, with that side's names and size.

    ``universe`` is the ordered list of names, an int size for integer
    positions, or None: then the names are those of ``values`` in order of
    first appearance (integer positions: size ``max + 1``).
    """
    values = _as_list(values, arg)
    if isinstance(universe, (int, np.integer)) and not isinstance(universe, (bool, np.bool_)):
        names, size = None, int(universe)
        if size < 1:
            raise ValueError(f"`{universe_arg}` must be >= 1. Received: {universe_arg}={size}")
    elif universe is None:
        names, size = None, None
    else:
        names = _check_names(universe, None, universe_arg)
        size = len(names)
    types = {np.int64} if isinstance(values, np.ndarray) else set(map(type, values))
    if all(issubclass(t, (int, np.integer)) and not issubclass(t, (bool, np.bool_)) for t in types):
        kind = int
    elif all(issubclass(t, str) for t in types):
        kind = str
    else:
        first = str if isinstance(values[0], str) else int
        bad = next(
            k for k, v in enumerate(values) if not (isinstance(v, str) if first is str else _is_int(v))
        )
        raise TypeError(
            f"`{arg}` must hold names (str) or integer positions, one kind only. "
            f"Received: {arg}[{bad}]={values[bad]!r} of type {type(values[bad]).__name__}"
        )
    if kind is str:
        if size is not None and names is None:
            raise TypeError(
                f"`{arg}` holds names, so `{universe_arg}` must be the list of names (or None). "
                f"Received: {universe_arg}={universe}"
            )
        if names is None:
            names = _check_names(list(dict.fromkeys(values)), None, arg)  # order of first appearance
        index = dict(zip(names, range(len(names))))
        try:
            positions = np.fromiter(map(index.__getitem__, values), np.int64, len(values))
        except KeyError:
            unknown = [k for k, v in enumerate(values) if v not in index]
            missing = dict.fromkeys(values[k] for k in unknown)
            raise ValueError(
                f"`{arg}` holds {len(missing)} names not in `{universe_arg}`: {_quote(missing)}. "
                f"Received: {len(unknown)} edges with unknown names"
            ) from None
        return positions, names, len(names)
    positions = as_index_array(values, arg) if len(values) else np.zeros(0, np.int64)
    if size is None:
        size = int(positions.max()) + 1 if positions.size else 0
    bad = np.flatnonzero((positions < 0) | (positions >= size))
    if bad.size:
        k = bad[0]
        raise ValueError(f"`{arg}` must lie in [0, {size}). Received: {arg}[{k}]={positions[k]}")
    return positions, names, size


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class SparsityPattern:
    """An immutable ``(input_dim, units)`` sparsity pattern.

    Build one with :meth:`from_coo`, :meth:`from_scipy`, :meth:`from_dense`,
    :meth:`from_edges` (a mapping table of names) or a generator in
    :mod:`sparselayers.patterns`. Entry ``(i, j)`` connects input feature
    ``i`` to output unit ``j``; ``indices`` lists the entries row-major
    sorted, and ``values[k]`` of any layer or conversion belongs to
    ``indices[k]``.

    ``indices`` is int32 (:data:`INDEX_DTYPE`; every dimension is below
    ``2**31``), 8 bytes per entry. Flat positions (:attr:`linear`) are int64
    and computed on demand, so a pattern holds nothing else per entry.

    Patterns may name their inputs and outputs (``input_names``,
    ``output_names``). Equality and hash compare shape and entries only:
    two patterns with the same connections are equal whatever their names
    (compare ``input_names``/``output_names`` to tell them apart).

    Example:

    >>> import sparselayers as sl
    >>> p = sl.SparsityPattern.from_coo([1, 0, 2], [0, 1, 1], shape=(3, 2))
    >>> p.indices.tolist()
    [[0, 1], [1, 0], [2, 1]]
    >>> p.to_dense(values=[10, 20, 30]).tolist()
    [[0, 10], [20, 0], [0, 30]]
    >>> p.nnz, p.density
    (3, 0.5)
    """

    def __init__(
        self,
        indices: Any,
        shape: tuple[int, int],
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
    ):
        """Wraps canonical data: ``(nnz, 2)`` integer indices, row-major sorted and unique.

        The ``from_*`` constructors accept any order; this one checks and
        refuses what is not canonical.

        Raises:
            TypeError: non-integer indices or shape, names that are not str.
            ValueError: indices not of shape ``(nnz, 2)``, outside ``shape``,
                unsorted or repeated; names of the wrong length or repeated.
        """
        shape = check_shape(shape)
        array = np.asarray(indices)
        if array.size == 0:
            array = np.zeros((0, 2), np.int64)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"`indices` must hold integers. Received: indices of dtype {array.dtype}")
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"`indices` must have shape (nnz, 2). Received: indices with shape {array.shape}")
        array = array.astype(np.int64, copy=False)
        for axis, name in ((0, "rows"), (1, "cols")):
            bad = np.flatnonzero((array[:, axis] < 0) | (array[:, axis] >= shape[axis]))
            if bad.size:
                raise ValueError(
                    f"`indices` {name} must lie in [0, {shape[axis]}) for shape={shape}. "
                    f"Received: indices[{bad[0]}]={array[bad[0]].tolist()}"
                )
        steps = np.diff(array[:, 0] * shape[1] + array[:, 1])
        bad = np.flatnonzero(steps <= 0)
        if bad.size:
            raise ValueError(
                "`indices` must be row-major sorted and unique (from_coo sorts any order). "
                f"Received: indices[{bad[0] + 1}]={array[bad[0] + 1].tolist()} after {array[bad[0]].tolist()}"
            )
        self._set(
            array,
            shape,
            _check_names(input_names, shape[0], "input_names"),
            _check_names(output_names, shape[1], "output_names"),
        )

    def _set(self, indices: np.ndarray, shape: tuple[int, int], input_names: Any, output_names: Any) -> None:
        indices = np.ascontiguousarray(indices, dtype=INDEX_DTYPE).reshape(-1, 2)
        indices.setflags(write=False)
        self._indices = indices
        self._shape = shape
        self._input_names = input_names
        self._output_names = output_names

    # Construction ---------------------------------------------------------

    @classmethod
    def from_coo(cls, rows: Any, cols: Any, shape: Any) -> SparsityPattern:
        """Builds a pattern from coordinate lists.

        Args:
            rows: integer array-like of input indices, one per entry.
            cols: integer array-like of output indices, same length.
            shape: ``(input_dim, units)``.

        Returns:
            The pattern, entries in canonical order whatever the input order.

        Raises:
            TypeError: non-integer coordinates or shape.
            ValueError: lengths differ, an index is out of range, or a
                coordinate appears twice (the first repeat is named).
        """
        shape = check_shape(shape)
        rows = as_index_array(rows, "rows")
        cols = as_index_array(cols, "cols")
        if rows.shape != cols.shape:
            raise ValueError(
                "`rows` and `cols` must have the same length. "
                f"Received: len(rows)={rows.size}, len(cols)={cols.size}"
            )
        for name, array, bound in (("rows", rows, shape[0]), ("cols", cols, shape[1])):
            bad = np.flatnonzero((array < 0) | (array >= bound))
            if bad.size:
                k = bad[0]
                raise ValueError(
                    f"`{name}` must lie in [0, {bound}) for shape={shape}. "
                    f"Received: {name}[{k}]={array[k]}"
                )
        linear = rows * shape[1] + cols
        order = np.argsort(linear, kind="stable")
        ordered = linear[order]
        repeats = np.flatnonzero(ordered[1:] == ordered[:-1]) + 1
        if repeats.size:
            k = int(order[repeats].min())
            raise ValueError(
                "Coordinates must be unique; merge duplicates first "
                "(scipy's `sum_duplicates()` does). "
                f"Received: duplicate entry (row={rows[k]}, col={cols[k]}) at position {k}"
            )
        return cls._from_linear(ordered, shape)

    @classmethod
    def from_edges(
        cls,
        sources: Any,
        targets: Any,
        inputs: Sequence[str] | int | None = None,
        outputs: Sequence[str] | int | None = None,
    ) -> SparsityPattern:
        """Builds a named pattern from an edge list, e.g. the columns of a SNP -> gene table.

        Edge ``k`` connects input ``sources[k]`` to output ``targets[k]``.
        Each side holds names (str) or integer positions. ``inputs`` and
        ``outputs`` fix the order of the units: pass the full ordered name
        list (for inputs, the order of the columns of your data), or for
        integer positions the number of units. By default a side's names are
        those that occur, **in order of first appearance** (integer positions:
        ``max + 1`` units, unnamed). Repeated edges merge into one entry.

        Args:
            sources: input name or position of each edge (a list, NumPy array
                or pandas Series).
            targets: output name or position of each edge, same length.
            inputs: ordered input names, or the input count for positions.
            outputs: ordered output names, or the output count for positions.

        Returns:
            The pattern; ``input_names``/``output_names`` are tuples of str
            for sides given by name, None otherwise.

        Raises:
            TypeError: entries neither str nor int, or names where ``inputs``
                is a count.
            ValueError: lengths differ; a name absent from ``inputs`` or
                ``outputs`` (the first few are quoted); a position out of
                range; repeated names in ``inputs`` or ``outputs``.

        Example:

        >>> import sparselayers as sl
        >>> p = sl.SparsityPattern.from_edges(
        ...     ["rs1", "rs2", "rs3", "rs3", "rs3"], ["GENE_A", "GENE_A", "GENE_B", "GENE_A", "GENE_B"])
        >>> p.input_names, p.output_names
        (('rs1', 'rs2', 'rs3'), ('GENE_A', 'GENE_B'))
        >>> p.to_dense().astype(int).tolist()
        [[1, 0], [1, 0], [1, 1]]
        >>> sl.SparsityPattern.from_edges(["rs1", "rs9"], ["A", "A"], inputs=["rs1", "rs2"])
        Traceback (most recent call last):
        ...
        ValueError: `sources` holds 1 names not in `inputs`: 'rs9'. Received: 1 edges with unknown names
        """
        rows, input_names, n = _positions(sources, inputs, "sources", "inputs")
        cols, output_names, m = _positions(targets, outputs, "targets", "outputs")
        if rows.size != cols.size:
            raise ValueError(
                "`sources` and `targets` must have the same length. "
                f"Received: len(sources)={rows.size}, len(targets)={cols.size}"
            )
        if not n or not m:
            raise ValueError(
                "An edge list without edges needs `inputs` and `outputs` to give the shape. "
                f"Received: {rows.size} edges, inputs={_short(inputs)}, outputs={_short(outputs)}"
            )
        shape = check_shape((n, m))
        linear = np.sort(rows * m + cols)
        unique = np.concatenate([[True], linear[1:] != linear[:-1]]) if linear.size else np.zeros(0, bool)
        return cls._from_linear(linear[unique], shape, input_names, output_names)

    @classmethod
    def from_frame(
        cls,
        frame: Any,
        source: str,
        target: str,
        *,
        inputs: Sequence[str] | int | None = None,
        outputs: Sequence[str] | int | None = None,
    ) -> SparsityPattern:
        """:meth:`from_edges` on two columns of a pandas DataFrame.

        >>> import pandas as pd, sparselayers as sl
        >>> table = pd.DataFrame({"snp": ["rs1", "rs2", "rs3"], "gene": ["A", "B", "B"]})
        >>> sl.SparsityPattern.from_frame(table, "snp", "gene").output_names
        ('A', 'B')

        Raises:
            ValueError: a column is missing (the columns are listed), or as
                :meth:`from_edges`.
        """
        columns = list(getattr(frame, "columns", []))
        for arg, column in (("source", source), ("target", target)):
            if column not in columns:
                raise ValueError(
                    f"`{arg}` must be a column of the frame. Received: {arg}={column!r}; "
                    f"columns are {_quote(columns)}"
                )
        return cls.from_edges(frame[source], frame[target], inputs, outputs)

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        source: str,
        target: str,
        *,
        inputs: Sequence[str] | int | None = None,
        outputs: Sequence[str] | int | None = None,
        delimiter: str = ",",
    ) -> SparsityPattern:
        """:meth:`from_edges` on two columns of a CSV file with a header row.

        Read with the standard ``csv`` module (no pandas needed); columns are
        found by their header names and read as str, so names such as
        ``"007"`` stay as written. Use ``delimiter="\t"`` for TSV.

        Raises:
            ValueError: the file has no header or lacks a column, or as
                :meth:`from_edges`.
        """
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"`path` must be a CSV file with a header row. Received: an empty file {path}")
            picked = []
            for arg, column in (("source", source), ("target", target)):
                if column not in header:
                    raise ValueError(
                        f"`{arg}` must be a column of {path}. Received: {arg}={column!r}; "
                        f"columns are {_quote(header)}"
                    )
                picked.append(header.index(column))
            a, b = picked
            sources, targets = [], []
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                try:
                    sources.append(row[a])
                    targets.append(row[b])
                except IndexError:
                    raise ValueError(f"{path}, line {line}: expected {len(header)} fields, found {len(row)}") from None
        return cls.from_edges(sources, targets, inputs, outputs)

    @classmethod
    def from_dense(cls, mask: Any) -> SparsityPattern:
        """Builds a pattern from the nonzero entries of a 2-D array-like.

        >>> import sparselayers as sl
        >>> sl.SparsityPattern.from_dense([[1, 0], [0, 1], [1, 1]]).indices.tolist()
        [[0, 0], [1, 1], [2, 0], [2, 1]]
        """
        try:
            array = np.asarray(mask)
        except (ValueError, TypeError) as error:
            raise TypeError(
                f"`mask` must be a rectangular 2-D array. Received: mask={_short(mask)} ({error})"
            ) from None
        if array.ndim != 2:
            raise ValueError(
                f"`mask` must be 2-D (input_dim, units). Received: mask with shape {array.shape}"
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"`mask` must be numeric or boolean. Received: mask of dtype {array.dtype}")
        shape = check_shape(array.shape, "mask.shape")
        rows, cols = np.nonzero(array)
        return cls(np.stack([rows, cols], axis=1), shape)

    @classmethod
    def from_scipy(cls, matrix: Any) -> SparsityPattern:
        """Builds a pattern from the stored entries of any scipy.sparse matrix.

        Every format is accepted (coo, csr, csc, bsr, dia, lil, dok, as
        ``*_matrix`` or ``*_array``). Stored entries define the pattern,
        explicit zeros included; duplicates are merged as scipy merges them.

        >>> import scipy.sparse, sparselayers as sl
        >>> m = scipy.sparse.csr_array(([5.0, 0.0], ([0, 1], [1, 0])), shape=(2, 2))
        >>> sl.SparsityPattern.from_scipy(m).indices.tolist()  # the explicit 0 stays
        [[0, 1], [1, 0]]
        """
        return cls._from_scipy_with_data(matrix)[0]

    @classmethod
    def _from_scipy_with_data(cls, matrix: Any) -> tuple[SparsityPattern, np.ndarray]:
        if not scipy.sparse.issparse(matrix):
            raise TypeError(
                "`matrix` must be a scipy.sparse matrix or array. "
                f"Received: matrix of type {type(matrix).__name__}"
            )
        if matrix.ndim != 2:
            raise ValueError(f"`matrix` must be 2-D. Received: matrix with shape {matrix.shape}")
        shape = check_shape(matrix.shape, "matrix.shape")
        if matrix.format == "dia":
            rows, cols, data = _dia_entries(matrix)
            coo = scipy.sparse.coo_array((data, (rows, cols)), shape=shape)
        else:
            coo = scipy.sparse.coo_array(matrix.tocoo(copy=True))  # keeps stored zeros
        coo.sum_duplicates()  # merges repeated coordinates, keeping the zeros they sum to
        rows = np.asarray(coo.coords[0], dtype=np.int64)
        cols = np.asarray(coo.coords[1], dtype=np.int64)
        linear = rows * shape[1] + cols
        order = np.argsort(linear, kind="stable")
        return cls._from_linear(linear[order], shape), np.asarray(coo.data)[order]

    @classmethod
    def _from_linear(
        cls,
        linear: np.ndarray,
        shape: tuple[int, int],
        input_names: tuple[str, ...] | None = None,
        output_names: tuple[str, ...] | None = None,
    ) -> SparsityPattern:
        """Wraps sorted, unique, in-range row-major positions and checked names (trusted)."""
        linear = np.asarray(linear)
        indices = np.empty((linear.size, 2), INDEX_DTYPE)
        for start in range(0, linear.size, ENTRY_CHUNK):
            rows, cols = np.divmod(linear[start : start + ENTRY_CHUNK].astype(np.int64, copy=False), shape[1])
            indices[start : start + ENTRY_CHUNK, 0] = rows
            indices[start : start + ENTRY_CHUNK, 1] = cols
        pattern = cls.__new__(cls)
        pattern._set(indices, shape, input_names, output_names)
        return pattern

    def with_names(
        self, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None
    ) -> SparsityPattern:
        """The same connections with these names (None leaves a side unnamed).

        >>> import sparselayers as sl
        >>> sl.patterns.dense((2, 1)).with_names(["x", "y"], ["out"]).input_names
        ('x', 'y')
        """
        return SparsityPattern._from_linear(
            self.linear,
            self._shape,
            _check_names(input_names, self._shape[0], "input_names"),
            _check_names(output_names, self._shape[1], "output_names"),
        )

    # Properties -----------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(input_dim, units)``."""
        return self._shape

    @property
    def input_names(self) -> tuple[str, ...] | None:
        """Names of the ``input_dim`` inputs (rows), or None."""
        return self._input_names

    @property
    def output_names(self) -> tuple[str, ...] | None:
        """Names of the ``units`` outputs (columns), or None."""
        return self._output_names

    @property
    def indices(self) -> np.ndarray:
        """Read-only int32 array ``(nnz, 2)`` of ``(row, col)``, row-major sorted."""
        return self._indices

    @property
    def rows(self) -> np.ndarray:
        """Input index of each entry (``indices[:, 0]``)."""
        return self._indices[:, 0]

    @property
    def cols(self) -> np.ndarray:
        """Output index of each entry (``indices[:, 1]``)."""
        return self._indices[:, 1]

    @property
    def nnz(self) -> int:
        """Number of entries (trainable positions)."""
        return int(self._indices.shape[0])

    @property
    def density(self) -> float:
        """``nnz / (input_dim * units)``."""
        return self.nnz / (self._shape[0] * self._shape[1])

    @property
    def linear(self) -> np.ndarray:
        """Row-major flat positions ``row * units + col`` (int64), sorted.

        Computed on each access, not kept: 8 bytes per entry.
        """
        return self.rows.astype(np.int64) * self._shape[1] + self.cols

    @functools.cached_property
    def fan_in(self) -> np.ndarray:
        """Inputs connected to each output unit, shape ``(units,)``."""
        return np.bincount(self.cols, minlength=self._shape[1])

    @functools.cached_property
    def fan_out(self) -> np.ndarray:
        """Outputs fed by each input feature, shape ``(input_dim,)``."""
        return np.bincount(self.rows, minlength=self._shape[0])

    @functools.cached_property
    def row_pointers(self) -> np.ndarray:
        """CSR ``indptr``: entries of row ``i`` are ``indptr[i]:indptr[i+1]``."""
        return np.concatenate([[0], np.cumsum(self.fan_out)]).astype(np.int64)

    # Conversion -----------------------------------------------------------

    def _values(self, values: Any) -> np.ndarray:
        if values is None:
            return np.ones(self.nnz)
        values = np.asarray(values)
        if values.shape != (self.nnz,):
            raise ValueError(
                f"`values` must have shape (nnz,) = ({self.nnz},). "
                f"Received: values with shape {values.shape}"
            )
        return values

    def to_scipy(self, values: Any = None) -> scipy.sparse.csr_array:
        """Returns a CSR array; ``values[i]`` belongs to ``indices[i]`` (default ones)."""
        return scipy.sparse.csr_array(
            (self._values(values), self.cols.copy(), self.row_pointers.copy()), shape=self._shape
        )

    def to_dense(self, values: Any = None) -> np.ndarray:
        """Returns the dense ``(input_dim, units)`` array (default ones)."""
        values = self._values(values)
        dense = np.zeros(self._shape, dtype=values.dtype)
        dense[self.rows, self.cols] = values
        return dense

    # Algebra --------------------------------------------------------------

    def transpose(self) -> SparsityPattern:
        """The ``(units, input_dim)`` pattern with rows and columns (and their names) swapped."""
        n, m = self._shape
        return SparsityPattern._from_linear(
            np.sort(self.cols.astype(np.int64) * n + self.rows), (m, n), self._output_names, self._input_names
        )

    @property
    def T(self) -> SparsityPattern:  # noqa: N802 - numpy's name
        """Alias of :meth:`transpose`."""
        return self.transpose()

    def _same_shape(self, other: Any, op: str) -> None:
        if not isinstance(other, SparsityPattern):
            raise TypeError(f"`{op}` needs two SparsityPatterns. Received: {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(
                f"`{op}` needs patterns of equal shape. Received: {self.shape} and {other.shape}"
            )

    def _common_names(self, other: SparsityPattern, op: str) -> tuple[Any, Any]:
        """Names of ``self op other``: a side named on one operand only keeps those names."""
        merged = []
        for side, mine, theirs in (
            ("input_names", self._input_names, other._input_names),
            ("output_names", self._output_names, other._output_names),
        ):
            if mine is not None and theirs is not None and mine != theirs:
                k = next((k for k, (a, b) in enumerate(zip(mine, theirs)) if a != b), len(mine))
                raise ValueError(
                    f"`{op}` needs patterns whose {side} agree. Received: {side}[{k}]="
                    f"{mine[k]!r} and {theirs[k]!r}"
                )
            merged.append(mine if mine is not None else theirs)
        return merged[0], merged[1]

    def __or__(self, other: SparsityPattern) -> SparsityPattern:
        """Union: entries in either pattern. Names must agree where both sides have them."""
        self._same_shape(other, "|")
        names = self._common_names(other, "|")
        return SparsityPattern._from_linear(np.union1d(self.linear, other.linear), self.shape, *names)

    def __and__(self, other: SparsityPattern) -> SparsityPattern:
        """Intersection: entries in both patterns. Names must agree where both sides have them."""
        self._same_shape(other, "&")
        names = self._common_names(other, "&")
        return SparsityPattern._from_linear(
            np.intersect1d(self.linear, other.linear, assume_unique=True), self.shape, *names
        )

    def kron(self, other: SparsityPattern) -> SparsityPattern:
        """Kronecker product: ``other`` placed at every entry of ``self``.

        Equal to ``SparsityPattern.from_dense(np.kron(a.to_dense(), b.to_dense()))``;
        the result is unnamed.
        """
        if not isinstance(other, SparsityPattern):
            raise TypeError(f"`other` must be a SparsityPattern. Received: {type(other).__name__}")
        n2, m2 = other.shape
        shape = check_shape((self.shape[0] * n2, self.shape[1] * m2), "kron shape")
        rows = (self.rows[:, None] * n2 + other.rows[None, :]).ravel()
        cols = (self.cols[:, None] * m2 + other.cols[None, :]).ravel()
        return SparsityPattern._from_linear(np.sort(rows.astype(np.int64) * shape[1] + cols), shape)

    # Identity -------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparsityPattern):
            return NotImplemented
        return self._shape == other._shape and np.array_equal(self._indices, other._indices)

    def __hash__(self) -> int:
        return hash((self._shape, self.fingerprint))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short SHA-256 digest of shape and entries, equal for equal patterns.

        Hashes the entries as int64, whatever the stored dtype, so digests
        (autotune's cache keys) keep their meaning; in chunks, so without a
        copy of the indices.
        """
        digest = hashlib.sha256(repr(self._shape).encode())
        for start in range(0, self.nnz, ENTRY_CHUNK):
            digest.update(self._indices[start : start + ENTRY_CHUNK].astype(np.int64).tobytes())
        return digest.hexdigest()[:16]

    @functools.cached_property
    def structure(self) -> str:
        """The structure detected in the pattern, e.g. ``'block-diagonal: 3 blocks'``."""
        from sparselayers.structure import describe

        return describe(self)

    def __repr__(self) -> str:
        names = "".join(
            f", {side}=[{_quote(names)}]"
            for side, names in (("inputs", self._input_names), ("outputs", self._output_names))
            if names is not None
        )
        return (
            f"SparsityPattern(shape={self._shape}, nnz={self.nnz}, "
            f"density={self.density:.4g}, structure='{self.structure}'{names})"
        )

    def summary(self) -> str:
        """Fan-in/fan-out statistics and dead units (a few by name when named), as text.

        >>> import sparselayers as sl
        >>> print(sl.patterns.banded((4, 3), upper=1).summary())
        SparsityPattern(shape=(4, 3), nnz=5, density=0.4167, structure='banded: lower=0, upper=1')
          fan-in per output: min 1, mean 1.67, max 2
          fan-out per input: min 0, mean 1.25, max 2
          inputs feeding no output (dead inputs): 1
          outputs with no input (bias only): 0
        """
        def stats(counts: np.ndarray) -> str:
            return f"min {counts.min()}, mean {counts.mean():.3g}, max {counts.max()}"

        def dead(counts: np.ndarray, names: tuple[str, ...] | None) -> str:
            where = np.flatnonzero(counts == 0)
            if names is None or not where.size:
                return str(where.size)
            return f"{where.size}: {_quote((names[k] for k in where[:_QUOTED]), where.size)}"

        return "\n".join(
            [
                repr(self),
                f"  fan-in per output: {stats(self.fan_in)}",
                f"  fan-out per input: {stats(self.fan_out)}",
                f"  inputs feeding no output (dead inputs): {dead(self.fan_out, self._input_names)}",
                f"  outputs with no input (bias only): {dead(self.fan_in, self._output_names)}",
            ]
        )

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Spy plot with block boundaries (needs matplotlib); see :func:`sparselayers.plotting.plot_pattern`."""
        from sparselayers.plotting import plot_pattern

        return plot_pattern(self, ax, **kwargs)

    # Serialization --------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """A JSON-ready dict whose size grows with nnz (and names), never with the shape.

        Entries are stored as zlib-compressed gaps between linear positions,
        base64 encoded: about one or two bytes per entry for typical patterns.
        Names, when present, are a zlib-compressed JSON list, base64 encoded
        (``input_names``, ``output_names``): a few bytes per name.
        """
        gaps = np.diff(self.linear, prepend=0)
        dtype = np.min_scalar_type(int(gaps.max())) if gaps.size else np.dtype(np.uint8)
        payload = zlib.compress(gaps.astype(dtype).tobytes(), 6)
        config: dict[str, Any] = {
            "shape": list(self._shape),
            "nnz": self.nnz,
            "gap_dtype": np.dtype(dtype).name,
            "gaps": base64.b64encode(payload).decode("ascii"),
        }
        for key, names in (("input_names", self._input_names), ("output_names", self._output_names)):
            if names is not None:
                config[key] = _encode_names(names)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparsityPattern:
        """Inverse of :meth:`get_config`; refuses any config that is not a valid pattern.

        Every decompression is bounded before it starts: the gaps by the
        declared ``nnz`` (at most :data:`MAX_NNZ`), the names by their
        compressed size (see :func:`_decode_names`). A layer loading a saved
        pattern compares ``shape`` and ``nnz`` with its own first
        (:mod:`sparselayers.pattern_state`).

        Raises:
            ValueError: a missing key; ``nnz`` over the shape or
                :data:`MAX_NNZ`; ``gap_dtype`` not an integer dtype;
                a payload that does not decode to ``nnz`` gaps; gaps that
                are negative or zero after the first (unsorted or repeated
                entries) or run past the shape; names that do not fit or
                inflate beyond their bounds.
        """
        if not isinstance(config, dict):
            raise ValueError(f"Corrupt SparsityPattern config: expected a dict. Received: {_short(config)}")
        missing = [key for key in ("shape", "nnz", "gap_dtype", "gaps") if key not in config]
        if missing:
            raise ValueError(f"Corrupt SparsityPattern config: missing {missing}. Received keys: {sorted(config)}")
        try:
            shape = check_shape(tuple(config["shape"]), "config['shape']")
        except (TypeError, ValueError) as error:
            raise ValueError(f"Corrupt SparsityPattern config: {error}") from None
        nnz = config["nnz"]
        most = min(shape[0] * shape[1], MAX_NNZ)
        if isinstance(nnz, bool) or not isinstance(nnz, (int, np.integer)) or not 0 <= nnz <= most:
            raise ValueError(
                f"Corrupt SparsityPattern config: `nnz` must be an integer in [0, {most}]. "
                f"Received: nnz={_short(nnz)}"
            )
        try:
            dtype = np.dtype(config["gap_dtype"])
        except (TypeError, ValueError):
            dtype = None
        if dtype is None or dtype.kind not in "ui":
            raise ValueError(
                "Corrupt SparsityPattern config: `gap_dtype` must name an integer dtype "
                f"such as 'uint8'. Received: gap_dtype={_short(config['gap_dtype'])}"
            )
        try:
            # Bounded, so a hostile payload cannot inflate beyond the bytes nnz promises.
            inflater = zlib.decompressobj()
            raw = inflater.decompress(base64.b64decode(config["gaps"], validate=True), nnz * dtype.itemsize + 1)
        except (TypeError, ValueError, binascii.Error, zlib.error) as error:
            raise ValueError(f"Corrupt SparsityPattern config: `gaps` does not decode ({error})") from None
        if len(raw) != nnz * dtype.itemsize or inflater.unconsumed_tail:
            raise ValueError(
                f"Corrupt SparsityPattern config: it declares nnz={nnz} but `gaps` holds "
                f"{len(raw) / dtype.itemsize:g}{'+' if inflater.unconsumed_tail else ''} entries of {dtype.name}"
            )
        # uint64 gaps beyond int64 wrap to negative here and are refused below.
        gaps = np.frombuffer(raw, dtype=dtype).astype(np.int64)
        size = shape[0] * shape[1]
        wrong = np.flatnonzero((gaps < 0) | ((gaps == 0) & (np.arange(nnz) > 0)))
        if wrong.size:
            k = int(wrong[0])
            raise ValueError(
                "Corrupt SparsityPattern config: entries must be sorted and unique, so the first gap "
                f"must be >= 0 and the others > 0. Received: gaps[{k}]={gaps[k]}"
            )
        # Every gap below the size (<= 2**62) keeps the running sum from overflowing before it passes the size.
        linear = np.cumsum(gaps) if nnz and gaps.max() < size else gaps
        if nnz and linear.max() >= size:
            raise ValueError(
                f"Corrupt SparsityPattern config: entries run past shape={shape} "
                f"(a position reaches {linear.max()} >= {size})"
            )
        names = []
        for key, dim in (("input_names", shape[0]), ("output_names", shape[1])):
            decoded = _decode_names(config.get(key), key, dim)
            try:
                names.append(_check_names(decoded, dim, key))
            except (TypeError, ValueError) as error:
                raise ValueError(f"Corrupt SparsityPattern config: {error}") from None
        return cls._from_linear(linear, shape, *names)


def _dia_entries(matrix: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every stored entry of a DIA matrix inside its shape, zeros included.

    scipy's ``tocoo`` drops zeros for DIA alone; DIA stores ``data[k, j]``
    at ``(j - offsets[k], j)``, and its ``nnz`` counts every such position.
    """
    n, m = matrix.shape
    data = np.asarray(matrix.data)
    width = min(m, data.shape[1])
    j = np.broadcast_to(np.arange(width), (len(matrix.offsets), width))
    i = j - np.asarray(matrix.offsets, np.int64)[:, None]
    keep = (i >= 0) & (i < n)
    return i[keep], j[keep], data[:, :width][keep]
