"""Cheap structure detection: dense rectangles (blocks) and diagonal bands.

Both detectors run in O(nnz) time and memory from the canonical indices and
never build a dense ``input_dim x units`` array, so they are safe for
patterns with tens of millions of entries.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from sparselayers.sparsity_pattern import ENTRY_CHUNK, SparsityPattern


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A pattern as a union of disjoint dense rectangles.

    Rectangle ``k`` covers rows ``row_start[k] .. row_start[k] + n_rows[k]``
    and columns ``col_start[k] .. col_start[k] + n_cols[k]``. Within each of
    its rows, its entries start ``row_offset[k]`` places after the row's first
    entry in canonical order.
    """

    row_start: np.ndarray
    n_rows: np.ndarray
    col_start: np.ndarray
    n_cols: np.ndarray
    row_offset: np.ndarray

    @property
    def count(self) -> int:
        return int(self.row_start.size)

    @property
    def mean_area(self) -> float:
        return float(np.mean(self.n_rows * self.n_cols)) if self.count else 0.0

    @property
    def is_diagonal(self) -> bool:
        """True when no two rectangles share a row or a column."""
        def disjoint(start: np.ndarray, size: np.ndarray) -> bool:
            order = np.argsort(start, kind="stable")
            ends = (start + size)[order]
            return bool(np.all(ends[:-1] <= start[order][1:]))

        return disjoint(self.row_start, self.n_rows) and disjoint(self.col_start, self.n_cols)


@dataclasses.dataclass(frozen=True)
class Band:
    """Every entry with ``min_offset <= col - row <= max_offset``, and no other."""

    min_offset: int
    max_offset: int

    @property
    def width(self) -> int:
        return self.max_offset - self.min_offset + 1


def _runs(pattern: SparsityPattern) -> tuple[np.ndarray, ...]:
    """Maximal runs of consecutive columns within each row."""
    rows, cols = pattern.rows, pattern.cols
    breaks = np.ones(pattern.nnz, bool)
    breaks[1:] = (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1)
    first = np.flatnonzero(breaks)
    length = np.diff(np.append(first, pattern.nnz))
    run_row = rows[first]
    offset = first - pattern.row_pointers[run_row]
    return run_row, cols[first], length, offset


def detect_blocks(pattern: SparsityPattern) -> Blocks | None:
    """Splits ``pattern`` into dense rectangles, or None if it has no entries.

    Consecutive rows whose runs of columns are identical form one row band;
    each run of a band is one rectangle. Every pattern has such a split (at
    worst one rectangle per run); ``Blocks.mean_area`` says whether it is
    worth a batched matmul. Not cached: a scattered pattern splits into about
    one rectangle per entry, 40 bytes each (:func:`block_shape` caches the
    summary that kernel choice needs).
    """
    if pattern.nnz == 0:
        return None
    run_row, start, length, offset = _runs(pattern)
    runs_per_row = np.bincount(run_row, minlength=pattern.shape[0])
    count = runs_per_row[run_row]
    # A run repeats the run one row up iff that row has as many runs and the
    # run `count` places back starts at the same column with the same length.
    back = np.arange(run_row.size) - count
    valid = back >= 0
    same = np.zeros(run_row.size, bool)
    b = back[valid]
    same[valid] = (
        (run_row[b] == run_row[valid] - 1)
        & (runs_per_row[run_row[b]] == count[valid])
        & (start[b] == start[valid])
        & (length[b] == length[valid])
    )
    row_first_run = np.flatnonzero(np.r_[True, run_row[1:] != run_row[:-1]])
    row_continues = np.logical_and.reduceat(same, row_first_run)
    # Each band starts at a row that does not continue the one above; its
    # rectangles are the runs of that first row.
    band_of_row = np.cumsum(~row_continues) - 1
    band_rows = np.bincount(band_of_row)
    row_of_run = np.repeat(np.arange(row_first_run.size), np.diff(np.append(row_first_run, run_row.size)))
    keep = ~row_continues[row_of_run]
    return Blocks(
        row_start=run_row[keep],
        n_rows=band_rows[band_of_row[row_of_run[keep]]],
        col_start=start[keep],
        n_cols=length[keep],
        row_offset=offset[keep],
    )


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """The mean rectangle of :func:`detect_blocks`: all ``kernel="auto"`` needs."""

    mean_area: float
    mean_rows: float
    #: Rectangles share input rows or output columns (scattered tiles, not a
    #: block diagonal): the block kernel then gathers inputs and sums outputs.
    shares_lines: bool = False


@functools.lru_cache(maxsize=16)
def block_shape(pattern: SparsityPattern) -> BlockShape:
    """Mean area and rows of ``pattern``'s dense rectangles (zeros if empty); cached."""
    return _block_shape(pattern, ENTRY_CHUNK)


def _block_shape(pattern: SparsityPattern, chunk: int) -> BlockShape:
    """:func:`block_shape` from per-row counts, reading ``chunk`` entries at a time.

    :func:`detect_blocks` splits a scattered pattern into about one rectangle
    per entry and its temporaries reach about 100 bytes per entry; the
    summary needs only, per row, its number of runs and whether it repeats
    the row above (same columns: a row's columns determine its runs). A
    row that does not repeat the one above starts a band of rows, whose
    rectangles are its runs, each as tall as the band.
    """
    n = pattern.shape[0]
    if pattern.nnz == 0:
        return BlockShape(0.0, 0.0)
    fan_out, starts = pattern.fan_out, pattern.row_pointers[:-1]
    all_rows, all_cols = pattern.rows, pattern.cols
    runs = np.zeros(n, np.int64)
    differs = np.zeros(n, np.int64)  # entries unlike the one a row above, for rows as full as that row
    same_count = np.zeros(n, bool)
    same_count[1:] = (fan_out[1:] == fan_out[:-1]) & (fan_out[1:] > 0)
    for begin in range(0, pattern.nnz, chunk):
        end = min(begin + chunk, pattern.nnz)
        rows, cols = all_rows[begin:end], all_cols[begin:end].astype(np.int64)
        k = np.arange(begin, end)
        previous = all_cols[max(begin - 1, 0) : end - 1].astype(np.int64)
        if begin == 0:
            previous = np.concatenate([[-2], previous])
        first = rows[0]
        breaks = (k == starts[rows]) | (cols != previous + 1)
        runs[first : rows[-1] + 1] += np.bincount(rows[breaks] - first, minlength=rows[-1] - first + 1)
        check = same_count[rows]
        mismatch = cols[check] != all_cols[k[check] - fan_out[rows[check]]]
        differs[first : rows[-1] + 1] += np.bincount(
            rows[check][mismatch] - first, minlength=rows[-1] - first + 1
        )
    continues = same_count & (differs == 0)
    filled = np.flatnonzero(fan_out)
    band_starts = ~continues[filled]
    heights = np.bincount(np.cumsum(band_starts) - 1)  # rows of each band
    leads = filled[band_starts]  # first row of each band
    count = runs[leads].sum()
    n_rows_sum = (runs[leads] * heights).sum()
    shares = bool(n_rows_sum > n or fan_out[leads].sum() > pattern.shape[1])
    return BlockShape(pattern.nnz / count, float(n_rows_sum / count), shares)


def _diagonal_length(n: int, m: int, offsets: np.ndarray) -> np.ndarray:
    """Number of cells with ``col - row == offset`` inside an ``(n, m)`` matrix."""
    return np.maximum(0, np.minimum(n, m - offsets) - np.maximum(0, -offsets))


@functools.lru_cache(maxsize=16)
def detect_band(pattern: SparsityPattern) -> Band | None:
    """Returns the band that ``pattern`` fills exactly, else None."""
    if pattern.nnz == 0:
        return None
    offsets = pattern.cols - pattern.rows
    low, high = int(offsets.min()), int(offsets.max())
    cells = _diagonal_length(*pattern.shape, np.arange(low, high + 1)).sum()
    return Band(low, high) if cells == pattern.nnz else None


def describe(pattern: SparsityPattern) -> str:
    """A short name for the structure detected in ``pattern``.

    >>> import sparselayers as sl
    >>> describe(sl.patterns.block_diagonal([(4, 4)] * 3))
    'block-diagonal: 3 blocks'
    >>> describe(sl.patterns.banded((9, 9), lower=1, upper=2))
    'banded: lower=1, upper=2'
    """
    if pattern.nnz == 0:
        return "empty"
    if pattern.nnz == pattern.shape[0] * pattern.shape[1]:
        return "dense"
    band = detect_band(pattern)
    if band is not None:
        if band.min_offset <= 0 <= band.max_offset:
            return f"banded: lower={-band.min_offset}, upper={band.max_offset}"
        return f"banded: offsets {band.min_offset}..{band.max_offset}"
    if block_shape(pattern).mean_area >= 4:  # the rectangles themselves only when few
        blocks = detect_blocks(pattern)
        kind = "block-diagonal" if blocks.is_diagonal else "block-sparse"
        return f"{kind}: {blocks.count} blocks"
    return "unstructured"
