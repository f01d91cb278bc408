"""`SparsityPattern`: the one value type for a fixed connectivity.

A pattern is the set of trainable positions of an ``(input_dim, units)``
kernel. Its entries are kept in one canonical order, row-major sorted and
unique, and every array of per-entry data in sparselayers follows it:
``values[i]`` belongs to ``pattern.indices[i]``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import zlib
from typing import Any

import numpy as np
import scipy.sparse

from sparselayers._validation import _short, as_index_array, check_shape


class SparsityPattern:
    """An immutable ``(input_dim, units)`` sparsity pattern.

    Build one with :meth:`from_coo`, :meth:`from_scipy`, :meth:`from_dense` or
    a generator in :mod:`sparselayers.patterns`. Entry ``(i, j)`` connects
    input feature ``i`` to output unit ``j``; ``indices`` lists the entries
    row-major sorted, and ``values[k]`` of any layer or conversion belongs to
    ``indices[k]``.

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

    def __init__(self, indices: np.ndarray, shape: tuple[int, int]):
        """Wraps canonical, checked data; use the ``from_*`` constructors."""
        self._shape = shape
        indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1, 2)
        indices.setflags(write=False)
        self._indices = indices

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
        coo = matrix.tocoo(copy=True)
        coo.sum_duplicates()  # sorts row-major as well
        rows = np.asarray(coo.row if hasattr(coo, "row") else coo.coords[0], dtype=np.int64)
        cols = np.asarray(coo.col if hasattr(coo, "col") else coo.coords[1], dtype=np.int64)
        linear = rows * shape[1] + cols
        order = np.argsort(linear, kind="stable")
        return cls._from_linear(linear[order], shape), np.asarray(coo.data)[order]

    @classmethod
    def _from_linear(cls, linear: np.ndarray, shape: tuple[int, int]) -> SparsityPattern:
        """Wraps sorted, unique row-major linear indices."""
        rows, cols = np.divmod(linear, shape[1])
        return cls(np.stack([rows, cols], axis=1), shape)

    # Properties -----------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(input_dim, units)``."""
        return self._shape

    @property
    def indices(self) -> np.ndarray:
        """Read-only int64 array ``(nnz, 2)`` of ``(row, col)``, row-major sorted."""
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

    @functools.cached_property
    def linear(self) -> np.ndarray:
        """Row-major flat positions ``row * units + col``, sorted."""
        return self.rows * self._shape[1] + self.cols

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
        """The ``(units, input_dim)`` pattern with rows and columns swapped."""
        n, m = self._shape
        return SparsityPattern._from_linear(np.sort(self.cols * n + self.rows), (m, n))

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

    def __or__(self, other: SparsityPattern) -> SparsityPattern:
        """Union: entries in either pattern."""
        self._same_shape(other, "|")
        return SparsityPattern._from_linear(np.union1d(self.linear, other.linear), self.shape)

    def __and__(self, other: SparsityPattern) -> SparsityPattern:
        """Intersection: entries in both patterns."""
        self._same_shape(other, "&")
        return SparsityPattern._from_linear(
            np.intersect1d(self.linear, other.linear, assume_unique=True), self.shape
        )

    def kron(self, other: SparsityPattern) -> SparsityPattern:
        """Kronecker product: ``other`` placed at every entry of ``self``.

        Equal to ``SparsityPattern.from_dense(np.kron(a.to_dense(), b.to_dense()))``.
        """
        if not isinstance(other, SparsityPattern):
            raise TypeError(f"`other` must be a SparsityPattern. Received: {type(other).__name__}")
        n2, m2 = other.shape
        shape = check_shape((self.shape[0] * n2, self.shape[1] * m2), "kron shape")
        rows = (self.rows[:, None] * n2 + other.rows[None, :]).ravel()
        cols = (self.cols[:, None] * m2 + other.cols[None, :]).ravel()
        return SparsityPattern._from_linear(np.sort(rows * shape[1] + cols), shape)

    # Identity -------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparsityPattern):
            return NotImplemented
        return self._shape == other._shape and np.array_equal(self._indices, other._indices)

    def __hash__(self) -> int:
        return hash((self._shape, self.fingerprint))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short SHA-256 digest of shape and entries, equal for equal patterns."""
        digest = hashlib.sha256(repr(self._shape).encode())
        digest.update(self._indices.tobytes())
        return digest.hexdigest()[:16]

    @functools.cached_property
    def structure(self) -> str:
        """The structure detected in the pattern, e.g. ``'block-diagonal: 3 blocks'``."""
        from sparselayers.structure import describe

        return describe(self)

    def __repr__(self) -> str:
        return (
            f"SparsityPattern(shape={self._shape}, nnz={self.nnz}, "
            f"density={self.density:.4g}, structure='{self.structure}')"
        )

    def summary(self) -> str:
        """Fan-in/fan-out statistics and dead units, as text.

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

        return "\n".join(
            [
                repr(self),
                f"  fan-in per output: {stats(self.fan_in)}",
                f"  fan-out per input: {stats(self.fan_out)}",
                f"  inputs feeding no output (dead inputs): {int((self.fan_out == 0).sum())}",
                f"  outputs with no input (bias only): {int((self.fan_in == 0).sum())}",
            ]
        )

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Spy plot with block boundaries (needs matplotlib); see :func:`sparselayers.plotting.plot_pattern`."""
        from sparselayers.plotting import plot_pattern

        return plot_pattern(self, ax, **kwargs)

    # Serialization --------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """A JSON-ready dict whose size grows with nnz, never with the shape.

        Entries are stored as zlib-compressed gaps between linear positions,
        base64 encoded: about one or two bytes per entry for typical patterns.
        """
        gaps = np.diff(self.linear, prepend=0)
        dtype = np.min_scalar_type(int(gaps.max())) if gaps.size else np.dtype(np.uint8)
        payload = zlib.compress(gaps.astype(dtype).tobytes(), 6)
        return {
            "shape": list(self._shape),
            "nnz": self.nnz,
            "gap_dtype": np.dtype(dtype).name,
            "gaps": base64.b64encode(payload).decode("ascii"),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparsityPattern:
        """Inverse of :meth:`get_config`; checks the payload against ``nnz``."""
        try:
            shape = check_shape(tuple(config["shape"]), "config['shape']")
            gaps = np.frombuffer(
                zlib.decompress(base64.b64decode(config["gaps"])), dtype=config["gap_dtype"]
            )
            nnz = int(config["nnz"])
        except (KeyError, TypeError, ValueError, zlib.error) as error:
            raise ValueError(f"Corrupt SparsityPattern config: {error}. Received keys: {sorted(config)}") from None
        if gaps.size != nnz:
            raise ValueError(
                f"Corrupt SparsityPattern config: it declares nnz={nnz} but holds {gaps.size} entries"
            )
        linear = np.cumsum(gaps.astype(np.int64))
        if nnz and (np.any(gaps[1:] == 0) or linear[-1] >= shape[0] * shape[1]):
            raise ValueError("Corrupt SparsityPattern config: entries repeat or fall outside shape")
        return cls._from_linear(linear, shape)
